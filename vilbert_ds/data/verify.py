"""`vilbert-ds shards verify`: read every shard of a manifest and report each problem by shard
and key: missing/truncated tars, bad headers, missing members, wrong shapes or dtypes, NaN/Inf,
offsets or counts that disagree with the manifest, checksum mismatches, duplicate keys."""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .manifest import Manifest, ManifestError, ShardInfo, load_source
from .sample import META, SampleError, decode
from .tario import TarFormatError, iter_members, split_name


@dataclass
class ShardReport:
    name: str
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    manifest: str
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # set-level problems

    @property
    def ok(self) -> bool:
        return not self.problems and all(not s.problems for s in self.shards)

    def lines(self) -> list[str]:
        out = []
        for s in self.shards:
            out.extend(f"ERROR {p}" for p in s.problems)
        out.extend(f"ERROR {p}" for p in self.problems)
        n_bad = sum(1 for s in self.shards if s.problems)
        samples = sum(s.samples for s in self.shards)
        status = "OK" if self.ok else f"FAILED ({n_bad} bad shard(s), {len(self.problems)} set-level problem(s))"
        out.append(f"{status}: {storage.safe_url(self.manifest)}: {len(self.shards)} shards, {samples} samples verified")
        return out


def _verify_shard(shard: ShardInfo, m: Manifest, storage_options: dict) -> ShardReport:
    rep = ShardReport(name=shard.name)
    url = storage.safe_url(shard.url)
    try:
        size = storage.file_size(shard.url, storage_options)
    except Exception as e:  # noqa: BLE001 - any storage error is a finding here
        rep.problems.append(f"{url}: cannot stat ({type(e).__name__}: {e})")
        return rep
    if size is None:
        rep.problems.append(f"{url}: missing")
        return rep
    if size != shard.bytes:
        rep.problems.append(f"{url}: {size} bytes, manifest says {shard.bytes} (truncated or replaced)")
    try:
        data = b"".join(storage.RangeReader(shard.url, 0, size, storage_options=storage_options, parallel=4))
    except storage.ShardReadError as e:
        rep.problems.append(str(e))
        return rep
    rep.bytes = len(data)
    if shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        rep.problems.append(f"{url}: sha256 differs from the manifest (content changed or corrupt)")
    samples: dict[str, dict[str, bytes]] = {}
    starts: list[int] = []
    order: list[str] = []
    try:
        for offset, member in iter_members(io.BytesIO(data), url):
            key, ext = split_name(member.name)
            if not order or key != order[-1]:  # a new sample starts here
                if key in samples:
                    rep.problems.append(f"{url} key {key}: members not contiguous (key appears twice)")
                samples[key] = {}  # a second copy is decoded on its own
                order.append(key)
                starts.append(offset)
            if ext in samples[key]:
                rep.problems.append(f"{url} key {key}: duplicate member {member.name}")
            samples[key][ext] = member.data
    except TarFormatError as e:
        after = f" (after key {order[-1]})" if order else ""
        rep.problems.append(f"{e}{after}")
    for key in order:
        try:
            decode(key, samples[key], f"{url} key {key}", feature_dim=m.feature_dim, num_classes=m.num_classes)
        except SampleError as e:
            rep.problems.append(str(e))
        if META in samples[key] and m.caption_pool and b'"caption"' not in samples[key][META]:
            rep.problems.append(f"{url} key {key}: no caption in {key}.json (the set has a caption pool)")
    rep.samples = len(order)
    rep.keys = order
    if len(order) != shard.count:
        rep.problems.append(f"{url}: {len(order)} samples, manifest says {shard.count}")
    elif starts != shard.offsets[:-1]:
        bad = next(i for i, (a, b) in enumerate(zip(starts, shard.offsets)) if a != b)
        rep.problems.append(f"{url} key {order[bad]}: starts at byte {starts[bad]}, manifest offset {shard.offsets[bad]}")
    return rep


def verify_manifest(url: str, storage_options: dict | None = None, *, workers: int = 4,
                    progress: Any = None) -> VerifyReport:
    """Verifies every shard of a set; `progress`: a tqdm-like bar (`reset(total=shards)`, then
    `update(1)` per verified shard)."""
    report = VerifyReport(manifest=url)
    opts = storage_options or {}
    try:
        m = load_source(url, opts, retries=2)
    except (ManifestError, storage.ShardReadError, OSError) as e:
        report.problems.append(f"{storage.safe_url(url)}: cannot load manifest ({e})")
        return report
    if progress is not None:
        progress.reset(total=len(m.shards))

    def one(shard: ShardInfo) -> ShardReport:
        rep = _verify_shard(shard, m, opts)
        if progress is not None:
            progress.update(1)
        return rep

    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        report.shards = list(pool.map(one, m.shards))
    seen: dict[str, str] = {}
    for rep in report.shards:
        for key in rep.keys:
            if key in seen:
                report.problems.append(f"duplicate key {key} in {seen[key]} and {rep.name}")
            seen[key] = rep.name
    if m.caption_pool:
        try:
            storage.read_bytes(m.caption_pool, opts, retries=2)
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"{storage.safe_url(m.caption_pool)}: caption pool unreadable ({type(e).__name__})")
    return report
