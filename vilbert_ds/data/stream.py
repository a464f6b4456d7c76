"""The streaming loader: manifest -> epoch plan -> rank range -> sample order -> workers -> batches.

Stages (each a small function or class below):
1. `EpochPlan`: the epoch's sequence of (shard, sample range) segments, from the manifests of one
   or more weighted sources, shard order shuffled (or resampled) with (seed, epoch). N samples.
   With a node-local shard cache (`cache.py`) whose bound holds each node's share, the plan is
   node-stable: the shards are dealt to the nodes once (`node_shards`), and each node's plan
   covers only its shards (shuffled with (seed, node, epoch)), split over the node's ranks as
   below, so from the second epoch on a node reads only its local copies.
2. Rank split: every rank gets the same number of batches B = N // (world_size * micro_batch)
   (the remainder, < world_size * micro_batch samples, is left out of this epoch and changes
   every epoch). Counts come from the manifest, before any byte is read, so no rank can run dry
   inside a collective.
3. Sample order O of the rank (batch i = O[i*mb:(i+1)*mb]), one of two, both functions of
   (seed, epoch, rank) only, never of the number of workers:
   - shuffle windows (`shuffle_buffer` samples): rank r owns the contiguous range
     [r*S, (r+1)*S) of the sequence (S = B * micro_batch), cut into windows of
     shuffle_buffer // world_size samples, each permuted with (seed, epoch, rank, window). The
     original mixes its pretraining stream the same way (tensorpack LocallyShuffleData over each
     rank's part with a 5000 // world_size sample buffer, `train_concap.py`). Reads are
     contiguous byte spans.
   - uniform (`shuffle_buffer=None`): one permutation of all N samples with (seed, epoch); rank r
     takes positions [r*S, (r+1)*S) of it. Every batch is a uniform draw from the whole set,
     however the shards group samples (task shards are written grouped by image; the original's
     task loaders sample uniformly). Each sample is a ranged read of its own bytes (the
     manifest's per-sample offsets), several in flight.
4. Workers: the batches not yet consumed (a list of ranges, initially [0, B)) are split into
   contiguous blocks, one per DataLoader worker. A worker reads its samples one read unit at a
   time (a window, or a group of ~READ_GROUP_BYTES in uniform order), the next unit in a
   background thread while this one is masked and collated (ranged reads, parallel, resumed at
   the exact byte after a broken connection), decodes only the samples it needs, and yields
   whole batches. The DataLoader hands out batches round-robin over workers, so after c consumed
   batches worker w has delivered c//W + (w < c%W) of them.
   The workers live as long as the loader (persistent): each iteration's epoch and batch ranges
   reach them through a small shared-memory table (`EpochControl`) written before the iteration
   starts, so no process is forked per epoch. A fork charges the child everything the training
   process has committed (its whole heap); forked once per run, at the first iteration, a
   worker costs that once.
5. Resume: `state_dict()` records the still-unconsumed batch ranges of O (a few integers);
   `load_state_dict()` makes the next iteration split exactly those over the workers (any
   worker count). A worker that starts inside a window reads that window again and drops the
   samples before its start: at most one window is re-read per worker.

Errors: an unreadable shard is retried (storage.RangeReader), then raises `ShardReadError`
naming its URL (on_error="fail"), or is logged, counted and its samples are substituted
(on_error="skip"). A corrupt sample raises `SampleError` naming shard and key, or is counted and
substituted. Substitutes are other samples of the same read unit, so batch shapes and counts
never change; every substitution is counted and reported at the end of the epoch.
"""
from __future__ import annotations

import atexit
import bisect
import concurrent.futures as cf
import hashlib
import json
import logging
import os
import signal
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import hostmem
from . import storage
from .cache import CacheSpec, CacheStats, shard_cache
from .manifest import Manifest, ShardInfo
from .sample import Sample, SampleError, decode
from .tario import TarFormatError, parse_sample, split_name

log = logging.getLogger(__name__)

STATE_VERSION = 1
REPORTS_ENV = "VILBERT_DS_LOADER_REPORTS"  # a directory: each loader appends its epoch reports there


def key_seed(key: str) -> tuple[int, int]:
    """Two 32-bit words from a sample key: stable across processes (unlike hash())."""
    h = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's randomness (masking, negatives): (seed, epoch, key) only.
    One 64-bit hash of the three seeds an SFC64 generator (cheap to create per sample, unlike
    default_rng(list), which costs ~10x more)."""
    h = hashlib.blake2b(f"{seed}\x00{epoch}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return np.random.Generator(np.random.SFC64(int.from_bytes(h, "little")))


# ---------------------------------------------------------------------------------------------
# shared-memory batch buffers (DataLoader workers -> training process)


def batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a collate to write a large batch field into. In a DataLoader
    worker it comes from the worker's `BatchArena`: shared memory that the training process
    maps without a copy and that is reused once the training process has let go of the batch.
    Elsewhere it is a plain `torch.empty`."""
    if _ARENA is None:
        return torch.empty(tuple(shape), dtype=dtype)
    return _ARENA.alloc(tuple(shape), dtype)


_ARENA: "BatchArena | None" = None  # set around each collate call in a worker process


def _new_shared(nbytes: int) -> torch.UntypedStorage:
    """A shared-memory storage (as torch's own default_collate allocates in workers)."""
    return torch.UntypedStorage._new_shared(nbytes)


class BatchArena:
    """Shared-memory buffers for the large tensors of the batches one DataLoader worker sends.

    Why: a worker's batch must end up in shared memory to reach the training process. Allocated
    fresh for every batch, its pages are faulted in and zeroed by the kernel each time (~8.6 MB
    per CC batch of 32; 7.5 ms per batch on the 2-core test VM, more than the whole collate).
    The arena keeps `slots` sets of buffers and reuses a slot only when the training process
    has released the batch last sent from it: the loader marks a slot released once none of its
    storages is referenced in the training process any more (`StorageWeakRef`), by writing the
    slot's generation into `released` [workers, slots] (a shared int64 tensor created before
    the workers fork). A worker never waits for a slot: with none free, a batch gets fresh
    shared memory (the plain behaviour), so a trainer that keeps batches only costs speed.
    """

    def __init__(self, released: torch.Tensor, worker: int):
        self.released = released[worker]  # [slots] int64 view, written by the training process
        self.worker = worker
        slots = released.shape[1]
        self.sent = [0] * slots  # generation of the last batch sent from each slot (0: none)
        self.buffers: list[list[torch.UntypedStorage]] = [[] for _ in range(slots)]
        self.slot: int | None = None  # slot of the batch being built (None: fresh memory)
        self.used = 0  # allocations made for the batch being built
        self.fresh: list[torch.UntypedStorage] = []

    def begin(self) -> None:
        free = [j for j, g in enumerate(self.sent) if g == 0 or int(self.released[j]) == g]
        self.slot = free[0] if free else None
        self.used = 0
        self.fresh = []

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if self.slot is None:
            storage = _new_shared(nbytes)
            self.fresh.append(storage)
        else:
            bufs = self.buffers[self.slot]
            if self.used < len(bufs) and bufs[self.used].nbytes() >= nbytes:
                storage = bufs[self.used]
            else:  # first use of this slot (or a larger request): a new buffer from now on
                storage = _new_shared(nbytes)
                bufs[self.used:self.used + 1] = [storage]
            self.used += 1
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def end(self) -> tuple[int, int, int, list[torch.Tensor]] | None:
        """The lease sent with the batch: (worker, slot, generation, one empty tensor per
        storage used, so the training process can watch the storages), or None."""
        if self.slot is None:
            return None
        self.sent[self.slot] += 1
        tokens = [torch.empty(0, dtype=torch.uint8).set_(st, 0, (0,)) for st in self.buffers[self.slot][:self.used]]
        return self.worker, self.slot, self.sent[self.slot], tokens


class _Leases:
    """Training-process side of `BatchArena`: watches the storages of received batches and marks
    a slot released when none of them is referenced any more."""

    def __init__(self, released: torch.Tensor):
        from torch.multiprocessing.reductions import StorageWeakRef

        self.released = released
        self.weak = StorageWeakRef
        self.pending: list[tuple[int, int, int, list]] = []

    def add(self, lease) -> None:
        if lease is not None:
            worker, slot, gen, tokens = lease
            self.pending.append((worker, slot, gen, [self.weak(t.untyped_storage()) for t in tokens]))

    def collect(self) -> None:
        still = []
        for worker, slot, gen, refs in self.pending:
            if all(r.expired() for r in refs):
                self.released[worker, slot] = gen
            else:
                still.append((worker, slot, gen, refs))
        self.pending = still


# ---------------------------------------------------------------------------------------------
# 1. epoch plan


@dataclass
class Source:
    manifest: Manifest
    weight: float = 1.0


@dataclass(frozen=True)
class Segment:
    shard: int  # index into EpochPlan.shards
    start: int  # first sample (within the shard)
    end: int  # one past the last sample


def node_shards(sources: Sequence[Source], nodes: int, seed: int) -> list[list[list[int]]]:
    """The shards each node keeps for the whole run: [node][source] -> shard indices. Each
    source's shards are dealt largest first to the node with the fewest samples so far (ties:
    a seeded shuffle, then the lower node), so nodes hold near-equal sample counts. A function
    of (shard counts, nodes, seed) only: every rank computes the same deal."""
    out: list[list[list[int]]] = [[[] for _ in sources] for _ in range(nodes)]
    for j, src in enumerate(sources):
        counts = [s.count for s in src.manifest.shards]
        order = np.random.default_rng([seed & 0xFFFFFFFF, j, 0xCAC4E]).permutation(len(counts))
        load = [0] * nodes
        for i in sorted((int(i) for i in order if counts[i] > 0), key=lambda i: -counts[i]):  # stable: keeps ties shuffled
            k = min(range(nodes), key=lambda n: (load[n], n))
            out[k][j].append(i)
            load[k] += counts[i]
    for per_source in out:
        for ids in per_source:
            ids.sort()
    return out


class EpochPlan:
    """The ordered segments of one epoch over all sources; `locate(i)` maps a sequence index to
    (shard index, sample index within shard)."""

    def __init__(self, sources: Sequence[Source], *, seed: int, epoch: int, shuffle: bool = True,
                 resampled: bool = False, epoch_samples: int | None = None):
        self.shards: list[ShardInfo] = []
        per_source: list[list[int]] = []
        for src in sources:
            ids = [len(self.shards) + i for i, s in enumerate(src.manifest.shards) if s.count > 0]
            self.shards.extend(src.manifest.shards)
            per_source.append(ids)
        if not any(per_source):
            raise ValueError("the data sources hold no samples: " + ", ".join(storage.safe_url(s.manifest.url) for s in sources))
        total = sum(s.count for s in self.shards)
        target = epoch_samples if epoch_samples is not None else total
        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5EED])
        weights = np.array([src.weight if ids else 0.0 for src, ids in zip(sources, per_source)], dtype=np.float64)
        mean_count = np.array([np.mean([self.shards[i].count for i in ids]) if ids else 1.0 for ids in per_source])
        # choose a source per shard slot with p ~ weight / mean shard size: sample shares ~ weights
        slot_p = weights / mean_count
        slot_p = slot_p / slot_p.sum()
        streams = [self._shard_stream(ids, rng, shuffle, resampled) for ids in per_source]
        segments: list[Segment] = []
        n = 0
        single = len(sources) == 1
        while n < target:
            s = 0 if single else int(rng.choice(len(streams), p=slot_p))
            shard = next(streams[s])
            take = min(self.shards[shard].count, target - n)
            segments.append(Segment(shard, 0, take))
            n += take
        self.epoch = epoch
        self.segments = segments
        self.starts = np.cumsum([0] + [seg.end - seg.start for seg in segments]).tolist()
        self.total = n

    def _shard_stream(self, ids: list[int], rng: np.random.Generator, shuffle: bool, resampled: bool) -> Iterator[int]:
        if not ids:
            return iter(())
        if resampled:
            counts = np.array([self.shards[i].count for i in ids], dtype=np.float64)
            p = counts / counts.sum()

            def draws():
                while True:
                    yield ids[int(rng.choice(len(ids), p=p))]
            return draws()

        def cycles():
            while True:  # epoch_samples beyond the source size cycles through it again, re-shuffled
                order = rng.permutation(len(ids)) if shuffle else range(len(ids))
                for j in order:
                    yield ids[int(j)]
        return cycles()

    def locate(self, index: int) -> tuple[int, int]:
        j = bisect.bisect_right(self.starts, index) - 1
        seg = self.segments[j]
        return j, seg.start + index - self.starts[j]


_PARENT_EXITING: torch.Tensor | None = None  # shared with forked workers: 1 once their parent is exiting


def worker_sigterm_guard() -> Callable[[int], None]:
    """The DataLoader `worker_init_fn` of every loader that forks workers: a worker ignores
    SIGTERM until its parent process is exiting.

    A scheduler's SIGTERM (a time limit, a preemption without warning) reaches every process of
    a rank, its loader workers included. torch's worker handler ends a worker on a SIGTERM that
    does not come from its parent, and the rank then fails with "DataLoader worker ... killed by
    signal: Terminated" before it can save. The rank decides when to stop
    (`preemption.StopSignal`, at the next step boundary); its workers end with its loader (the
    loader's done event). When the parent exits with a loader still open (a run that stops
    mid-epoch), Python's multiprocessing ends the daemonic workers with SIGTERM and waits for
    them: an exit hook registered here (it runs before multiprocessing's) marks the parent as
    exiting, and a worker then ends on that SIGTERM. Ignoring it always made such a process wait
    for its workers forever."""
    global _PARENT_EXITING
    if _PARENT_EXITING is None:
        _PARENT_EXITING = torch.zeros(1, dtype=torch.int8).share_memory_()
        atexit.register(_PARENT_EXITING.fill_, 1)
    return _guard_sigterm


def _guard_sigterm(worker_id: int) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _PARENT_EXITING is not None and int(_PARENT_EXITING[0]):
        os._exit(0)  # the parent is exiting: nothing of this worker is needed


# ---------------------------------------------------------------------------------------------
# 2-3. rank split and sample order


@dataclass(frozen=True)
class RankLayout:
    """Sample order of one rank: batch i = positions [i*mb, (i+1)*mb) of O.

    `window` > 0: shuffle windows of that many samples over the rank's contiguous range;
    `window` == 0: uniform order (one permutation of the whole epoch, sliced by rank), read in
    groups of `group` positions."""

    total: int  # N samples in the epoch plan
    rank: int
    world_size: int
    micro_batch: int
    window: int  # samples per shuffle window; 0 = uniform order
    shuffle: bool
    seed: int
    epoch: int
    group: int = 1  # uniform order: positions read together (a read unit); no effect on the order

    @property
    def batches(self) -> int:
        return self.total // (self.world_size * self.micro_batch)

    @property
    def samples(self) -> int:
        return self.batches * self.micro_batch

    @property
    def base(self) -> int:
        return self.rank * self.samples

    @property
    def uniform(self) -> bool:
        return self.window == 0 and self.shuffle

    def unit(self, positions: np.ndarray) -> np.ndarray:
        """Read unit of each O-position: its window, or its read group in uniform order."""
        return positions // (self.group if self.uniform else self.window)

    def window_perm(self, j: int) -> np.ndarray:
        length = min(self.window, self.samples - j * self.window)
        if not self.shuffle:
            return np.arange(length)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, self.rank, j, 0x51DE])
        return rng.permutation(length)

    def epoch_perm(self) -> np.ndarray:
        """Uniform order: the permutation of the epoch's N sequence indices; rank r's O-position p
        is entry r*S + p. The same on every rank (seeded without the rank)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, 0x0F1F])
        return rng.permutation(self.total)

    def sequence_index(self, positions: np.ndarray, perms: dict[int, np.ndarray]) -> np.ndarray:
        """Epoch-sequence indices of O-positions (perms: cache of window permutations, or of the
        epoch permutation under key -1)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.uniform:
            perm = perms.get(-1)
            if perm is None:
                perm = perms[-1] = self.epoch_perm()
            return perm[self.base + positions]
        windows = positions // self.window
        out = np.empty(len(positions), dtype=np.int64)
        for j in np.unique(windows).tolist():
            sel = windows == j
            perm = perms.get(j)
            if perm is None:
                perm = perms[j] = self.window_perm(j)
            out[sel] = self.base + j * self.window + perm[positions[sel] - j * self.window]
        return out


def split_ranges(ranges: Sequence[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Splits the batches of `ranges` into `parts` contiguous blocks, the first R % parts one
    batch longer (the order the DataLoader's round-robin assumes)."""
    total = sum(b - a for a, b in ranges)
    sizes = [total // parts + (1 if w < total % parts else 0) for w in range(parts)]
    out: list[list[tuple[int, int]]] = []
    it = iter(ranges)
    cur = next(it, None)
    for size in sizes:
        block: list[tuple[int, int]] = []
        while size > 0 and cur is not None:
            a, b = cur
            take = min(size, b - a)
            block.append((a, a + take))
            size -= take
            cur = (a + take, b) if a + take < b else next(it, None)
        out.append(block)
    return out


class WorkerRoundRobin:
    """Which batches each DataLoader worker slot still has to deliver.

    The DataLoader asks its workers in cyclic order and skips exhausted ones, so the consumer
    sees slot `next`'s first batch, then the next non-empty slot's, and so on. Counting the
    batches the consumer took is therefore enough to know every slot's position.
    """

    def __init__(self, slots: list[list[tuple[int, int]]]):
        self.slots = [[(int(a), int(b)) for a, b in slot if b > a] for slot in slots]
        self.next = self._advance(0)

    def _advance(self, start: int) -> int:
        n = len(self.slots)
        for i in range(n):
            j = (start + i) % n
            if self.slots[j]:
                return j
        return 0

    def take(self) -> int:
        """Marks the next delivered batch consumed; returns its batch index."""
        slot = self.slots[self.next]
        if not slot:
            raise RuntimeError("the data loader delivered more batches than it planned (a bug)")
        a, b = slot[0]
        slot[0] = (a + 1, b)
        if a + 1 == b:
            slot.pop(0)
        self.next = self._advance(self.next + 1)
        return a

    def remaining(self) -> int:
        return sum(b - a for slot in self.slots for a, b in slot)

    def rotated(self) -> list[list[tuple[int, int]]]:
        """Slots starting with the one that delivers next: a new DataLoader with these blocks
        (worker i gets entry i) continues in exactly the same batch order."""
        n = len(self.slots)
        return [list(self.slots[(self.next + i) % n]) for i in range(n)]

    def merged(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for a, b in sorted(r for slot in self.slots for r in slot):
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out


# ---------------------------------------------------------------------------------------------
# 4. reading samples


@dataclass
class StreamStats:
    """Counters a worker sends with each batch (deltas) and the loader sums per epoch."""

    samples: int = 0
    substituted: int = 0
    corrupt: int = 0
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    resumed: int = 0
    # node-local cache (data/cache.py): whole shards downloaded from the bucket, and cached
    # copies refused (size / sha256 not the manifest's); `bytes` above are then local reads
    cache_downloads: int = 0
    cache_download_bytes: int = 0
    cache_download_requests: int = 0
    cache_refused: int = 0
    bad_shards: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # first few messages, for the report
    workers: dict[int, int] = field(default_factory=dict)  # worker pid -> committed bytes at its last batch

    def add(self, other: "StreamStats") -> None:
        for name in ("samples", "substituted", "corrupt", "bytes", "requests", "retries", "resumed", "cache_downloads",
                     "cache_download_bytes", "cache_download_requests", "cache_refused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bad_shards.extend(u for u in other.bad_shards if u not in self.bad_shards)
        self.errors.extend(other.errors[: max(0, 20 - len(self.errors))])
        self.workers.update(other.workers)

    def as_dict(self) -> dict[str, Any]:
        return dict(samples=self.samples, substituted=self.substituted, corrupt=self.corrupt, bytes=self.bytes,
                    requests=self.requests, retries=self.retries, resumed=self.resumed,
                    cache_downloads=self.cache_downloads, cache_download_bytes=self.cache_download_bytes,
                    cache_download_requests=self.cache_download_requests, cache_refused=self.cache_refused,
                    bad_shards=list(self.bad_shards), errors=list(self.errors), workers=dict(self.workers))


class _Missing:
    """Marker for a sample that could not be read or decoded (counted, then substituted)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class ReadOptions:
    storage_options: dict
    chunk_bytes: int
    parallel: int
    retries: int
    backoff_s: float
    on_error: str
    feature_dim: int
    num_classes: int | None
    cache: CacheSpec | None = None  # read remote shards through the node-local cache


def _span(chunks: deque, start: int, end: int):
    """Bytes [start, end) from the (offset, memoryview) chunks: a zero-copy view when they lie in
    one chunk, else a joined copy."""
    pieces = []
    for off, mv in chunks:
        if off + len(mv) <= start:
            continue
        if off >= end:
            break
        pieces.append(mv[max(start - off, 0):min(end - off, len(mv))])
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


# A gap of at most this many bytes between two wanted samples of a shard is read through: one
# request instead of two. Object stores: a request's latency (~20-50 ms) is worth ~1-4 MB of
# bandwidth. Local files: a separate read costs microseconds, the bytes skipped are not copied.
REMOTE_GAP_BYTES = 1 << 20
LOCAL_GAP_BYTES = 0


def sample_runs(shard: ShardInfo, local_ids: Sequence[int]) -> list[list[int]]:
    """`local_ids` (sorted, unique) cut into runs that one ranged read each covers: adjacent
    samples, and across gaps of at most REMOTE_GAP_BYTES / LOCAL_GAP_BYTES."""
    gap = LOCAL_GAP_BYTES if storage.is_local(shard.url) else REMOTE_GAP_BYTES
    runs: list[list[int]] = []
    for i in local_ids:
        if runs and shard.offsets[i] - shard.offsets[runs[-1][-1] + 1] <= gap:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def read_samples(shard: ShardInfo, local_ids: Sequence[int], opts: ReadOptions, stats: StreamStats,
                 dead: set[str]) -> dict[int, Sample | _Missing]:
    """Reads the samples `local_ids` (sorted, unique) of one shard, one ranged read per run of
    them (`sample_runs`: a contiguous range is one read, scattered samples are read alone);
    returns local id -> Sample or _Missing. Decoded arrays are views into the read chunks (no
    copy)."""
    out: dict[int, Sample | _Missing] = {}
    url = storage.safe_url(shard.url)
    if shard.url in dead:
        return {i: _Missing(f"{url}: unreadable (skipped)") for i in local_ids}
    rstats = storage.ReadStats()
    try:
        if opts.cache is not None and not storage.is_local(shard.url):
            cstats = CacheStats()
            cache = shard_cache(opts.cache, storage_options=opts.storage_options, chunk_bytes=opts.chunk_bytes,
                                parallel=opts.parallel, retries=opts.retries, backoff_s=opts.backoff_s)
            try:
                with cache.open(shard, cstats) as path:
                    copy = replace(shard, url=path)  # same offsets; read from local disk
                    for run in sample_runs(copy, local_ids):
                        _read_run(copy, run, opts, stats, rstats, url, out)
            finally:
                stats.cache_downloads += cstats.downloads
                stats.cache_download_bytes += cstats.download_bytes
                stats.cache_download_requests += cstats.download_requests
                stats.cache_refused += cstats.refused
        else:
            for run in sample_runs(shard, local_ids):
                _read_run(shard, run, opts, stats, rstats, url, out)
    except storage.ShardReadError as e:
        if opts.on_error == "fail":
            raise
        log.error("skipping unreadable shard %s: %s", url, e)
        dead.add(shard.url)
        stats.bad_shards.append(url)
        if len(stats.errors) < 20:
            stats.errors.append(str(e))
        for i in local_ids:
            out.setdefault(i, _Missing(str(e)))
    finally:
        stats.bytes += rstats.bytes
        stats.requests += rstats.requests
        stats.retries += rstats.retries
        stats.resumed += rstats.resumed
    return out


def _read_run(shard: ShardInfo, run: list[int], opts: ReadOptions, stats: StreamStats, rstats: storage.ReadStats,
              url: str, out: dict[int, Sample | _Missing]) -> None:
    """One ranged read over the span of `run` (sorted local ids), decoding the wanted samples
    into `out` as their bytes arrive."""
    start, end = shard.offsets[run[0]], shard.offsets[run[-1] + 1]
    reader = storage.RangeReader(shard.url, start, end, storage_options=opts.storage_options,
                                 chunk_bytes=opts.chunk_bytes, parallel=opts.parallel, retries=opts.retries,
                                 backoff_s=opts.backoff_s, stats=rstats)
    wanted = iter(run)
    cur = next(wanted, None)
    chunks: deque = deque()  # (absolute offset, memoryview), covering [chunks[0].offset, pos)
    pos = start
    for chunk in reader:
        chunks.append((pos, memoryview(chunk)))
        pos += len(chunk)
        while cur is not None and pos >= shard.offsets[cur + 1]:
            data = _span(chunks, shard.offsets[cur], shard.offsets[cur + 1])
            out[cur] = _decode(shard, cur, data, opts, stats, url)
            cur = next(wanted, None)
        keep = shard.offsets[cur] if cur is not None else end
        while chunks and chunks[0][0] + len(chunks[0][1]) <= keep:
            chunks.popleft()  # decoded samples keep their own chunk alive; nothing else does


def _decode(shard: ShardInfo, i: int, data: bytes, opts: ReadOptions, stats: StreamStats,
            url: str) -> Sample | _Missing:
    """`url`: the shard URL as it may be logged (storage.safe_url, computed once per shard)."""
    where = f"{url} sample #{i} (byte {shard.offsets[i]})"
    try:
        members = parse_sample(data, where)
        if not members:
            raise TarFormatError(f"{where}: no tar members")
        key, _ = split_name(members[0].name)
        by_ext = {}
        for m in members:
            k, ext = split_name(m.name)
            if k != key:
                raise TarFormatError(f"{where}: member {m.name!r} does not belong to sample {key!r} "
                                     f"(offsets out of step with the tar)")
            by_ext[ext] = m.data
        sample = decode(key, by_ext, f"{url} key {key}", feature_dim=opts.feature_dim,
                        num_classes=opts.num_classes)
        sample.shard = shard.name
        return sample
    except (TarFormatError, SampleError) as e:
        if opts.on_error == "fail":
            raise SampleError(str(e)) from None
        log.error("corrupt sample skipped (substituted): %s", e)
        stats.corrupt += 1
        if len(stats.errors) < 20:
            stats.errors.append(str(e))
        return _Missing(str(e))


# ---------------------------------------------------------------------------------------------
# the iterable run by each DataLoader worker


BatchFn = Callable[[list[Sample], int], Any]  # (samples, epoch) -> batch

MAX_RANGES = 16  # batch ranges per worker in an EpochControl row (a fresh epoch has 1, a resume 1-2)
READ_GROUP_BYTES = 32 * 10**6  # uniform order: bytes of samples a worker reads as one unit (it holds two)


class EpochControl:
    """What each persistent worker does in the next iteration: the epoch and its batch ranges,
    one row per worker of a shared int64 table [workers, 2 + 2 * capacity] made before the
    workers fork. The training process writes the table before it starts an iteration; a worker
    reads its row when its iteration starts, which is after the DataLoader's resume message, so
    after the write."""

    def __init__(self, workers: int, capacity: int = MAX_RANGES):
        self.capacity = capacity
        self.table = torch.zeros((workers, 2 + 2 * capacity), dtype=torch.int64).share_memory_()

    def fits(self, blocks: list[list[tuple[int, int]]]) -> bool:
        return len(blocks) == self.table.shape[0] and all(len(block) <= self.capacity for block in blocks)

    def write(self, epoch: int, blocks: list[list[tuple[int, int]]]) -> None:
        rows = torch.zeros_like(self.table)
        for w, block in enumerate(blocks):
            rows[w, 0], rows[w, 1] = epoch, len(block)
            for k, (a, b) in enumerate(block):
                rows[w, 2 + 2 * k], rows[w, 3 + 2 * k] = a, b
        self.table.copy_(rows)

    def read(self, worker: int) -> tuple[int, list[tuple[int, int]]]:
        row = self.table[worker].tolist()
        return row[0], [(row[2 + 2 * k], row[3 + 2 * k]) for k in range(row[1])]


@dataclass
class StreamSpec:
    """What the workers need for every iteration (picklable; fixed for the loader's life). The
    iteration's epoch and batch ranges come from `control` (workers) or the dataset (in-process)."""

    sources: list[Source]
    layout: RankLayout  # its epoch is replaced by the iteration's
    resampled: bool
    epoch_samples: int | None
    read: ReadOptions
    make_batch: Any  # object with setup() and __call__(samples, epoch)
    released: torch.Tensor | None = None  # [workers, slots] shared int64 (BatchArena); None: no arena
    control: EpochControl | None = None  # None: iterated in the training process


class StreamDataset(IterableDataset):
    """The batches of one iteration: in the training process (`epoch`, `blocks` given), or in a
    persistent DataLoader worker (read from `spec.control` at each iteration)."""

    def __init__(self, spec: StreamSpec, epoch: int = 0, blocks: list[tuple[int, int]] | None = None):
        super().__init__()
        self.spec = spec
        self.epoch, self.blocks = epoch, blocks or []
        self._plan: EpochPlan | None = None  # the last epoch's plan (a worker keeps it across iterations)
        self._arena: BatchArena | None = None
        self._started = False

    def _worker_start(self, worker: int) -> None:
        """Once per worker process."""
        torch.set_num_threads(1)  # decode/mask are numpy; one thread per worker process
        storage.forget_inherited_filesystems()  # never touch the parent's S3/HTTP sessions
        self.spec.make_batch.setup()
        if self.spec.released is not None:
            self._arena = BatchArena(self.spec.released, worker)
        self._started = True

    def __iter__(self):
        info = get_worker_info()
        spec = self.spec
        if info is None:
            epoch, blocks = self.epoch, self.blocks
            spec.make_batch.setup()
        else:
            if not self._started:
                self._worker_start(info.id)
            epoch, blocks = spec.control.read(info.id)
        if not blocks:
            return
        lay = replace(spec.layout, epoch=epoch)
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = EpochPlan(spec.sources, seed=lay.seed, epoch=epoch, shuffle=lay.shuffle,
                                   resampled=spec.resampled, epoch_samples=spec.epoch_samples)
        yield from _worker_batches(self._plan, lay, blocks, spec.read, spec.make_batch, self._arena,
                                   report_memory=info is not None)


def _worker_batches(plan: EpochPlan, lay: RankLayout, blocks: list[tuple[int, int]], opts: ReadOptions,
                    make_batch, arena: BatchArena | None = None,
                    report_memory: bool = False) -> Iterator[tuple[Any, dict[str, Any], Any]]:
    """Yields (batch, stats delta, arena lease) for the worker's batch blocks, one read unit (a
    shuffle window, or a read group in uniform order) at a time. The next unit is read (and
    decoded) by a background thread while this one is masked and collated, so network time
    overlaps compute; a worker holds at most two units. With `report_memory`, the stats of the
    last batch carry the worker's pid and committed memory (hostmem.committed)."""
    mb = lay.micro_batch
    positions = np.concatenate([np.arange(a * mb, b * mb) for a, b in blocks])  # ascending O-positions
    units = lay.unit(positions)
    bounds = []
    lo = 0
    while lo < len(positions):
        hi = int(np.searchsorted(units, units[lo], side="right"))
        bounds.append((lo, hi))
        lo = hi
    perms: dict[int, np.ndarray] = {}
    dead: set[str] = set()  # only the loader thread (and its read pool) touches perms and dead
    remote = any(not storage.is_local(s.url) for s in plan.shards)
    # object stores: the runs of a unit are requested `parallel` at a time (uniform order reads
    # one sample per request); local files are read in order (the page cache reads ahead)
    pool = cf.ThreadPoolExecutor(max_workers=opts.parallel, thread_name_prefix="sample-read") \
        if remote and opts.parallel > 1 else None

    def load(k: int):
        lo, hi = bounds[k]
        seq = lay.sequence_index(positions[lo:hi], perms)
        if not lay.uniform:
            perms.pop(int(units[lo]), None)  # a window is visited once per worker
        wstats = StreamStats()
        return seq, _load_window(plan, seq, opts, wstats, dead, pool), wstats

    recent: list[Sample] = []  # last good samples: substitutes when a whole unit is unreadable
    stats = StreamStats()
    pending: list[Sample] = []
    produced, total = 0, len(positions) // mb
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-read") as ahead:
        future = ahead.submit(load, 0) if bounds else None
        try:
            for k in range(len(bounds)):
                seq, cache, wstats = future.result()
                future = ahead.submit(load, k + 1) if k + 1 < len(bounds) else None
                stats.add(wstats)
                cache = _substitute(cache, seq, lay, recent, stats)
                for g in seq.tolist():
                    pending.append(cache[g])
                    if len(pending) == mb:
                        stats.samples += mb
                        produced += 1
                        if report_memory and produced == total:
                            c = hostmem.committed()
                            if c is not None:
                                stats.workers[os.getpid()] = c.total
                        batch, lease = _collate(make_batch, pending, lay.epoch, arena)
                        yield batch, stats.as_dict(), lease
                        stats = StreamStats()
                        pending = []
        finally:
            if future is not None:
                future.cancel()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _collate(make_batch, samples: list[Sample], epoch: int, arena: BatchArena | None):
    """make_batch(samples, epoch) with `batch_tensor` drawing from the worker's arena."""
    global _ARENA
    if arena is None:
        return make_batch(samples, epoch), None
    arena.begin()
    _ARENA = arena
    try:
        batch = make_batch(samples, epoch)
    finally:
        _ARENA = None
    return batch, arena.end()


def _load_window(plan: EpochPlan, seq: np.ndarray, opts: ReadOptions, stats: StreamStats, dead: set[str],
                 pool: cf.Executor | None = None) -> dict[int, Sample | _Missing]:
    """Sequence index -> sample for the needed indices of one read unit. With `pool`, the runs
    of every shard (`sample_runs`) are read concurrently; stats are merged in a fixed order."""
    by_segment: dict[int, list[tuple[int, int]]] = {}
    for g in sorted(set(seq.tolist())):
        seg_j, local = plan.locate(g)
        by_segment.setdefault(seg_j, []).append((local, g))
    out: dict[int, Sample | _Missing] = {}
    jobs = []
    for seg_j, pairs in by_segment.items():
        shard = plan.shards[plan.segments[seg_j].shard]
        to_global = dict(pairs)
        if pool is None:
            got = read_samples(shard, [p[0] for p in pairs], opts, stats, dead)
            out.update((to_global[local], sample) for local, sample in got.items())
            continue
        for run in sample_runs(shard, [p[0] for p in pairs]):
            job_stats = StreamStats()
            jobs.append((pool.submit(read_samples, shard, run, opts, job_stats, dead), job_stats, to_global))
    for future, job_stats, to_global in jobs:
        got = future.result()
        stats.add(job_stats)
        out.update((to_global[local], sample) for local, sample in got.items())
    return out


def _substitute(cache: dict[int, Sample | _Missing], seq: np.ndarray, lay: RankLayout, recent: list[Sample],
                stats: StreamStats) -> dict[int, Sample | _Missing]:
    good = [s for s in cache.values() if isinstance(s, Sample)]
    recent[:] = (recent + good)[-64:]
    missing = [g for g, s in cache.items() if isinstance(s, _Missing)]
    if not missing:
        return cache
    donors = good or list(recent)
    if not donors:
        reasons = "; ".join(sorted({cache[g].reason for g in missing})[:3])
        raise storage.ShardReadError("<window>", f"no readable sample to substitute for {len(missing)} missing: {reasons}")
    rng = np.random.default_rng([lay.seed & 0xFFFFFFFF, lay.epoch, lay.rank, int(seq.min()), 0x5B5])
    for g in missing:
        cache[g] = donors[int(rng.integers(len(donors)))]
        stats.substituted += 1
    return cache


# ---------------------------------------------------------------------------------------------
# 5. the Loader


class StreamingLoader:
    """The Loader protocol the trainer relies on:

    - `__iter__()` yields the remaining batches of the current epoch, then stops;
    - `__len__()` batches per epoch on this rank (identical on every rank; from manifests);
    - `set_epoch(epoch)`: a different epoch starts from its beginning; the current one keeps
      its position (so `load_state_dict()` then `set_epoch(same)` resumes);
    - `state_dict()` / `load_state_dict()`: the position as a small plain dict;
    - `close()`: ends the worker processes (also when the loader is garbage-collected).

    `shuffle_buffer`: samples shuffled together, summed over ranks (each rank shuffles windows
    of shuffle_buffer // world_size samples, as the original's pretraining loader); None: a
    uniformly random order over the whole epoch (task loaders).

    `cache`: read remote shards through a node-local shard cache, with the node-stable plan
    when every node's share fits its bound (`_node_plan`); `ranks_per_node`: the consecutive
    ranks that share one cache (a node). `plan` names the plan in use.
    """

    def __init__(self, sources: list[Source], *, rank: int, world_size: int, micro_batch_size: int, seed: int,
                 make_batch, num_workers: int = 2, prefetch_factor: int = 2, pin_memory: bool = False,
                 shuffle: bool = True, shuffle_buffer: int | None = 5000, resampled: bool = False,
                 epoch_samples: int | None = None, read: ReadOptions, name: str = "train",
                 cache: CacheSpec | None = None, ranks_per_node: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if shuffle_buffer is not None and shuffle_buffer < 1:
            raise ValueError(f"{name}: shuffle_buffer must be >= 1 sample (or None for a uniform order), "
                             f"got {shuffle_buffer}")
        self.sources = sources
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch_size
        self.seed = seed
        self.make_batch = make_batch
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.shuffle, self.resampled, self.epoch_samples = shuffle, resampled, epoch_samples
        self.read = read
        self.name = name
        total_bytes = sum(s.data_bytes for src in sources for s in src.manifest.shards)
        total_count = sum(s.count for src in sources for s in src.manifest.shards)
        self.sample_bytes = total_bytes / max(total_count, 1)  # mean bytes per sample in the tars
        if not shuffle:
            self.window = 1 << 62  # one window, in sequence order
        elif shuffle_buffer is None:
            self.window = 0  # uniform order
        else:
            self.window = max(1, shuffle_buffer // world_size)
        # uniform order: positions read as one unit (the order does not depend on it)
        self.group = max(micro_batch_size, int(READ_GROUP_BYTES // max(self.sample_bytes, 1)))
        self.order = "sequential" if not shuffle else "uniform" if self.window == 0 else f"windows of {self.window}"
        self.epoch_total = epoch_samples if epoch_samples is not None else total_count
        self._batches = self.epoch_total // (world_size * micro_batch_size)
        if self._batches == 0:
            raise ValueError(f"{name}: {self.epoch_total} samples per epoch cannot give world_size={world_size} ranks "
                             f"one batch of {micro_batch_size} each")
        self.fingerprint = hashlib.sha256(repr([(s.name, s.count, s.sha256) for src in sources
                                                for s in src.manifest.shards] + [[src.weight for src in sources]]).encode()).hexdigest()[:16]
        self._node_plan(cache, ranks_per_node)
        self.epoch = 0
        self._slots: list[list[tuple[int, int]]] = [[(0, self._batches)]]  # unconsumed batches per worker slot
        self._consumed_total = 0  # batches consumed in this epoch (over resumes)
        self.report = StreamStats()
        self.last_report: dict[str, Any] | None = None
        self._dataloader: DataLoader | None = None  # persistent workers, made at the first iteration
        self._control: EpochControl | None = None
        self._leases: _Leases | None = None

    # -- protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._slots = [[(0, self._batches)]]
            self._consumed_total = 0
            self.report = StreamStats()

    def state_dict(self) -> dict[str, Any]:
        """Small, plain and identical on every rank (rank 0's copy can resume all ranks).
        `slots`: unconsumed batch ranges per worker slot, the slot that delivers next first."""
        return dict(version=STATE_VERSION, name=self.name, epoch=self.epoch, consumed=self._consumed_total,
                    slots=[[list(r) for r in slot] for slot in self._slots], batches_per_epoch=self._batches,
                    seed=self.seed, world_size=self.world_size, micro_batch_size=self.micro_batch,
                    fingerprint=self.fingerprint, order=self.order, plan=self.plan)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.name} loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("world_size", self.world_size), ("micro_batch_size", self.micro_batch),
                          ("seed", self.seed), ("batches_per_epoch", self._batches), ("fingerprint", self.fingerprint),
                          ("order", self.order), ("plan", self.plan)):
            # states saved before "order" / "plan" existed have none: the only kinds then
            theirs = state.get(key, "global" if key == "plan" else mine) if key in ("order", "plan") else state.get(key)
            if theirs != mine:
                raise ValueError(f"{self.name} loader state has {key}={theirs!r} but this run has {mine!r}: "
                                 f"a mid-epoch resume needs the same shards, seed, world size, micro-batch, "
                                 f"sample order and epoch plan (start the next epoch instead: loader.set_epoch(epoch + 1))")
        self.epoch = int(state["epoch"])
        self._slots = [[(int(a), int(b)) for a, b in slot] for slot in state["slots"]]
        self._consumed_total = int(state["consumed"])
        self.report = StreamStats()

    def remaining(self) -> int:
        """Batches the next iteration will yield."""
        return sum(b - a for slot in self._slots for a, b in slot)

    def _worker_blocks(self, workers: int) -> list[list[tuple[int, int]]]:
        """Same worker count as when the state was taken: the same blocks, so the batch order
        continues exactly. Otherwise the unconsumed batches are re-split (same set, new order)."""
        if len(self._slots) == workers:
            return [list(slot) for slot in self._slots]
        return split_ranges(WorkerRoundRobin(self._slots).merged(), workers)

    def _node_plan(self, cache: CacheSpec | None, ranks_per_node: int) -> None:
        """Chooses the epoch plan. "global" (no cache, local shards, or a node's share larger
        than the cache): today's plan over all shards, split by rank. Node-stable (the cache
        holds each node's share): the shards are dealt to the nodes once (`node_shards`), and
        each epoch's plan of a node covers its own shards only, shuffled with (seed, node,
        epoch) and split over the node's ranks; every rank still gets `len(self)` batches.
        Sets the sources, sample count and layout the workers plan from (`_spec`)."""
        self.plan = "global"
        self._plan_sources, self._plan_samples = self.sources, self.epoch_samples
        self._plan_rank, self._plan_world, self._plan_seed, self._plan_total = (self.rank, self.world_size, self.seed,
                                                                                 self.epoch_total)
        if cache is None:
            return
        say = log.warning if self.rank == 0 else log.debug  # every rank decides alike; one says why
        if all(storage.is_local(s.url) for src in self.sources for s in src.manifest.shards):
            say("%s: data.cache_dir unused: the shards are on local disk already", self.name)
            return
        if ranks_per_node < 1 or self.world_size % ranks_per_node:
            say("%s: data.cache_dir unused: %d ranks do not form nodes of %d ranks", self.name, self.world_size,
                ranks_per_node)
            return
        nodes = self.world_size // ranks_per_node
        dealt = node_shards(self.sources, nodes, self.seed)
        shares = [sum(src.manifest.shards[i].bytes for src, ids in zip(self.sources, per_source) for i in ids)
                  for per_source in dealt]
        lacking = [(k, src.manifest.url) for k, per_source in enumerate(dealt)
                   for src, ids in zip(self.sources, per_source) if not ids and any(s.count for s in src.manifest.shards)]
        if lacking:
            k, url = lacking[0]
            say("%s: data.cache_dir unused, reading from the bucket with the global plan: %d nodes but node %d "
                "gets no shard of %s (fewer shards than nodes)", self.name, nodes, k, storage.safe_url(url))
            return
        if max(shares) > cache.max_bytes:
            say("%s: data.cache_dir unused, reading from the bucket with the global plan: a node's share of the "
                "shards is %.1f MB, over data.cache_bytes = %.1f MB", self.name, max(shares) / 1e6,
                cache.max_bytes / 1e6)
            return
        node, local = divmod(self.rank, ranks_per_node)
        self.plan = f"node-stable: {nodes} nodes x {ranks_per_node} ranks"
        self._plan_sources = [Source(replace(src.manifest, shards=[src.manifest.shards[i] for i in ids]), src.weight)
                              for src, ids in zip(self.sources, dealt[node])]
        self._plan_samples = self._plan_total = ranks_per_node * self._batches * self.micro_batch
        self._plan_rank, self._plan_world = local, ranks_per_node
        self._plan_seed = int.from_bytes(hashlib.blake2b(f"{self.seed}/node{node}".encode(), digest_size=4).digest(),
                                         "little")
        self.read = replace(self.read, cache=cache)
        if self.rank == 0:
            log.info("%s: node-local shard cache in %s: each node keeps its %d-%d shards (%.1f MB at most) every epoch",
                     self.name, cache.directory, min(sum(map(len, d)) for d in dealt),
                     max(sum(map(len, d)) for d in dealt), max(shares) / 1e6)

    def _layout(self) -> RankLayout:
        return RankLayout(total=self._plan_total, rank=self._plan_rank, world_size=self._plan_world,
                          micro_batch=self.micro_batch, window=self.window, shuffle=self.shuffle,
                          seed=self._plan_seed, epoch=self.epoch, group=self.group)

    def _spec(self, **workers) -> StreamSpec:
        return StreamSpec(sources=self._plan_sources, layout=self._layout(), resampled=self.resampled,
                          epoch_samples=self._plan_samples, read=self.read, make_batch=self.make_batch, **workers)

    def _worker_loader(self, blocks: list[list[tuple[int, int]]]) -> DataLoader:
        """The persistent DataLoader with this iteration's (epoch, blocks) written to its control
        table. Made (forking the workers) at the first iteration; made again only when a resume
        leaves a worker more batch ranges than the table holds. A worker's BatchArena stays
        valid across its iterations."""
        if self._dataloader is None or not self._control.fits(blocks):
            self.close()
            # per worker: the batch being built, prefetch_factor queued, ~2 held by the trainer
            released = torch.zeros((self.num_workers, self.prefetch_factor + 4), dtype=torch.int64).share_memory_()
            self._leases = _Leases(released)
            self._control = EpochControl(self.num_workers, max([MAX_RANGES] + [len(b) for b in blocks]))
            self._dataloader = DataLoader(StreamDataset(self._spec(released=released, control=self._control)),
                                          batch_size=None, num_workers=self.num_workers,
                                          prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                          persistent_workers=True, multiprocessing_context="fork",
                                          worker_init_fn=worker_sigterm_guard())
        self._control.write(self.epoch, blocks)
        return self._dataloader

    def close(self) -> None:
        """Ends the worker processes (the next iteration starts new ones)."""
        self._dataloader = None  # its iterator shuts the workers down when collected
        self._control = None

    def __iter__(self):
        if self.remaining() == 0:
            return
        workers = max(1, self.num_workers)
        rr = WorkerRoundRobin(self._worker_blocks(workers))
        blocks = [list(s) for s in rr.slots]
        leases = None
        if self.num_workers > 0:
            loader = self._worker_loader(blocks)
            leases = self._leases
        else:
            loader = StreamDataset(self._spec(), epoch=self.epoch, blocks=blocks[0])
        self._slots = rr.rotated()
        for batch, stats, lease in loader:
            if leases is not None:
                leases.add(lease)
                del lease  # only the batch's own tensors may keep its slot busy
                leases.collect()
            rr.take()
            self._slots = rr.rotated()
            self._consumed_total += 1
            self.report.add(StreamStats(**stats))
            yield batch
        if rr.remaining():
            raise RuntimeError(f"{self.name}: the workers stopped with {rr.remaining()} planned batches undelivered")
        self._epoch_end()

    def _epoch_end(self) -> None:
        r = self.report
        mine = hostmem.committed()
        self.last_report = dict(epoch=self.epoch, rank=self.rank, **r.as_dict(),
                                committed=mine.total if mine else None, largest_mapping=mine.largest if mine else None)
        msg = (f"{self.name} epoch {self.epoch} rank {self.rank}: {r.samples} samples, {r.bytes / 1e6:.1f} MB, "
               f"{r.requests} requests, {r.retries} retries, {r.resumed} resumed connections, {r.corrupt} corrupt "
               f"samples, {len(r.bad_shards)} unreadable shards, {r.substituted} substituted samples")
        if self.read.cache is not None:  # `bytes` were then local reads; these came from the bucket
            msg += (f"; shard cache: {r.cache_downloads} shards downloaded ({r.cache_download_bytes / 1e6:.1f} MB, "
                    f"{r.cache_download_requests} requests), {r.cache_refused} cached copies refused")
        if mine is not None:
            msg += (f"; host memory: rank {mine}, loader workers "
                    + (", ".join(f"pid {pid} {c / 2**20:.0f} MiB" for pid, c in sorted(r.workers.items())) or "none")
                    + " committed")
        if r.corrupt or r.bad_shards or r.substituted:
            log.warning("%s; unreadable: %s", msg, ", ".join(r.bad_shards) or "none")
        else:
            log.info(msg)
        reports = os.environ.get(REPORTS_ENV)
        if reports:  # every rank's reports (the log shows rank 0's): one JSON line per epoch
            path = os.path.join(reports, f"{self.name.replace('/', '_')}-rank{self.rank}.jsonl")
            os.makedirs(reports, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(self.last_report) + "\n")
