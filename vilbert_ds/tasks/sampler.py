"""Which tasks train at iteration `step`: round-robin, size-proportional, temperature-scaled,
each gated by the original's dynamic stop-and-go.

Everything here is a pure function of (seed, step) and a small checkpointable state, so every
rank computes the same schedule without communication and a resumed run continues the exact
schedule of the interrupted one:

- `RoundRobin` (the original `train_tasks.py`): every task, in the order given, once per
  iteration; each runs its own forward/backward/optimizer step (one optimiser update per task per
  iteration), the LR scheduler steps once per iteration, and the loss of task t is scaled by
  lr_t / min(lr) (`loss_scales`).
- `Proportional` / `Temperature`: `tasks_per_step` independent draws per iteration with
  p_t proportional to size_t ** alpha (alpha 1 = proportional to the number of training examples,
  0 = uniform; temperature T is alpha = 1/T). The draw uses a generator seeded by (seed, step).
- `StopAndGo` (`MultiTaskStopOnPlateau` of the original, mode max): a task whose validation score
  has not beaten best * (1 + threshold) for more than `patience` evaluations is *stopped* and then
  only trains on iterations where step % train_iter_gap == 0; it goes again when its score drops
  below best * (1 - continue_threshold). `cooldown` evaluations after each switch ignore bad
  scores. All controllers reset after the epochs in `reset_epochs` (the original: 5 and 7).

The sampler state (`state_dict()`) is plain data: the controllers and what defines the schedule
(kind, seed, task order, sizes, alpha). The step itself is the trainer's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import SamplerConfig, StopAndGoConfig  # its settings live with every other config

# ------------------------------------------------------------------------------ stop-and-go
@dataclass
class PlateauController:
    """One task's stop/go state; `step(score)` after each validation of that task."""

    patience: int = 1
    threshold: float = 0.001
    continue_threshold: float = 0.005
    cooldown: int = 1
    best: float = -math.inf
    num_bad: int = 0
    cooldown_counter: int = 0
    in_stop: bool = False
    evaluations: int = 0

    def reset(self) -> None:
        self.best, self.num_bad, self.cooldown_counter, self.in_stop = -math.inf, 0, 0, False

    def step(self, score: float) -> bool:
        """Feed one validation score (higher is better); returns the new `in_stop`."""
        score = float(score)
        self.evaluations += 1
        if score > self.best * (1.0 + self.threshold):  # -inf * (1 + t) is -inf: any first score wins
            self.best, self.num_bad = score, 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:  # bad scores right after a switch do not count
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            self.in_stop, self.cooldown_counter, self.num_bad = True, self.cooldown, 0
        elif self.in_stop and score < self.best * (1.0 - self.continue_threshold):
            # the score fell while the task was mostly paused: train it fully again
            self.in_stop, self.cooldown_counter, self.num_bad = False, self.cooldown, 0
        return self.in_stop

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["best"] = None if self.best == -math.inf else self.best  # JSON has no -inf
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "PlateauController":
        state = dict(state)
        state["best"] = -math.inf if state.get("best") is None else float(state["best"])
        return cls(**state)


class StopAndGo:
    """Stop/go controllers for every task; a disabled gate lets every task run every step."""

    def __init__(self, tasks: Sequence[str], config: StopAndGoConfig):
        self.config = config
        self.controllers = {
            t: PlateauController(config.patience, config.threshold, config.continue_threshold, config.cooldown)
            for t in tasks
        }

    def runs(self, task: str, step: int) -> bool:
        if not self.config.enabled or not self.controllers[task].in_stop:
            return True
        return step % self.config.train_iter_gap == 0

    def report(self, task: str, score: float) -> bool:
        """A validation score for `task`; returns whether it is stopped now."""
        return self.controllers[task].step(score) if self.config.enabled else False

    def end_epoch(self, epoch: int) -> bool:
        """Call after each (0-based) epoch; resets all controllers after the configured epochs."""
        if epoch in self.config.reset_epochs:
            for controller in self.controllers.values():
                controller.reset()
            return True
        return False

    def stopped(self) -> dict[str, bool]:
        return {t: c.in_stop for t, c in self.controllers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {t: c.state_dict() for t, c in self.controllers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.controllers) - set(state)
        if missing:
            raise ValueError(f"stop-and-go state has no controller for tasks {sorted(missing)}")
        self.controllers = {t: PlateauController.from_state(state[t]) for t in self.controllers}


# ------------------------------------------------------------------------------ samplers
class TaskSampler:
    """Base: `tasks_at(step)` lists the tasks to train at an iteration, in order (one optimiser
    update each); `probabilities(step)` is what gets logged."""

    kind = "base"

    def __init__(self, tasks: Sequence[str], sizes: Mapping[str, int], lrs: Mapping[str, float], config: SamplerConfig):
        if not tasks:
            raise ValueError("a task sampler needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate tasks in {list(tasks)}")
        for name, table in (("sizes", sizes), ("lrs", lrs)):
            missing = [t for t in tasks if t not in table]
            if missing:
                raise ValueError(f"sampler: no {name} entry for tasks {missing}")
        bad = [t for t in tasks if sizes[t] <= 0]
        if bad:
            raise ValueError(f"sampler: tasks {bad} have no training examples (size <= 0)")
        self.tasks = list(tasks)
        self.sizes = {t: int(sizes[t]) for t in tasks}
        self.lrs = {t: float(lrs[t]) for t in tasks}
        self.config = config
        self.gate = StopAndGo(self.tasks, config.stop_and_go)

    def loss_scales(self) -> dict[str, float]:
        """The original's per-task loss weight lr_t / min(lr) (or 1 with loss_scale=none)."""
        if self.config.loss_scale == "none":
            return {t: 1.0 for t in self.tasks}
        base = min(self.lrs.values())
        return {t: self.lrs[t] / base for t in self.tasks}

    def running(self, step: int) -> list[str]:
        return [t for t in self.tasks if self.gate.runs(t, step)]

    def tasks_at(self, step: int) -> list[str]:
        raise NotImplementedError

    def probabilities(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def rng(self, step: int) -> np.random.Generator:
        """The generator for one iteration: a pure function of (seed, step)."""
        return np.random.default_rng(np.random.SeedSequence([int(self.config.seed) & 0xFFFFFFFF, int(step)]))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seed": self.config.seed,
            "alpha": self.config.alpha,
            "tasks": list(self.tasks),
            "sizes": dict(self.sizes),
            "stop_and_go": self.gate.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mismatch = [
            f"{k}: checkpoint {state.get(k)!r} != run {mine!r}"
            for k, mine in (("kind", self.kind), ("tasks", self.tasks), ("seed", self.config.seed))
            if state.get(k) != mine
        ]
        if mismatch:
            raise ValueError("the sampler state does not belong to this run: " + "; ".join(mismatch))
        self.gate.load_state_dict(state["stop_and_go"])


class RoundRobin(TaskSampler):
    kind = "round_robin"

    def tasks_at(self, step: int) -> list[str]:
        return self.running(step)

    def probabilities(self, step: int) -> dict[str, float]:
        running = set(self.running(step))
        return {t: (1.0 if t in running else 0.0) for t in self.tasks}


class Temperature(TaskSampler):
    """p_t proportional to size_t ** alpha over the tasks running at this step."""

    kind = "temperature"

    def probabilities(self, step: int) -> dict[str, float]:
        running = self.running(step)
        weights = np.array([float(self.sizes[t]) ** self.config.alpha for t in running], dtype=np.float64)
        probs = weights / weights.sum() if len(running) else weights
        table = dict(zip(running, probs.tolist()))
        return {t: table.get(t, 0.0) for t in self.tasks}

    def tasks_at(self, step: int) -> list[str]:
        probs = self.probabilities(step)
        running = [t for t in self.tasks if probs[t] > 0]
        if not running:  # every task stopped and this is not a gap step
            return []
        p = np.array([probs[t] for t in running])
        picks = self.rng(step).choice(len(running), size=self.config.tasks_per_step, p=p / p.sum())
        return [running[i] for i in picks]


class Proportional(Temperature):
    kind = "proportional"


SAMPLERS: dict[str, type[TaskSampler]] = {
    "round_robin": RoundRobin,
    "proportional": Proportional,
    "temperature": Temperature,
}


def build_sampler(tasks: Sequence[str], sizes: Mapping[str, int], lrs: Mapping[str, float],
                  config: SamplerConfig | Mapping[str, Any] | None = None) -> TaskSampler:
    if config is None:
        config = SamplerConfig()
    elif isinstance(config, Mapping):
        config = SamplerConfig(**config)
    return SAMPLERS[config.kind](tasks, sizes, lrs, config)


def eval_due(step: int, iters_per_epoch: int, final_step: int) -> bool:
    """The original evaluates a task whenever the iteration id is a non-zero multiple of that
    task's own number of training batches, and once at the very last iteration."""
    return (step != 0 and step % max(iters_per_epoch, 1) == 0) or step == final_step
