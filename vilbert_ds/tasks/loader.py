"""Task loaders on the data area's streaming reader.

- Training: `build_task_loader` = the data area's `StreamingLoader` (same epoch plan, rank split,
  worker layout and exact resume as pretraining) in uniform order (each epoch a uniformly random
  order of the split, as the original's RandomSampler, however the shards group it) with the
  family's preprocess + collate as its batch function (`TaskBatchMaker`).
- Evaluation: `EvalLoader` covers *every* sample of a split: rank r reads the contiguous slice
  [r*S, (r+1)*S) of the set (S = ceil(N / world_size)) and pads its last batches by repeating
  samples of its own slice, so every rank runs the same number of batches (no rank waits in a
  collective) and the padded repeats are dropped when the per-example records are merged
  (`TaskMetric`: a union keyed by example id).

Task samples reach the family as a mapping of members (`sample_dict`): "__key__", "json"
(image metadata), "features.npy", "boxes.npy" (decoded), plus the undecoded extra members
("task.json", "img1.*", "gt.*") that `data.sample.Sample.extra` carries.
"""
from __future__ import annotations

import math
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..checkpoint import atomic_write_text
from ..data.cc_batches import read_options
from ..data.config import DataConfig
from ..data.manifest import Manifest, load_source
from ..data.sample import Sample
from ..data.stream import Source, StreamingLoader, StreamStats, read_samples, sample_rng, worker_sigterm_guard
from .base import TaskBatch, TaskFamily


def sample_dict(sample: Sample) -> dict[str, Any]:
    """A decoded shard sample as the mapping `TaskFamily.preprocess` reads."""
    extra = getattr(sample, "extra", None)
    if extra is None:
        raise RuntimeError("data.sample.Sample has no `extra` members: task shards need the data area's Sample.extra")
    return {"__key__": sample.key, "__url__": sample.shard, "json": sample.meta, "features.npy": sample.features,
            "boxes.npy": sample.boxes, **extra}


class TaskBatchMaker:
    """(samples, epoch) -> TaskBatch: the family's preprocess per sample (rng seeded by
    (seed, epoch, key)) then its collate. Runs inside the loader's workers."""

    def __init__(self, family: TaskFamily, seed: int):
        self.family = family
        self.seed = seed

    def setup(self) -> None:
        """Nothing to load: the family carries its tokenizer; assets load on first use."""

    def __call__(self, samples: list[Sample], epoch: int) -> TaskBatch:
        examples = [self.family.preprocess(sample_dict(s), sample_rng(self.seed, epoch, s.key)) for s in samples]
        return self.family.collate(examples)


def split_manifest(family: TaskFamily, split: str, data: DataConfig) -> Manifest:
    url = f"{family.config.split_dir(split)}/manifest.json"
    try:
        return load_source(url, data.storage_options, retries=data.max_retries, backoff_s=data.retry_backoff_s)
    except Exception as exc:  # noqa: BLE001 - add which task and how to build it
        raise FileNotFoundError(f"task {family.name!r} split {split!r}: cannot read {url} ({exc}); build the task "
                                f"shards with `vilbert-ds shards task --task {family.name}`") from None


def build_task_loader(family: TaskFamily, split: str, data: DataConfig, *, rank: int, world_size: int,
                      micro_batch_size: int, seed: int, shuffle: bool = True) -> StreamingLoader:
    """The training Loader of one task on one rank (see `data.stream.StreamingLoader`)."""
    manifest = split_manifest(family, split, data)
    return StreamingLoader([Source(manifest)], rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                           seed=seed, make_batch=TaskBatchMaker(family, seed), num_workers=data.num_workers,
                           prefetch_factor=data.prefetch_factor, shuffle=data.shuffle and shuffle,
                           shuffle_buffer=None, read=read_options(data, [manifest]),
                           name=f"{family.name}/{split}")


# ------------------------------------------------------------------------------ evaluation
def eval_positions(total: int, rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
    """Sample indices of each eval batch of one rank: its contiguous slice, the last batch
    padded by repeating the slice from its start (or the set's first samples when the slice is
    empty). Every rank gets ceil(ceil(total / world) / micro_batch) batches."""
    per_rank = math.ceil(total / world_size)
    batches = max(1, math.ceil(per_rank / micro_batch))
    start = min(rank * per_rank, total)
    mine = list(range(start, min(start + per_rank, total))) or list(range(min(per_rank, total) or 1))
    padded = [mine[i % len(mine)] for i in range(batches * micro_batch)]
    return [padded[b * micro_batch:(b + 1) * micro_batch] for b in range(batches)]


class _EvalDataset(IterableDataset):
    def __init__(self, loader: "EvalLoader"):
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[TaskBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(worker, len(self.loader.batches), workers):  # the DataLoader yields them round-robin: in order
            yield self.loader.read_batch(b)


class EvalLoader:
    """All samples of a split, sliced over ranks, equal batch counts (module docstring)."""

    def __init__(self, family: TaskFamily, split: str, data: DataConfig, *, rank: int, world_size: int,
                 micro_batch_size: int, num_workers: int | None = None):
        self.family, self.split, self.data = family, split, data
        self.manifest = split_manifest(family, split, data)
        self.total = self.manifest.num_samples
        if self.total == 0:
            raise ValueError(f"task {family.name!r} split {split!r}: the shard set is empty")
        self.batches = eval_positions(self.total, rank, world_size, micro_batch_size)
        self.read = read_options(data, [self.manifest])
        self.num_workers = data.num_workers if num_workers is None else num_workers
        self.make = TaskBatchMaker(family, seed=0)
        starts = np.cumsum([0] + [s.count for s in self.manifest.shards])
        self._starts = starts

    def __len__(self) -> int:
        return len(self.batches)

    def read_batch(self, b: int) -> TaskBatch:
        by_shard: dict[int, list[int]] = {}
        for g in sorted(set(self.batches[b])):
            shard = int(np.searchsorted(self._starts, g, side="right") - 1)
            by_shard.setdefault(shard, []).append(g - int(self._starts[shard]))
        got: dict[int, Sample] = {}
        for shard, local in by_shard.items():
            for i, sample in read_samples(self.manifest.shards[shard], local, self.read, StreamStats(), set()).items():
                if not isinstance(sample, Sample):
                    raise RuntimeError(f"task {self.family.name!r} split {self.split!r}: {sample.reason}")
                got[int(self._starts[shard]) + i] = sample
        return self.make([got[g] for g in self.batches[b]], 0)

    def __iter__(self) -> Iterator[TaskBatch]:
        if self.num_workers > 0 and len(self.batches) > 1:
            loader = DataLoader(_EvalDataset(self), batch_size=None, num_workers=min(self.num_workers, len(self.batches)),
                                multiprocessing_context="fork", worker_init_fn=worker_sigterm_guard())
            yield from loader
        else:
            for b in range(len(self.batches)):
                yield self.read_batch(b)


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, family: TaskFamily, loader: EvalLoader, device: torch.device | str,
                  float_dtype: torch.dtype = torch.float32, max_batches: int | None = None):
    """Runs the model over the loader on this rank; returns this rank's `TaskMetric` (call
    `.gather()` for the merged one). The caller sets eval mode."""
    metric = family.new_metric()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device, float_dtype=float_dtype)
        metric.update(family.score(family.forward(model, batch), batch))
    return metric


class Evaluation:
    """The evaluation splits of a run's tasks: scored during training (stop-and-go reads the
    scores), at the end of training, and by `vilbert-ds eval`. Collective like the loaders."""

    def __init__(self, families: Mapping[str, TaskFamily], loaders: Mapping[str, EvalLoader],
                 device: torch.device | str, float_dtype: torch.dtype = torch.float32):
        self.families, self.loaders = dict(families), dict(loaders)
        self.device, self.float_dtype = device, float_dtype

    def run(self, model: torch.nn.Module, task: str, *, max_batches: int | None = None, standard: bool = False,
            zero_shot: bool = False, protocol: str = "full"):
        """(result, merged metric) of one task. During training (`standard=False`) every family
        is scored per batch, as the original's validation was (retrieval: the 4-option accuracy),
        capped at `max_batches`. `standard=True` gives the task's standard metric: a family whose
        metric is not per example (retrieval ranks every caption against every image) evaluates
        the whole split itself (`evaluate_split`), under `protocol` ("paper": retrieval's
        published-numbers protocol; families scored per batch have only the one)."""
        family, loader = self.families[task], self.loaders[task]
        evaluate_split = getattr(family, "evaluate_split", None) if standard else None
        was_training = model.training
        model.eval()
        try:
            if evaluate_split is not None:
                extra = {"protocol": protocol} if protocol != "full" else {}
                metric = evaluate_split(model, loader, self.device, float_dtype=self.float_dtype, zero_shot=zero_shot,
                                        **extra)
            else:
                metric = evaluate_task(model, family, loader, self.device, self.float_dtype, max_batches).gather()
        finally:
            model.train(was_training)
        return metric.result(), metric

    def write(self, task: str, metric, result: Mapping[str, float], out_dir: str | Path) -> Path:
        """`<task>_<split>_predictions.json` (the evaluation server's format) and
        `<task>_<split>_metrics.json` under `out_dir` (main rank only)."""
        out, split = Path(out_dir), self.loaders[task].split
        out.mkdir(parents=True, exist_ok=True)
        self.families[task].write_predictions(metric, out / f"{task}_{split}_predictions.json")
        path = out / f"{task}_{split}_metrics.json"
        atomic_write_text(path, json.dumps(dict(result), indent=1) + "\n")  # never a torn metrics file
        return path
