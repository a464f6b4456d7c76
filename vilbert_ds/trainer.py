"""`Trainer`: a short, stateful training loop over a DeepSpeed engine.

    load -> while not done: batches -> forward -> backward -> step -> log -> maybe save

The trained module is "model + loss": `forward(batch) -> (loss, metrics)`, where metrics are
scalar tensors (averaged over micro-batches and ranks when logged) or `Ratio(num, den)` pairs
(summed, then divided: accuracies). The loader follows the vilbert-ds Loader protocol
(`__iter__` over the rest of the epoch, `__len__`, `set_epoch`, `state_dict`, `load_state_dict`).

`Trainer.state_dict()` is plain data (step, samples seen, epoch, loader position, schedule) and
goes into DeepSpeed's client_state; per-rank RNG states and loader positions go into the
checkpoint's per-rank file. At every `check_stop_every`-th step boundary all ranks agree (one
all-reduce) whether a preemption signal arrived; if so they save and `fit()` returns
`EXIT_PREEMPTED`.
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

from .checkpoint import CheckpointManager, ResumePlan, capture_rng, restore_rng
from .engine import BatchSizes, WarmupLinearSchedule
from .metrics import MetricsLogger, ThroughputMeter, peak_memory_gib
from .preemption import EXIT_STOPPED

log = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_PREEMPTED = EXIT_STOPPED  # 75, EX_TEMPFAIL: stopped by a signal after a complete checkpoint; resume with --resume auto


class Loader(Protocol):
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Ratio:
    """A metric reduced as sum(num) / sum(den) over micro-batches and ranks (e.g. accuracy)."""

    num: torch.Tensor
    den: torch.Tensor


@dataclass
class TrainerOptions:
    total_steps: int  # length of the schedule, in optimizer updates
    stop_at_step: int | None = None  # end this run there (with a checkpoint) even if the schedule is longer
    save_every: int = 1000
    log_every: int = 10
    check_stop_every: int = 1
    log_samples: bool = False
    progress_bar: bool = True
    flops_per_sample: float = 0.0  # training FLOPs of one sample (metrics.vilbert_flops(...).train)
    peak_tflops: float | None = None  # per device, for MFU
    meta: dict[str, Any] = field(default_factory=dict)  # written into each checkpoint's vilbert_ds.json


@dataclass
class TrainerState:
    step: int = 0  # optimizer updates done
    samples_seen: int = 0  # samples in those updates, all ranks
    epoch: int = 0  # loader epoch of the next batch


class Trainer:
    def __init__(
        self,
        *,
        engine,
        loader: Loader,
        schedule: WarmupLinearSchedule,
        batch_sizes: BatchSizes,
        checkpoints: CheckpointManager,
        logger: MetricsLogger,
        stop,
        options: TrainerOptions,
        rank: int = 0,
        world_size: int = 1,
        restart_count: int = 0,
        run_dir: str | os.PathLike = ".",
        float_dtype: torch.dtype = torch.float32,
        zero_stage: int = 0,
    ):
        self.engine = engine
        self.loader = loader
        self.schedule = schedule
        self.batch = batch_sizes
        self.checkpoints = checkpoints
        self.logger = logger
        self.stop = stop
        self.opt = options
        self.rank, self.world_size, self.restart_count = rank, world_size, restart_count
        self.run_dir = Path(run_dir)
        self.float_dtype = float_dtype
        self.zero_stage = zero_stage
        self.state = TrainerState()
        self.meter = ThroughputMeter(flops_per_sample=options.flops_per_sample)
        self._sums: dict[str, torch.Tensor] = {}
        self._micro = 0
        self._updates = 0
        self._grad_norm = torch.zeros(())
        self._sample_log = None
        self.first_logged: dict[str, float] = {}
        self.last_logged: dict[str, float] = {}

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain data for client_state."""
        return {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "epoch": self.state.epoch,
            "loader": self.loader.state_dict(),
            "schedule": self.schedule.state_dict(),
            "batch_sizes": self.batch.as_dict(),
            "world_size": self.world_size,
        }

    def load_state_dict(self, client_state: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        t = client_state["trainer"]
        self.state = TrainerState(step=int(t["step"]), samples_seen=int(t["samples_seen"]), epoch=int(t["epoch"]))
        self.schedule.load_state_dict(t["schedule"])
        same_world = int(t["world_size"]) == self.world_size
        if rank_state is not None and same_world:
            self.loader.load_state_dict(rank_state["loader"])
            restore_rng(rank_state["rng"])
        else:
            # Another number of ranks: each rank's stream of batches differs, so the epoch resumes
            # at the same share of samples consumed (sample-exactness is promised on the same
            # world size only); dropout RNG streams restart from (seed, step, rank).
            self._resume_rescaled(t)
            torch.manual_seed((self.state.step * 1_000_003 + self.rank) % 2**31)
            log.warning("resumed on %d ranks from a %d-rank checkpoint: data position rescaled to epoch %d, "
                        "%d batches in", self.world_size, t["world_size"], self.state.epoch,
                        self.loader.state_dict().get("consumed", self.loader.state_dict().get("batches_consumed", -1)))

    def _resume_rescaled(self, t: dict[str, Any]) -> None:
        old = t["loader"]
        self.loader.set_epoch(self.state.epoch)
        fresh = self.loader.state_dict()
        key = next((k for k in ("consumed", "batches_consumed") if k in old and k in fresh), None)
        if key is None:
            return
        samples = int(old[key]) * int(t["batch_sizes"]["micro"]) * int(t["world_size"])
        done = min(len(self.loader), samples // max(1, self.batch.micro * self.world_size))
        fresh[key] = done
        if "slots" in fresh:  # StreamingLoader: unconsumed batch ranges per worker slot
            fresh["slots"] = [[[done, len(self.loader)]]]
        try:
            self.loader.load_state_dict(fresh)
        except ValueError as e:
            log.warning("the loader cannot resume mid-epoch on another world size (%s); starting epoch %d",
                        e, self.state.epoch + 1)
            self.state.epoch += 1
            self.loader.set_epoch(self.state.epoch)

    def resume(self, plan: ResumePlan) -> None:
        client_state, rank_state = self.checkpoints.load(self.engine, plan)
        if "trainer" not in client_state:
            raise RuntimeError(f"{plan.directory / plan.tag}: no trainer state in client_state")
        self.load_state_dict(client_state, rank_state)
        log.info("resumed from %s at step %d (%d samples seen)", plan.directory / plan.load_tag,
                 self.state.step, self.state.samples_seen)

    def save(self) -> float:
        rank_state = {"rng": capture_rng(), "loader": self.loader.state_dict()}
        client_state = {"trainer": self.state_dict()}
        meta = {**self.opt.meta, "samples_seen": self.state.samples_seen, "epoch": self.state.epoch,
                "batch_sizes": self.batch.as_dict()}
        return self.checkpoints.save(self.engine, self.state.step, client_state=client_state,
                                     rank_state=rank_state, meta=meta)

    # ----------------------------------------------------------------------- loop
    def _batches(self) -> Iterator[Any]:
        while True:
            produced = False
            for batch in self.loader:
                produced = True
                yield batch
            self.state.epoch += 1
            self.loader.set_epoch(self.state.epoch)
            if not produced and len(self.loader) == 0:
                raise RuntimeError("the training loader yields no batches (empty shards or too few samples "
                                   "for one micro-batch per rank)")

    def fit(self) -> int:
        """Run until the schedule ends, `stop_at_step`, or a preemption signal. Returns the exit status."""
        if self.state.step == 0 and self.state.samples_seen == 0:
            self.loader.set_epoch(self.state.epoch)
        batches = self._batches()
        bar = self._progress_bar()
        self.engine.train()
        end = min(self.opt.total_steps, self.opt.stop_at_step or self.opt.total_steps)
        status = EXIT_DONE
        self.meter.reset()
        last_saved = self.state.step
        try:
            while self.state.step < end:
                if self.stop is not None and self.stop.should_stop(self.state.step):
                    log.warning("stop signal (%s): saving at step %d", self.stop.received, self.state.step)
                    status = EXIT_PREEMPTED
                    break
                self._train_step(batches)
                if bar is not None:
                    bar.update(1)
                step = self.state.step
                extra = {}
                if step % self.opt.save_every == 0 and step < end:
                    extra["ckpt/save_s"] = self.save()
                    last_saved = step
                if step % self.opt.log_every == 0 or step == end:
                    self._log(extra)
                    self.meter.reset()
                elif extra:
                    self.logger.log(step, extra)
            if self.state.step != last_saved or status == EXIT_PREEMPTED:
                seconds = self.save()
                self.logger.log(self.state.step, {"ckpt/save_s": seconds})
        finally:
            if bar is not None:
                bar.close()
            if self._sample_log is not None:
                self._sample_log.close()
        return status

    def _train_step(self, batches: Iterator[Any]) -> None:
        engine = self.engine
        self.schedule.step()  # lr of this update (the original steps its schedule before the optimizer)
        keys: list[str] = []
        samples = tokens = 0
        for micro in range(self.batch.accumulation):
            t0 = time.perf_counter()
            # The data pipeline may draw from the global torch RNG (a DataLoader seeds its workers
            # from it when an epoch, or a resumed epoch, starts); keep those draws out of the
            # model's dropout stream so that a resumed run continues it exactly.
            with torch.random.fork_rng(devices=[]):
                batch = next(batches)
            self.meter.wait(time.perf_counter() - t0)
            tokens += _token_count(batch)  # on the host copy: counting on the device would sync
            batch = batch.to(engine.device, float_dtype=self.float_dtype)
            loss, metrics = engine(batch)
            engine.backward(loss)
            if self.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                self._grad_norm = _grad_norm(engine.module)  # ZeRO reports it itself; stage 0 does not
            engine.step()
            self._accumulate(loss, metrics)
            samples += batch.size
            keys.extend(getattr(batch, "keys", []) or [])
        norm = engine.get_global_grad_norm() if self.zero_stage > 0 else self._grad_norm
        if norm is not None:
            self._add("grad_norm", torch.as_tensor(norm, dtype=torch.float32, device=engine.device))
        self._updates += 1
        self.state.step += 1
        self.state.samples_seen += self.batch.global_
        self.meter.step(samples, tokens)
        if self.opt.log_samples:
            self._write_samples(keys)

    def _accumulate(self, loss: torch.Tensor, metrics: dict[str, Any]) -> None:
        self._micro += 1
        self._add("loss", loss.detach().float())
        for key, value in metrics.items():
            if isinstance(value, Ratio):
                self._add(f"{key}#num", value.num.detach().float())
                self._add(f"{key}#den", value.den.detach().float())
            elif value is not None:
                self._add(key, value.detach().float())

    def _add(self, key: str, value: torch.Tensor) -> None:
        # Sums stay on the device until the next log row: moving each value to the host here
        # would make every micro-step wait for the accelerator.
        value = value.to(self.engine.device)
        self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()

    def _log(self, extra: dict[str, float]) -> None:
        """Collective: one all-reduce of every accumulated value and the throughput counters."""
        rates = self.meter.report()
        keys = sorted(self._sums)
        n_updates = max(1, self._updates)
        accumulated = torch.stack([self._sums[k].double() for k in keys]).cpu() if keys else torch.zeros(0, dtype=torch.float64)
        local = torch.cat([accumulated, torch.tensor([
            float(self._micro), rates["samples_per_s"], rates["tokens_per_s"], rates["data_wait_frac"], peak_memory_gib(),
        ], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            local = local.to(self.engine.device)
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
            local = local.cpu()
        sums = dict(zip(keys, local[: len(keys)].tolist()))
        micro, sps, tps, wait, mem = local[len(keys):].tolist()
        row: dict[str, float] = {}
        for key, total in sums.items():
            if key.endswith("#den"):
                continue
            if key.endswith("#num"):
                name = key[:-4]
                row[f"train/{name}"] = total / max(sums[f"{name}#den"], 1.0)
            elif key == "grad_norm":
                row["opt/grad_norm"] = total / self.world_size / n_updates
            else:
                row[f"train/{key}"] = total / max(micro, 1.0)
        lrs = self.schedule.get_last_lr()
        row["opt/lr"] = max(lrs)
        if min(lrs) != max(lrs):
            row["opt/lr_min_group"] = min(lrs)
        row["perf/samples_per_s"] = sps
        row["perf/samples_per_s_per_rank"] = sps / self.world_size
        row["perf/tokens_per_s"] = tps
        row["perf/tokens_per_s_per_rank"] = tps / self.world_size
        row["perf/data_wait_frac"] = wait / self.world_size
        row["perf/step_s"] = rates["step_s"]
        if self.opt.flops_per_sample:
            tflops_per_rank = sps / self.world_size * self.opt.flops_per_sample / 1e12
            row["perf/tflops_per_rank"] = tflops_per_rank
            row["perf/tflops"] = tflops_per_rank * self.world_size
            if self.opt.peak_tflops:
                row["perf/mfu"] = tflops_per_rank / self.opt.peak_tflops
        row["mem/peak_gib_per_rank"] = mem / self.world_size
        row["run/epoch"] = self.state.epoch
        row["run/samples_seen"] = self.state.samples_seen
        row["run/restart_count"] = self.restart_count
        row.update(extra)
        self.logger.log(self.state.step, row)
        if not self.first_logged:
            self.first_logged = dict(row)
        self.last_logged = dict(row)
        self._sums, self._micro, self._updates = {}, 0, 0

    def _write_samples(self, keys: list[str]) -> None:
        if self._sample_log is None:
            directory = self.run_dir / "samples"
            directory.mkdir(parents=True, exist_ok=True)
            self._sample_log = open(directory / f"rank{self.rank:05d}.jsonl", "a", encoding="utf-8")
        self._sample_log.write(json.dumps({"step": self.state.step, "keys": keys}) + "\n")
        self._sample_log.flush()

    def _progress_bar(self):
        if self.rank != 0 or not self.opt.progress_bar:
            return None
        from tqdm import tqdm

        end = min(self.opt.total_steps, self.opt.stop_at_step or self.opt.total_steps)
        return tqdm(total=end, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                    mininterval=2.0)


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
