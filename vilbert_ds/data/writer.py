"""Shard building: input records -> WebDataset tars + per-shard stats + manifest.

The plan is fixed before any shard is written: the input is indexed, the number of samples per
shard is `min(max_count, max_bytes // estimated sample bytes)` (estimated from the first records),
and shard k holds index entries [k*n, (k+1)*n). Hence:
- deterministic: same inputs and arguments, same bytes (fixed tar metadata, no timestamps);
- parallel: any worker builds any shard;
- resumable: a shard whose `.stats.json` exists (written after its tar) is done and skipped;
  a half-written shard is never visible (local: rename; object stores: one PUT/multipart upload);
- sliceable: `num_slices`/`slice_index` (a SLURM job array passes its task id) builds shards
  with k % num_slices == slice_index; whichever process sees all shards done writes the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage
from .config import parse_bytes, redact
from .formats import Captions, FeatureInput, InputError
from .manifest import MANIFEST_NAME, Manifest, ManifestError, ShardInfo, shard_name, stats_name
from .sample import SampleError, encode, key_for
from .tario import BLOCK, TarShardWriter, padded

log = logging.getLogger(__name__)

CAPTION_POOL_NAME = "captions.json"
ESTIMATE_RECORDS = 16  # records read to estimate the bytes of one sample


@dataclass
class BuildConfig:
    """Arguments of `vilbert-ds shards build` that are not the inputs themselves."""

    output: str  # directory URL (local path, file://, s3://...)
    prefix: str = "shard"
    max_count: int = 1000  # samples per shard at most
    max_bytes: int | str | None = None  # target tar size ("1GB"); the sample count is derived from it
    workers: int = 1
    num_slices: int = 1
    slice_index: int = 0
    feature_dim: int = 2048
    num_classes: int = 1601
    missing_caption: str = "fail"  # fail | skip (drop the image, counted) | none (no caption: task features)
    on_bad_record: str = "fail"  # fail | skip (counted in the shard stats and the summary)
    storage_options: dict = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self):
        if not self.output:
            raise ValueError("build: --output is required")
        if not self.prefix or "/" in self.prefix or "." in self.prefix:
            raise ValueError(f"build: --prefix {self.prefix!r} must be non-empty without '/' or '.'")
        if self.max_count < 1:
            raise ValueError(f"build: --max-count must be >= 1, got {self.max_count}")
        if self.max_bytes is not None:
            self.max_bytes = parse_bytes(self.max_bytes, name="--max-bytes")
        if self.workers < 1:
            raise ValueError(f"build: --workers must be >= 1, got {self.workers}")
        if not 0 <= self.slice_index < self.num_slices:
            raise ValueError(f"build: --slice-index {self.slice_index} not in [0, --num-slices {self.num_slices})")
        if self.missing_caption not in ("fail", "skip", "none"):
            raise ValueError(f"build: --missing-caption must be fail, skip or none, got {self.missing_caption!r}")
        if self.on_bad_record not in ("fail", "skip"):
            raise ValueError(f"build: --on-bad-record must be fail or skip, got {self.on_bad_record!r}")


@dataclass
class BuildSummary:
    shards_total: int
    shards_built: int
    shards_skipped: int  # already finished (resume)
    samples: int  # written by this process
    bytes: int
    seconds: float
    records_dropped: int  # missing captions / bad records skipped
    manifest: str | None  # URL when written

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        return (f"built {self.shards_built} shard(s), skipped {self.shards_skipped} finished, {self.shards_total} in the set; "
                f"{self.samples} samples, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({rate:.0f} samples/s, {self.bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s); "
                f"dropped {self.records_dropped} record(s); manifest: {self.manifest or 'not yet (other slices pending)'}")


class _HashingFile:
    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)


def sample_bytes(members: list[tuple[str, bytes]]) -> int:
    return sum(BLOCK + padded(len(d)) for _, d in members)


class ShardBuilder:
    def __init__(self, inp: FeatureInput, captions: Captions | None, cfg: BuildConfig):
        self.inp, self.captions, self.cfg = inp, captions, cfg
        self.handles: list[Any] = []
        self.per_shard = 0

    # -- plan -------------------------------------------------------------------------------
    def _record_members(self, record) -> tuple[str, list[tuple[str, bytes]]] | None:
        """(key, members) or None when the record is dropped by policy. A caption inside the
        record (CC LMDB datapoints) wins; otherwise it is looked up by image id."""
        if record.caption is None and self.captions is not None:
            record.caption = self.captions.get(record.image_id)
        if record.caption is None and self.cfg.missing_caption != "none":
            if self.cfg.missing_caption == "fail":
                where = f"in {self.captions.source}" if self.captions is not None else "(no --captions file given)"
                raise InputError(f"image {record.image_id}: no caption {where}; use --missing-caption skip to drop "
                                 f"such images (counted) or --missing-caption none for task features")
            return None
        key = key_for(record.image_id)
        return key, encode(record, key, feature_dim=self.cfg.feature_dim)

    def plan(self) -> int:
        t0 = time.time()
        self.handles = self.inp.index()
        if not self.handles:
            raise InputError(f"{self.inp.describe()}: the input has no records")
        estimate = 0
        for record in self.inp.read(self.handles[:ESTIMATE_RECORDS]):
            try:
                km = self._record_members(record)
            except (InputError, SampleError):
                continue
            if km is not None:
                estimate = max(estimate, sample_bytes(km[1]))
        per = self.cfg.max_count
        if self.cfg.max_bytes and estimate:
            per = max(1, min(per, (self.cfg.max_bytes - 2 * BLOCK) // estimate))
        self.per_shard = per
        log.info("indexed %d records in %.1fs; ~%d bytes/sample; %d samples/shard; %d shards",
                 len(self.handles), time.time() - t0, estimate, per, self.num_shards)
        return self.num_shards

    @property
    def num_shards(self) -> int:
        return (len(self.handles) + self.per_shard - 1) // self.per_shard

    def shard_url(self, k: int) -> str:
        return storage.join(self.cfg.output, shard_name(self.cfg.prefix, k))

    def is_done(self, k: int) -> bool:
        """Finished = stats present and the tar has the size the stats record."""
        url = self.shard_url(k)
        try:
            st = json.loads(storage.read_bytes(stats_name(url), self.cfg.storage_options, retries=2))
        except FileNotFoundError:
            return False
        except (ValueError, storage.ShardReadError):
            return False
        return storage.file_size(url, self.cfg.storage_options) == st.get("bytes")

    # -- one shard ----------------------------------------------------------------------------
    def build_shard(self, k: int) -> dict[str, Any]:
        cfg = self.cfg
        url = self.shard_url(k)
        name = shard_name(cfg.prefix, k)
        handles = self.handles[k * self.per_shard:(k + 1) * self.per_shard]
        tmp_dir = storage.local_path(cfg.output) if storage.is_local(cfg.output) else None
        if tmp_dir:
            os.makedirs(tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=tmp_dir)
        keys: list[str] = []
        captions: list[str] = []
        dropped: list[str] = []
        nboxes: list[int] = []
        cls_widths: set[int | None] = set()
        try:
            with os.fdopen(fd, "wb") as f:
                hf = _HashingFile(f)
                w = TarShardWriter(hf)
                seen: set[str] = set()
                records = self.inp.read(handles)
                while True:
                    try:
                        record = next(records)
                    except StopIteration:
                        break
                    except InputError as e:
                        if cfg.on_bad_record == "fail":
                            raise InputError(f"shard {name}: {e}") from None
                        log.warning("shard %s: skipping bad record: %s", name, e)
                        dropped.append(str(e)[:200])
                        continue
                    try:
                        km = self._record_members(record)
                    except SampleError as e:
                        if cfg.on_bad_record == "fail":
                            raise SampleError(f"shard {name}: {e}") from None
                        dropped.append(str(e)[:200])
                        continue
                    if km is None:
                        dropped.append(f"image {record.image_id}: no caption")
                        continue
                    key, members = km
                    if key in seen:
                        raise InputError(f"shard {name}: duplicate sample key {key!r} (image_id {record.image_id})")
                    seen.add(key)
                    w.write_sample(key, members)
                    keys.append(key)
                    if record.caption is not None:
                        captions.append(record.caption)
                    nboxes.append(record.num_boxes)
                    cls_widths.add(None if record.cls_prob is None else int(record.cls_prob.shape[1]))
                w.close()
            size = w.pos
            stats = dict(
                name=name, index=k, count=len(keys), bytes=size, sha256=hf.sha.hexdigest(), offsets=w.offsets,
                keys=keys, feature_dim=cfg.feature_dim,
                num_classes=cls_widths.pop() if len(cls_widths) == 1 else None,
                regions=dict(min=min(nboxes, default=0), max=max(nboxes, default=0), sum=sum(nboxes)),
                dropped=dropped,
            )
            if self.captions is None and captions:  # inline captions: the manifest pools them for negatives
                stats["captions"] = captions
            storage.put_file(tmp, url, cfg.storage_options)
            storage.write_bytes(stats_name(url), (json.dumps(stats, sort_keys=True) + "\n").encode(), cfg.storage_options)
            return stats
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- manifest ---------------------------------------------------------------------------
    def build_args(self) -> dict[str, Any]:
        """Arguments that determine the shard bytes (not workers/slices/progress)."""
        d = {k: v for k, v in asdict(self.cfg).items()
             if k in ("prefix", "max_count", "max_bytes", "feature_dim", "num_classes", "missing_caption", "on_bad_record")}
        d["input"] = self.inp.describe()
        d["captions"] = self.captions.source if self.captions is not None else None
        d["samples_per_shard"] = self.per_shard
        return redact(d)

    def write_manifest(self) -> str:
        cfg = self.cfg
        shards, keys_seen, mins, maxs, total_boxes, widths = [], {}, [], [], 0, set()
        inline_pool: list[str] = []
        for k in range(self.num_shards):
            url = self.shard_url(k)
            st = json.loads(storage.read_bytes(stats_name(url), cfg.storage_options))
            for key in st["keys"]:
                if key in keys_seen:
                    raise ManifestError(f"duplicate sample key {key!r} in {st['name']} and {keys_seen[key]}")
                keys_seen[key] = st["name"]
            shards.append(ShardInfo(name=st["name"], count=st["count"], bytes=st["bytes"], offsets=st["offsets"], sha256=st["sha256"]))
            if st["count"]:
                mins.append(st["regions"]["min"])
                maxs.append(st["regions"]["max"])
            total_boxes += st["regions"]["sum"]
            inline_pool.extend(st.get("captions", []))
            if st["count"]:
                widths.add(st.get("num_classes"))
        n = sum(s.count for s in shards)
        m = Manifest(shards=shards, feature_dim=cfg.feature_dim, num_classes=widths.pop() if len(widths) == 1 else None,
                     caption_pool=CAPTION_POOL_NAME if (self.captions is not None or inline_pool) else None,
                     regions=dict(min=min(mins, default=0), max=max(maxs, default=0), mean=round(total_boxes / max(n, 1), 3)),
                     build=self.build_args())
        if self.captions is None and inline_pool:
            storage.write_bytes(storage.join(cfg.output, CAPTION_POOL_NAME),
                                json.dumps(inline_pool, ensure_ascii=False).encode("utf-8"), cfg.storage_options)
        url = storage.join(cfg.output, MANIFEST_NAME)
        storage.write_bytes(url, m.to_json(), cfg.storage_options)
        return url

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> BuildSummary:
        t0 = time.time()
        cfg = self.cfg
        if not self.handles:
            self.plan()
        mine = [k for k in range(self.num_shards) if k % cfg.num_slices == cfg.slice_index]
        todo = [k for k in mine if not self.is_done(k)]
        skipped = len(mine) - len(todo)
        if skipped:
            log.info("resuming: %d of %d shard(s) of this slice already finished", skipped, len(mine))
        if self.captions is not None:
            pool_url = storage.join(cfg.output, CAPTION_POOL_NAME)
            storage.write_bytes(pool_url, json.dumps(self.captions.pool, ensure_ascii=False).encode("utf-8"), cfg.storage_options)
        samples = nbytes = dropped = 0
        from tqdm import tqdm

        expected = sum(len(self.handles[k * self.per_shard:(k + 1) * self.per_shard]) for k in todo)
        bar = tqdm(total=expected, unit="sample", unit_scale=True, desc=f"shards {cfg.prefix}",
                   disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1)
        try:
            if cfg.workers > 1 and len(todo) > 1:
                global _ACTIVE
                _ACTIVE = self
                ctx = mp.get_context("fork")  # workers inherit the index and captions
                with ctx.Pool(min(cfg.workers, len(todo)), initializer=storage.forget_inherited_filesystems) as pool:
                    for st in pool.imap_unordered(_build_in_worker, todo):
                        samples, nbytes, dropped = samples + st["count"], nbytes + st["bytes"], dropped + len(st["dropped"])
                        bar.update(st["count"] + len(st["dropped"]))
                _ACTIVE = None
            else:
                for k in todo:
                    st = self.build_shard(k)
                    samples, nbytes, dropped = samples + st["count"], nbytes + st["bytes"], dropped + len(st["dropped"])
                    bar.update(st["count"] + len(st["dropped"]))
        finally:
            bar.close()
        manifest = None
        if all(self.is_done(k) for k in range(self.num_shards)):
            manifest = self.write_manifest()
        return BuildSummary(shards_total=self.num_shards, shards_built=len(todo), shards_skipped=skipped,
                            samples=samples, bytes=nbytes, seconds=time.time() - t0, records_dropped=dropped,
                            manifest=manifest)


_ACTIVE: ShardBuilder | None = None


def _build_in_worker(k: int) -> dict[str, Any]:
    assert _ACTIVE is not None
    return _ACTIVE.build_shard(k)


def build(inp: FeatureInput, captions: Captions | None, cfg: BuildConfig) -> BuildSummary:
    """Builds (this slice of) the shard set; see the module docstring."""
    return ShardBuilder(inp, captions, cfg).run()
