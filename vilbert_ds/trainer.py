"""`Trainer`: one short, stateful loop over named data streams, for every kind of run.

    per iteration: schedule.step()
                   for stream in sampler.tasks_at(iteration):        # the same list on every rank
                       gradient_accumulation_steps micro-batches of that stream:
                           forward -> engine.backward(loss * loss_scale[stream]) -> engine.step()
                   evaluate the tasks that are due (stop-and-go sees the scores); log; maybe save

Pretraining is one stream ("train") under round-robin; 12-in-1 is one stream per task under any
sampler (`tasks.sampler`); fine-tuning is one task stream. Each stream's loader follows the
vilbert-ds Loader protocol (`__iter__` over the rest of the epoch, `__len__`, `set_epoch`,
`state_dict`, `load_state_dict`). Every data pull runs inside `torch.random.fork_rng`: a
DataLoader draws its worker seeds from the global torch RNG when an epoch (or a resumed epoch)
starts, and those draws must not move the model's dropout stream, or a resumed run diverges.

`state_dict()` is plain data (iteration, samples, updates and epoch per stream, sampler incl.
stop-and-go, schedule, rank 0's loader positions) and goes into DeepSpeed's client_state;
per-rank RNG states and loader positions go into the checkpoint's per-rank file. On another
number of ranks each stream resumes in the same epoch at the same share of samples consumed.
At every `check_stop_every`-th iteration all ranks agree (one all-reduce) whether a preemption
signal arrived; if so they save and `fit()` returns `EXIT_PREEMPTED`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, CheckpointManager, ResumePlan, capture_rng, restore_rng
from .metrics import MetricsLogger, ThroughputMeter, peak_memory_gib
from .objectives import Ratio
from .preemption import EXIT_STOPPED
from .tasks.sampler import eval_due

log = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_PREEMPTED = EXIT_STOPPED  # 75, EX_TEMPFAIL: stopped by a signal after a complete checkpoint; resume with --resume auto
STATE_VERSION = 2  # client_state["trainer"]; version 1 = the former pretraining "trainer" / multi-task "multitask" states


class Loader(Protocol):
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stream:
    """Endless batches of one loader; the next epoch starts when one is exhausted."""

    def __init__(self, name: str, loader: Loader):
        self.name, self.loader, self.epoch, self._it = name, loader, 0, None

    def start(self, epoch: int) -> None:
        self.epoch, self._it = epoch, None
        self.loader.set_epoch(epoch)

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self.start(self.epoch + 1)
        raise RuntimeError(f"stream {self.name}: the loader yields no batches (empty shards or too few samples for "
                           "one micro-batch per rank)")


@dataclass
class TrainerOptions:
    total_steps: int  # length of the schedule, in iterations
    stop_at_step: int | None = None  # end this run there (with a checkpoint) even if the schedule is longer
    save_every: int = 1000
    log_every: int = 10
    check_stop_every: int = 1
    iters_per_epoch: int = 1  # iterations of one multi-task epoch (stop-and-go resets count these)
    stream_keys: bool = False  # metric keys per stream (train/<task>/loss) instead of train/loss
    evaluate: bool = False  # evaluate tasks when due during training (drives stop-and-go)
    eval_max_batches: int | None = None
    log_samples: bool = False
    progress_bar: bool = True
    flops_per_sample: dict[str, float] = field(default_factory=dict)  # training FLOPs of one sample per stream
    peak_tflops: float | None = None  # per device, for MFU
    meta: dict[str, Any] = field(default_factory=dict)  # written into each checkpoint's vilbert_ds.json


@dataclass
class TrainerState:
    step: int = 0  # iterations done
    samples_seen: int = 0  # samples in those iterations, all ranks and streams
    updates: dict[str, int] = field(default_factory=dict)  # optimizer updates per stream
    val_scores: dict[str, float] = field(default_factory=dict)  # last validation score per task


class Trainer:
    def __init__(self, *, engine, streams: dict[str, Loader], sampler, schedule, checkpoints: CheckpointManager,
                 logger: MetricsLogger, stop, options: TrainerOptions, micro_batches: dict[str, int],
                 accumulation: int = 1, evaluation=None, rank: int = 0, world_size: int = 1, restart_count: int = 0,
                 run_dir: str | os.PathLike = ".", float_dtype: torch.dtype = torch.float32, zero_stage: int = 0):
        self.engine, self.sampler, self.schedule, self.evaluation = engine, sampler, schedule, evaluation
        self.streams = {name: Stream(name, loader) for name, loader in streams.items()}
        self.checkpoints, self.logger, self.stop, self.opt = checkpoints, logger, stop, options
        self.micro, self.accumulation = dict(micro_batches), accumulation
        self.rank, self.world_size, self.restart_count = rank, world_size, restart_count
        self.run_dir, self.float_dtype, self.zero_stage = Path(run_dir), float_dtype, zero_stage
        self.scales = sampler.loss_scales()
        self.state = TrainerState(updates={n: 0 for n in self.streams})
        self.meter = ThroughputMeter()
        self._sums: dict[tuple[str, str], torch.Tensor] = {}  # (stream, metric) -> sum on the device
        self._counts: dict[tuple[str, str], float] = {}  # (stream, "#micro") and ("", "#updates") on the host
        self._grad_norm = torch.zeros(())
        self._sample_log = None

    @property
    def epoch(self) -> int:
        """The loader epoch of a one-stream run, else multi-task epochs done."""
        if len(self.streams) == 1:
            return next(iter(self.streams.values())).epoch
        return self.state.step // self.opt.iters_per_epoch

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain data for client_state."""
        return {"version": STATE_VERSION, "step": self.state.step, "samples_seen": self.state.samples_seen,
                "updates": dict(self.state.updates), "val_scores": dict(self.state.val_scores),
                "epochs": {n: s.epoch for n, s in self.streams.items()},
                "loaders": {n: s.loader.state_dict() for n, s in self.streams.items()},
                "sampler": self.sampler.state_dict(), "schedule": self.schedule.state_dict(),
                "world_size": self.world_size, "micro_batches": dict(self.micro), "accumulation": self.accumulation}

    def load_state_dict(self, client_state: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        t, rank_state = upgrade_state(client_state, rank_state)
        if list(t["epochs"]) != list(self.streams):
            raise CheckpointError(f"the checkpoint trained {list(t['epochs'])}; this run has {list(self.streams)}")
        self.state = TrainerState(step=int(t["step"]), samples_seen=int(t["samples_seen"]),
                                  updates={n: int(u) for n, u in t["updates"].items()}, val_scores=dict(t["val_scores"]))
        if t["sampler"] is not None:
            self.sampler.load_state_dict(t["sampler"])
        self.schedule.load_state_dict(t["schedule"])
        same = int(t["world_size"]) == self.world_size and t["micro_batches"] == self.micro
        for name, stream in self.streams.items():
            stream.epoch = int(t["epochs"][name])
            if same and rank_state is not None:
                stream.loader.load_state_dict(rank_state["loaders"][name])
            else:
                self._resume_rescaled(stream, t["loaders"][name], t["micro_batches"][name] * int(t["world_size"]))
        if same and rank_state is not None:
            restore_rng(rank_state["rng"])
        else:
            # Another number of ranks: each rank's stream of batches differs, so every stream
            # resumes in the same epoch at the same share of samples consumed (sample-exactness is
            # promised on the same world size only); dropout RNG streams restart from (step, rank).
            torch.manual_seed((self.state.step * 1_000_003 + self.rank) % 2**31)
            log.warning("resumed on %d ranks from a %d-rank checkpoint: each stream's data position rescaled "
                        "(same epoch, same share of samples consumed)", self.world_size, t["world_size"])

    def _resume_rescaled(self, stream: Stream, old: dict[str, Any], old_batch: int) -> None:
        stream.start(stream.epoch)
        fresh = stream.loader.state_dict()
        key = next((k for k in ("consumed", "batches_consumed") if k in old and k in fresh), None)
        if key is None:
            return
        done = min(len(stream.loader), int(old[key]) * old_batch // max(1, self.micro[stream.name] * self.world_size))
        fresh[key] = done
        if "slots" in fresh:  # StreamingLoader: unconsumed batch ranges per worker slot
            fresh["slots"] = [[[done, len(stream.loader)]]]
        try:
            stream.loader.load_state_dict(fresh)
        except ValueError as e:
            log.warning("stream %s cannot resume mid-epoch on another world size (%s); starting epoch %d",
                        stream.name, e, stream.epoch + 1)
            stream.start(stream.epoch + 1)

    def resume(self, plan: ResumePlan) -> None:
        client_state, rank_state = self.checkpoints.load(self.engine, plan)
        self.load_state_dict(client_state, rank_state)
        log.info("resumed from %s at step %d (%d samples seen)", plan.directory / plan.load_tag,
                 self.state.step, self.state.samples_seen)

    def save(self) -> float:
        rank_state = {"rng": capture_rng(), "loaders": {n: s.loader.state_dict() for n, s in self.streams.items()}}
        meta = {**self.opt.meta, "samples_seen": self.state.samples_seen, "epoch": self.epoch,
                "updates": dict(self.state.updates)}
        return self.checkpoints.save(self.engine, self.state.step, client_state={"trainer": self.state_dict()},
                                     rank_state=rank_state, meta=meta)

    # ----------------------------------------------------------------------- loop
    def fit(self) -> int:
        """Run until the schedule ends, `stop_at_step`, or a preemption signal. Returns the exit status."""
        if self.state.step == 0 and self.state.samples_seen == 0:
            for stream in self.streams.values():
                stream.start(stream.epoch)
        end = min(self.opt.total_steps, self.opt.stop_at_step or self.opt.total_steps)
        bar = self._progress_bar(end)
        self.engine.train()
        status, last_saved = EXIT_DONE, self.state.step
        self.meter.reset()
        try:
            while self.state.step < end:
                if self.stop is not None and self.stop.should_stop(self.state.step):
                    log.warning("stop signal (%s): saving at step %d", self.stop.received, self.state.step)
                    status = EXIT_PREEMPTED
                    break
                self._train_step()
                step = self.state.step
                row = self._evaluate_due(step)
                if step % self.opt.iters_per_epoch == 0 and self.sampler.config.stop_and_go.enabled:
                    if self.sampler.gate.end_epoch(step // self.opt.iters_per_epoch - 1):
                        row["sampler/reset"] = 1.0
                if step % self.opt.save_every == 0 and step < end:
                    row["ckpt/save_s"] = self.save()
                    last_saved = step
                if step % self.opt.log_every == 0 or step == end or any(k.startswith("val/") for k in row):
                    self._log(row, bar)
                elif row:
                    self.logger.log(step, row)
                if bar is not None:
                    bar.update(1)
            if self.state.step != last_saved or status == EXIT_PREEMPTED:
                self.logger.log(self.state.step, {"ckpt/save_s": self.save()})
        finally:
            if bar is not None:
                bar.close()
            if self._sample_log is not None:
                self._sample_log.close()
        return status

    def _train_step(self) -> None:
        engine = self.engine
        self.schedule.step()  # lr of this iteration (the original steps its schedule before the optimizer)
        keys: list[str] = []
        samples = tokens = 0
        flops = 0.0
        for name in self.sampler.tasks_at(self.state.step):
            stream = self.streams[name]
            for _ in range(self.accumulation):
                t0 = time.perf_counter()
                with torch.random.fork_rng(devices=[]):  # see the module docstring
                    batch = stream.next()
                self.meter.wait(time.perf_counter() - t0)
                if getattr(batch, "task", name) not in (name, ""):
                    raise RuntimeError(f"the {name} loader produced a batch of task {batch.task!r}")
                tokens += _token_count(batch)  # on the host copy: counting on the device would sync
                # samples = examples; FLOPs per model row (NLVR2 pairs, multiple-choice options)
                samples += len(getattr(batch, "keys", None) or ()) or batch.size
                flops += batch.size * self.opt.flops_per_sample.get(name, 0.0)
                keys.extend(getattr(batch, "keys", None) or [])
                loss, metrics = engine(batch.to(engine.device, float_dtype=self.float_dtype))
                engine.backward(loss * self.scales[name] if self.scales[name] != 1.0 else loss)
                if self.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                    self._grad_norm = _grad_norm(engine.module)  # ZeRO reports it itself; stage 0 does not
                engine.step()
                self._count(name, "#micro")
                self._add(name, "loss", loss.detach().float())
                for key, value in metrics.items():
                    if isinstance(value, Ratio):
                        self._add(name, f"{key}#num", value.num.detach().float())
                        self._add(name, f"{key}#den", value.den.detach().float())
                    elif value is not None:
                        self._add(name, key, torch.as_tensor(value).detach().float())
            norm = engine.get_global_grad_norm() if self.zero_stage > 0 else self._grad_norm
            if norm is not None:
                self._add("", "grad_norm", torch.as_tensor(norm, dtype=torch.float32))
            self._count("", "#updates")
            self.state.updates[name] += 1
            self.state.samples_seen += self.micro[name] * self.world_size * self.accumulation
        self.state.step += 1
        self.meter.step(samples, tokens, flops)
        if self.opt.log_samples:
            self._write_samples(keys)

    def _add(self, stream: str, key: str, value: torch.Tensor) -> None:
        # Sums stay on the device until the next log row: moving each value to the host here
        # would make every micro-step wait for the accelerator.
        value = value.to(self.engine.device, torch.float32)
        k = (stream, key)
        self._sums[k] = self._sums[k] + value if k in self._sums else value.clone()

    def _count(self, stream: str, key: str) -> None:
        self._counts[(stream, key)] = self._counts.get((stream, key), 0.0) + 1.0

    def _evaluate_due(self, step: int) -> dict[str, float]:
        """Collective: the tasks whose evaluation is due (the original: every multiple of the
        task's own loader length, and the last iteration); stop-and-go sees each score."""
        row: dict[str, float] = {}
        if not self.opt.evaluate or self.evaluation is None:
            return row
        for name, stream in self.streams.items():
            epoch_steps = max(1, len(stream.loader) // self.accumulation)
            if name in self.evaluation.loaders and eval_due(step, epoch_steps, self.opt.total_steps):
                result, _ = self.evaluation.run(self.engine.module.model, name, max_batches=self.opt.eval_max_batches)
                self.state.val_scores[name] = result["score"]
                row[f"val/{name}/score"] = result["score"]
                row[f"sampler/{name}/stopped"] = float(self.sampler.gate.report(name, result["score"]))
        return row

    def final_eval(self, out_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
        """Collective: every task on its evaluation split with its standard metric; the main rank
        writes the metrics and the evaluation server's prediction files."""
        results = {}
        for name in self.streams:
            if self.evaluation is not None and name in self.evaluation.loaders:
                results[name], metric = self.evaluation.run(self.engine.module.model, name, standard=True)
                if self.rank == 0:
                    self.evaluation.write(name, metric, results[name], out_dir)
        if results:
            self.logger.log(self.state.step, {f"final/{t}/{k}": v for t, r in results.items() for k, v in r.items()})
        return results

    def _log(self, extra: dict[str, float], bar=None) -> None:
        """Collective: one all-reduce of every accumulated value and the throughput counters."""
        rates = self.meter.report()
        keys, counted = sorted(self._sums), sorted(self._counts)
        accumulated = (torch.stack([self._sums[k] for k in keys]).double().cpu() if keys  # one device sync
                       else torch.zeros(0, dtype=torch.float64))
        local = torch.cat([accumulated, torch.tensor([self._counts[k] for k in counted] + [
            rates["samples_per_s"], rates["tokens_per_s"], rates["data_wait_frac"], rates["tflops"], peak_memory_gib(),
        ], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            local = local.to(self.engine.device)
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
            local = local.cpu()
        sums = dict(zip(keys + counted, local[: len(keys) + len(counted)].tolist()))
        sps, tps, wait, tflops, mem = local[len(keys) + len(counted):].tolist()
        row: dict[str, float] = {}
        for (name, key), total in sums.items():
            prefix = f"train/{name}/" if self.opt.stream_keys else "train/"
            if key.startswith("#") or key.endswith("#den") or not name:
                continue
            if key.endswith("#num"):
                row[prefix + key[:-4]] = total / max(sums[(name, f"{key[:-4]}#den")], 1.0)
            else:
                row[prefix + key] = total / max(sums[(name, "#micro")], 1.0)
        if ("", "grad_norm") in sums:
            row["opt/grad_norm"] = sums[("", "grad_norm")] / self.world_size / max(sums[("", "#updates")] / self.world_size, 1.0)
        if self.opt.stream_keys:
            probs, stopped = self.sampler.probabilities(self.state.step), self.sampler.gate.stopped()
            for name in self.streams:
                row[f"train/{name}/updates"] = float(self.state.updates[name])
                row[f"sampler/{name}/prob"] = probs[name]
                row[f"sampler/{name}/stopped"] = float(stopped[name])
        lrs, per_rank = self.schedule.get_last_lr(), 1.0 / self.world_size
        row.update({"opt/lr": max(lrs), "perf/samples_per_s": sps, "perf/samples_per_s_per_rank": sps * per_rank,
                    "perf/tokens_per_s": tps, "perf/tokens_per_s_per_rank": tps * per_rank,
                    "perf/data_wait_frac": wait * per_rank, "perf/step_s": rates["step_s"],
                    "mem/peak_gib_per_rank": mem * per_rank, "run/epoch": self.epoch,
                    "run/samples_seen": self.state.samples_seen, "run/restart_count": self.restart_count})
        if min(lrs) != max(lrs):
            row["opt/lr_min_group"] = min(lrs)
        if self.opt.flops_per_sample:
            row.update({"perf/tflops": tflops, "perf/tflops_per_rank": tflops * per_rank})
            if self.opt.peak_tflops:
                row["perf/mfu"] = tflops * per_rank / self.opt.peak_tflops
        row.update(extra)
        self.logger.log(self.state.step, row)
        if bar is not None:
            losses = {k.split("/")[-2] if self.opt.stream_keys else "loss": v for k, v in row.items()
                      if k.startswith("train/") and k.endswith("/loss")}
            bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
        self._sums, self._counts = {}, {}

    def _write_samples(self, keys: list[str]) -> None:
        if self._sample_log is None:
            directory = self.run_dir / "samples"
            directory.mkdir(parents=True, exist_ok=True)
            self._sample_log = open(directory / f"rank{self.rank:05d}.jsonl", "a", encoding="utf-8")
        self._sample_log.write(json.dumps({"step": self.state.step, "keys": keys}) + "\n")
        self._sample_log.flush()

    def _progress_bar(self, end: int):
        if self.rank != 0 or not self.opt.progress_bar:
            return None
        from tqdm import tqdm

        return tqdm(total=end, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)


def upgrade_state(client_state: dict[str, Any], rank_state: dict[str, Any] | None):
    """(trainer state, rank state) in the current layout, also from checkpoints written before the
    one training path: pretraining's "trainer" (version 1, one loader) and multi-task's "multitask"."""
    if "trainer" in client_state and client_state["trainer"].get("version") == STATE_VERSION:
        return client_state["trainer"], rank_state
    if "trainer" in client_state:  # version 1 pretraining: the stream is "train"
        t = client_state["trainer"]
        new = {"step": t["step"], "samples_seen": t["samples_seen"], "updates": {"train": t["step"]}, "val_scores": {},
               "epochs": {"train": t["epoch"]}, "loaders": {"train": t["loader"]}, "sampler": None,
               "schedule": t["schedule"], "world_size": t["world_size"], "micro_batches": {"train": t["batch_sizes"]["micro"]}}
        return new, rank_state and {"rng": rank_state["rng"], "loaders": {"train": rank_state["loader"]}}
    if "multitask" in client_state:
        m = client_state["multitask"]
        new = {"step": m["iteration"], "samples_seen": sum(m["examples"].values()), "updates": m["updates"],
               "val_scores": m["val_scores"], "epochs": m["task_epochs"], "loaders": {t: {} for t in m["tasks"]},
               "sampler": m["sampler"], "schedule": m["schedule"], "world_size": m["world_size"],
               "micro_batches": m["micro_batches"]}
        return new, rank_state
    raise CheckpointError(f"no trainer state in the checkpoint's client_state (keys: {sorted(client_state)})")


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _token_count(batch) -> int:
    """Real text tokens + real image regions of a batch (both streams' positions)."""
    count = 0
    for name in ("attention_mask", "image_mask"):
        mask = getattr(batch, name, None)
        if mask is not None:
            count += int(mask.sum())
    return count


def read_sample_log(run_dir: str | os.PathLike) -> dict[int, dict[int, list[str]]]:
    """{rank: {step: keys}} from samples/rank*.jsonl; a step written twice (a run killed after
    its last checkpoint and resumed) keeps the resumed run's entry."""
    out: dict[int, dict[int, list[str]]] = {}
    for path in sorted(Path(run_dir, "samples").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        steps: dict[int, list[str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn last line of a killed run
                steps[int(entry["step"])] = entry["keys"]
        out[rank] = steps
    return out
