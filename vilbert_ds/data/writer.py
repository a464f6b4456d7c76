"""Shard building: input records -> WebDataset tars + per-shard stats + manifest.

The plan is fixed before any shard is written: the input is indexed, the number of samples per
shard is `min(max_count, max_bytes // estimated sample bytes)` (estimated from the first records),
and shard k holds index entries [k*n, (k+1)*n). Hence:
- deterministic: same inputs and arguments, same bytes (fixed tar metadata, no timestamps);
- parallel: any worker builds any shard;
- resumable: a shard whose `.stats.json` exists (written after its tar), whose tar has the
  recorded size and whose recorded build identity (input files, captions, every argument that
  shapes the shards) equals this build's is done and skipped; a shard of another build is
  refused by name, or replaced with `rebuild=True`. A half-written shard is never visible
  (local: rename; object stores: one PUT/multipart upload);
- clean: SIGTERM, SIGINT or a failing worker remove the partial files of the shards in progress;
  partial files a killed build left (SIGKILL) are removed by the next run of that output;
- sliceable: `num_slices`/`slice_index` (a SLURM job array passes its task id) builds shards
  with k % num_slices == slice_index; whichever process sees all shards done writes the manifest.

Bad records (`on_bad_record`): `fail` stops at the first with one line naming the file and row
(TSV), key (LMDB) or file (npz); `skip` leaves out exactly the bad records, keeps every good one,
and lists each in the shard stats, `dropped.txt` beside the manifest and the summary.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Any, Callable

from . import storage
from .config import parse_bytes, redact
from .encoding import Encoding
from .formats import BadRecord, Captions, FeatureInput, InputError
from .manifest import MANIFEST_NAME, Manifest, ManifestError, ShardInfo, shard_name, stats_name
from .sample import FeatureRecord, SampleError, encode, key_for
from .tario import BLOCK, TarShardWriter, padded

log = logging.getLogger(__name__)

CAPTION_POOL_NAME = "captions.json"
DROPPED_NAME = "dropped.txt"  # one line per input record a build left out (empty when none)
ESTIMATE_RECORDS = 16  # records read to estimate the bytes of one sample
PROGRESS_EVERY_S = 0.2  # a build worker reports its sample count to the parent's bar this often
IDENTITY_VERSION = 1  # bump when the meaning of a recorded identity field changes


class BuildError(ValueError):
    """A build refused before or while it runs: bad arguments, an unusable output, shards of
    another build in the output, a worker that died."""


class BuildInterrupted(SystemExit):
    """SIGTERM/SIGINT reached the build; raised in the main thread so every `finally` runs.
    The exit status is 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signame = signal.Signals(signum).name


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    raise BuildInterrupted(signum)


@contextlib.contextmanager
def cleanup_on_sigterm():
    """SIGTERM (what SLURM and `kill` send) raises BuildInterrupted in the main thread while the
    block runs, so partial files are removed and workers stopped as on an exception. Left alone
    when called off the main thread or when the process already handles SIGTERM itself."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def local_scratch_dir(output: str) -> str:
    """Where partial tars of `output` are written: the output directory itself when local (a
    finished tar appears by rename), else one directory per output URL under the system temp dir
    (so a rerun finds the partials a killed build of that output left)."""
    if storage.is_local(output):
        return storage.local_path(output)
    digest = hashlib.sha256(storage.safe_url(output).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"vilbert-ds-build-{digest}")


def remove_stale_partials(directory: str, prefix: str, keep: Callable[[int], bool] | None = None) -> list[str]:
    """Removes the partial files a killed build of `prefix` left in `directory`: partial tars
    (`.{prefix}-NNNNNN.tar.*.partial`) and half-written stats (`.tmp-*{prefix}-NNNNNN.stats.json`).
    `keep(k)` True protects shard k's files (another slice's build may be writing them)."""
    pattern = re.compile(rf"^(?:\.{re.escape(prefix)}-(\d{{6}})\.tar\..+\.partial"
                         rf"|\.tmp-.+{re.escape(prefix)}-(\d{{6}})\.stats\.json)$")
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        k = int(m.group(1) or m.group(2))
        if keep is not None and keep(k):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


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
    encoding: Encoding = Encoding()  # float16 throughout, or compact (8-bit features, top-k cls_prob)
    missing_caption: str = "fail"  # fail | skip (drop the image, counted) | none (no caption: task features)
    on_bad_record: str = "fail"  # fail | skip (counted in the shard stats and the summary)
    rebuild: bool = False  # replace shards of another build (other input or arguments) instead of refusing
    storage_options: dict = field(default_factory=dict)
    progress: bool = True  # a per-sample progress bar on stderr (only when stderr is a terminal)

    def __post_init__(self):
        if not self.output:
            raise BuildError("--output is required")
        if not self.prefix or "/" in self.prefix or "." in self.prefix:
            raise BuildError(f"--prefix {self.prefix!r} must be non-empty without '/' or '.'")
        if self.max_count < 1:
            raise BuildError(f"--max-count must be >= 1, got {self.max_count}")
        if self.max_bytes is not None:
            try:
                self.max_bytes = parse_bytes(self.max_bytes, name="--max-bytes")
            except ValueError as e:
                raise BuildError(str(e)) from None
            if self.max_bytes < 1:
                raise BuildError(f"--max-bytes must be positive, got {self.max_bytes}")
        if self.workers < 1:
            raise BuildError(f"--workers must be >= 1, got {self.workers}")
        if self.num_slices < 1 or not 0 <= self.slice_index < self.num_slices:
            raise BuildError(f"--slice-index {self.slice_index} not in [0, --num-slices {self.num_slices})")
        if self.missing_caption not in ("fail", "skip", "none"):
            raise BuildError(f"--missing-caption must be fail, skip or none, got {self.missing_caption!r}")
        if self.on_bad_record not in ("fail", "skip"):
            raise BuildError(f"--on-bad-record must be fail or skip, got {self.on_bad_record!r}")


@dataclass
class BuildSummary:
    shards_total: int
    shards_built: int
    shards_skipped: int  # already finished (resume)
    samples: int  # written by this process
    bytes: int
    seconds: float
    records_dropped: int  # missing captions / bad records left out by this process
    manifest: str | None  # URL when written
    dropped: list[str] = field(default_factory=list)  # each left-out record: "where: why"
    dropped_report: str | None = None  # URL of dropped.txt when the manifest was written

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        dropped = f"dropped {self.records_dropped} record(s)"
        if self.dropped:
            shown = "; ".join(self.dropped[:3]) + (f"; ... ({len(self.dropped) - 3} more)" if len(self.dropped) > 3 else "")
            where = f", listed in {storage.safe_url(self.dropped_report)}" if self.dropped_report else " (listed in the shard stats)"
            dropped += f"{where}: {shown}"
        return (f"built {self.shards_built} shard(s), skipped {self.shards_skipped} finished, {self.shards_total} in the set; "
                f"{self.samples} samples, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({rate:.0f} samples/s, {self.bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s); "
                f"{dropped}; manifest: {self.manifest or 'not yet (other slices pending)'}")


class _HashingFile:
    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)


def sample_bytes(members: list[tuple[str, bytes]]) -> int:
    return sum(BLOCK + padded(len(d)) for _, d in members)


def identity_diff(recorded: Any, current: dict[str, Any], path: str = "") -> list[str]:
    """The fields in which a shard's recorded build identity differs from this build's, each as
    `field (shard: X, now: Y)`."""
    if not isinstance(recorded, dict):
        return ["build identity (not recorded: the shard was written by an older vilbert-ds)"]

    def short(v: Any) -> str:
        text = v[:12] if isinstance(v, str) and len(v) == 64 else json.dumps(v)  # digests: a prefix is enough
        return text if len(text) <= 120 else text[:117] + "..."

    out: list[str] = []
    # paths first, digests last: "which files" reads better than "which hash"
    for key in sorted(set(recorded) | set(current), key=lambda k: (k not in ("path", "paths"), k == "digest", k)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{path}{key}.")
        elif a != b:
            out.append(f"{path}{key} (shard: {short(a)}, now: {short(b)})")
    return out


class _Throttle:
    """Counts samples and passes the count on at most every `every_s` seconds (worker -> parent)."""

    def __init__(self, send: Callable[[int], None], every_s: float | None = None):
        self.send, self.every_s = send, PROGRESS_EVERY_S if every_s is None else every_s
        self.n, self.last = 0, time.monotonic()

    def __call__(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.n:
            self.send(self.n)
        self.n, self.last = 0, time.monotonic()


_WORKER_ERRORS = {cls.__name__: cls for cls in (InputError, SampleError, BuildError, ManifestError)}


def _worker_main(builder: "ShardBuilder", conn) -> None:
    """A build process (forked: it inherits the index and captions). Receives shard indices,
    answers ("progress", n) ... ("done", stats), or ("error", class, message) / ("crash",
    traceback) and stops. SIGTERM (the parent stopping it) unwinds build_shard, which removes its
    partial file; SIGINT is left to the parent, which stops the workers itself."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    storage.forget_inherited_filesystems()
    progress = _Throttle(lambda n: conn.send(("progress", n)))
    while True:
        try:
            k = conn.recv()
        except EOFError:
            return
        if k is None:
            return
        try:
            stats = builder.build_shard(k, progress)
        except tuple(_WORKER_ERRORS.values()) as e:
            progress.flush()
            conn.send(("error", type(e).__name__, str(e)))
            return
        except Exception:  # noqa: BLE001 - a bug: the parent shows the traceback
            conn.send(("crash", traceback.format_exc()))
            return
        progress.flush()
        conn.send(("done", stats))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit status {code}"


class ShardBuilder:
    def __init__(self, inp: FeatureInput, captions: Captions | None, cfg: BuildConfig):
        self.inp, self.captions, self.cfg = inp, captions, cfg
        self.handles: list[Any] = []
        self.per_shard = 0
        self._identity: dict[str, Any] | None = None

    # -- plan -------------------------------------------------------------------------------
    def _record_members(self, record: FeatureRecord) -> tuple[str, list[tuple[str, bytes]]] | None:
        """(key, members) or None when the record is dropped by policy. A caption inside the
        record (CC LMDB datapoints) wins; otherwise it is looked up by image id."""
        if record.caption is None and self.captions is not None:
            record.caption = self.captions.get(record.image_id)
        if record.caption is None and self.cfg.missing_caption != "none":
            if self.cfg.missing_caption == "fail":
                where = f"in {self.captions.source}" if self.captions is not None else "(no --captions file given)"
                raise InputError(f"{record.source} (image_id {record.image_id}): no caption {where}; use "
                                 f"--missing-caption skip to drop such images (counted) or --missing-caption none "
                                 f"for task features")
            return None
        key = key_for(record.image_id)
        return key, encode(record, key, feature_dim=self.cfg.feature_dim, encoding=self.cfg.encoding)

    def plan(self) -> int:
        t0 = time.time()
        self.handles = self.inp.index()
        if not self.handles:
            raise InputError(f"{', '.join(self.inp.paths)}: the input has no records")
        estimate = 0
        for item in self.inp.read(self.handles[:ESTIMATE_RECORDS]):
            try:
                km = None if isinstance(item, BadRecord) else self._record_members(item)
            except (InputError, SampleError):
                km = None  # reported (fail) or counted (skip) when its shard is built
            if km is not None:
                estimate = max(estimate, sample_bytes(km[1]))
        per = self.cfg.max_count
        if self.cfg.max_bytes and estimate:
            per = max(1, min(per, (self.cfg.max_bytes - 2 * BLOCK) // estimate))
        self.per_shard = per
        self._identity = None
        log.info("indexed %d records in %.1fs; ~%d bytes/sample; %d samples/shard; %d shards",
                 len(self.handles), time.time() - t0, estimate, per, self.num_shards)
        return self.num_shards

    @property
    def num_shards(self) -> int:
        return (len(self.handles) + self.per_shard - 1) // self.per_shard

    def shard_url(self, k: int) -> str:
        return storage.join(self.cfg.output, shard_name(self.cfg.prefix, k))

    def identity(self) -> dict[str, Any]:
        """What every shard of this build records and a rerun must match: the input files (one
        stat each, see formats.file_identity), the captions file, and every argument that
        changes which records land in which shard or how they are encoded. Workers, slices,
        --on-bad-record and fail/skip of --missing-caption do not change a finished shard (a
        shard finished under `fail` had nothing to drop), so they are not part of it."""
        if self._identity is None:
            cfg = self.cfg
            self._identity = redact(dict(
                version=IDENTITY_VERSION, input=self.inp.identity(),
                captions=self.captions.identity() if self.captions is not None else None,
                records=len(self.handles), samples_per_shard=self.per_shard, prefix=cfg.prefix,
                max_count=cfg.max_count, max_bytes=cfg.max_bytes, feature_dim=cfg.feature_dim,
                num_classes=cfg.num_classes, captionless="keep" if cfg.missing_caption == "none" else "drop"))
            if not cfg.encoding.is_default:  # only then: shards built before encodings existed stay resumable
                self._identity["encoding"] = cfg.encoding.to_json()
        return self._identity

    def _read_stats(self, k: int) -> dict[str, Any] | None:
        """Shard k's stats, or None when absent or unreadable (then the shard is built again)."""
        url = stats_name(self.shard_url(k))
        try:
            st = json.loads(storage.read_bytes(url, self.cfg.storage_options, retries=2))
        except FileNotFoundError:
            return None
        except PermissionError as e:
            raise BuildError(f"{storage.safe_url(url)}: access denied ({e})") from None
        except (ValueError, storage.ShardReadError):
            return None
        return st if isinstance(st, dict) else None

    def shard_state(self, k: int) -> tuple[str, list[str]]:
        """("done" | "todo" | "foreign", differing identity fields). done: stats present, same
        identity, the tar has the recorded size; foreign: built by another build."""
        st = self._read_stats(k)
        if st is None:
            return "todo", []
        diff = identity_diff(st.get("build"), self.identity())
        if diff:
            return "foreign", diff
        try:
            size = storage.file_size(self.shard_url(k), self.cfg.storage_options)
        except PermissionError as e:
            raise BuildError(f"{storage.safe_url(self.shard_url(k))}: access denied ({e})") from None
        return ("done" if size == st.get("bytes") else "todo"), []

    def is_done(self, k: int) -> bool:
        return self.shard_state(k)[0] == "done"

    def _foreign_error(self, foreign: list[tuple[int, list[str]]]) -> BuildError:
        k, diff = foreign[0]
        more = f" (and {len(foreign) - 1} more shard(s))" if len(foreign) > 1 else ""
        return BuildError(f"{storage.safe_url(self.shard_url(k))}{more} was built from another input or with other "
                          f"arguments: {'; '.join(diff[:4])}; pass --rebuild to replace that build's shards, or "
                          f"choose another --output")

    # -- output -----------------------------------------------------------------------------
    def check_output(self) -> None:
        """The output can hold shards: a local directory that exists or can be made and is
        writable; on an object store, a listing is allowed. One line naming it otherwise."""
        out = self.cfg.output
        if storage.is_local(out):
            path = os.path.abspath(storage.local_path(out))
            try:
                os.makedirs(path, exist_ok=True)
            except FileExistsError:
                raise BuildError(f"{path}: --output exists and is not a directory") from None
            except NotADirectoryError:
                parent = path
                while parent != os.path.dirname(parent) and not os.path.exists(parent):
                    parent = os.path.dirname(parent)
                raise BuildError(f"{path}: --output lies under {parent}, which is a file, not a directory") from None
            except OSError as e:
                raise BuildError(f"{path}: cannot create the --output directory ({e.strerror})") from None
            try:  # a real write: permission bits say nothing for root or on read-only mounts
                fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise BuildError(f"{path}: --output directory is not writable ({e.strerror})") from None
            return
        try:
            self._remote_names()
        except PermissionError as e:
            raise BuildError(f"{storage.safe_url(out)}: access denied ({e})") from None
        except (OSError, ValueError) as e:
            raise BuildError(f"{storage.safe_url(out)}: cannot list the output ({type(e).__name__}: {e})") from None

    def _remote_names(self) -> list[str]:
        fs, path = storage.get_fs(self.cfg.output, self.cfg.storage_options)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    def _output_names(self) -> list[str]:
        if storage.is_local(self.cfg.output):
            try:
                return os.listdir(storage.local_path(self.cfg.output))
            except FileNotFoundError:
                return []
        return self._remote_names()

    def _extra_shards(self) -> list[str]:
        """Names of `{prefix}-NNNNNN.tar` / `.stats.json` beyond this build's shard count (left
        by a build with more shards)."""
        pattern = re.compile(rf"^{re.escape(self.cfg.prefix)}-(\d{{6}})\.(?:tar|stats\.json)$")
        return sorted(n for n in self._output_names()
                      if (m := pattern.match(n)) is not None and int(m.group(1)) >= self.num_shards)

    def _remove(self, url: str) -> None:
        if storage.is_local(url):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(storage.local_path(url))
            return
        fs, path = storage.get_fs(url, self.cfg.storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    def _write(self, url: str, data: bytes) -> None:
        try:
            storage.write_bytes(url, data, self.cfg.storage_options)
        except OSError as e:
            raise BuildError(f"cannot write {storage.safe_url(url)}: {type(e).__name__}: {e}") from None

    def _put(self, local: str, url: str) -> None:
        try:
            storage.put_file(local, url, self.cfg.storage_options)
        except OSError as e:
            raise BuildError(f"cannot write {storage.safe_url(url)}: {type(e).__name__}: {e}") from None

    # -- one shard ----------------------------------------------------------------------------
    def _drop(self, shard: str, message: str, dropped: list[str]) -> None:
        if self.cfg.on_bad_record == "fail":
            raise InputError(f"{message} [shard {shard}; --on-bad-record skip leaves such records out, listed]")
        log.warning("shard %s: leaving out a bad record: %s", shard, message)
        dropped.append(message[:500])

    def build_shard(self, k: int, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Writes shard k (tar, then stats) and returns its stats. `progress(1)` per record."""
        cfg = self.cfg
        url = self.shard_url(k)
        name = shard_name(cfg.prefix, k)
        handles = self.handles[k * self.per_shard:(k + 1) * self.per_shard]
        tmp_dir = local_scratch_dir(cfg.output)
        os.makedirs(tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=tmp_dir)
        keys: list[str] = []
        captions: list[str] = []
        dropped: list[str] = []
        nboxes: list[int] = []
        cls_widths: set[int | None] = set()
        seen: dict[str, str] = {}
        try:
            with os.fdopen(fd, "wb") as f:
                hf = _HashingFile(f)
                w = TarShardWriter(hf)
                for item in self.inp.read(handles):
                    if progress is not None:
                        progress(1)
                    if isinstance(item, BadRecord):
                        self._drop(name, str(item), dropped)
                        continue
                    try:
                        km = self._record_members(item)
                    except SampleError as e:
                        self._drop(name, str(e), dropped)
                        continue
                    if km is None:
                        dropped.append(f"{item.source} (image_id {item.image_id}): no caption")
                        continue
                    key, members = km
                    if key in seen:
                        self._drop(name, f"{item.source} (image_id {item.image_id}): duplicate sample key {key!r} "
                                         f"(first at {seen[key]})", dropped)
                        continue
                    seen[key] = item.source
                    w.write_sample(key, members)
                    keys.append(key)
                    if item.caption is not None:
                        captions.append(item.caption)
                    nboxes.append(item.num_boxes)
                    cls_widths.add(None if item.cls_prob is None else int(item.cls_prob.shape[1]))
                w.close()
            stats = dict(
                name=name, index=k, count=len(keys), bytes=w.pos, sha256=hf.sha.hexdigest(), offsets=w.offsets,
                keys=keys, feature_dim=cfg.feature_dim, encoding=cfg.encoding.to_json(),
                num_classes=cls_widths.pop() if len(cls_widths) == 1 else None,
                regions=dict(min=min(nboxes, default=0), max=max(nboxes, default=0), sum=sum(nboxes)),
                dropped=dropped, build=self.identity(),
            )
            if self.captions is None and captions:  # inline captions: the manifest pools them for negatives
                stats["captions"] = captions
            self._put(tmp, url)
            self._write(stats_name(url), (json.dumps(stats, sort_keys=True) + "\n").encode())
            return stats
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- manifest ---------------------------------------------------------------------------
    def write_manifest(self) -> str:
        """Writes manifest.json (+ dropped.txt, + the inline caption pool) once every shard is
        finished with this build's identity; a shard of another build is refused by name."""
        cfg = self.cfg
        shards, keys_seen, mins, maxs, total_boxes, widths = [], {}, [], [], 0, set()
        inline_pool: list[str] = []
        dropped: list[str] = []
        foreign = []
        for k in range(self.num_shards):
            st = self._read_stats(k)
            if st is None:
                raise BuildError(f"{storage.safe_url(self.shard_url(k))}: not built yet (no stats); the manifest "
                                 f"needs every shard")
            diff = identity_diff(st.get("build"), self.identity())
            if diff:
                foreign.append((k, diff))
                continue
            for key in st["keys"]:
                if key in keys_seen:
                    raise ManifestError(f"duplicate sample key {key!r} in {st['name']} and {keys_seen[key]}")
                keys_seen[key] = st["name"]
            shards.append(ShardInfo(name=st["name"], count=st["count"], bytes=st["bytes"], offsets=st["offsets"], sha256=st["sha256"]))
            if st["count"]:
                mins.append(st["regions"]["min"])
                maxs.append(st["regions"]["max"])
                widths.add(st.get("num_classes"))
            total_boxes += st["regions"]["sum"]
            inline_pool.extend(st.get("captions", []))
            dropped.extend(st.get("dropped", []))
        if foreign:
            raise self._foreign_error(foreign)
        n = sum(s.count for s in shards)
        if n == 0:
            raise BuildError(f"{storage.safe_url(cfg.output)}: every record was left out ({len(dropped)} dropped, "
                             f"listed in the shard stats); no manifest written")
        build = dict(self.identity(), records_dropped=len(dropped), dropped_list=DROPPED_NAME)
        m = Manifest(shards=shards, feature_dim=cfg.feature_dim, num_classes=widths.pop() if len(widths) == 1 else None,
                     caption_pool=CAPTION_POOL_NAME if (self.captions is not None or inline_pool) else None,
                     regions=dict(min=min(mins, default=0), max=max(maxs, default=0), mean=round(total_boxes / max(n, 1), 3)),
                     build=build, encoding=cfg.encoding)
        if self.captions is None and inline_pool:
            self._write(storage.join(cfg.output, CAPTION_POOL_NAME), json.dumps(inline_pool, ensure_ascii=False).encode("utf-8"))
        self._write(storage.join(cfg.output, DROPPED_NAME), "".join(f"{d}\n" for d in dropped).encode("utf-8"))
        url = storage.join(cfg.output, MANIFEST_NAME)
        self._write(url, m.to_json())
        return url

    # -- driver -------------------------------------------------------------------------------
    def _prepare(self, mine: list[int]) -> tuple[list[int], int]:
        """(shards to build, shards already finished). Removes partial files of this slice's
        shards a killed build left; refuses shards of another build (or, with rebuild, removes
        the set's manifest first so no manifest ever describes a mixed set)."""
        cfg = self.cfg
        mine_set = set(mine)
        removed = remove_stale_partials(local_scratch_dir(cfg.output), cfg.prefix, keep=lambda k: k not in mine_set)
        if removed:
            log.info("removed %d partial file(s) an interrupted build left: %s", len(removed), ", ".join(removed[:5]))
        todo, foreign, done = [], [], 0
        for k in mine:
            state, diff = self.shard_state(k)
            if state == "done":
                done += 1
            elif state == "foreign":
                foreign.append((k, diff))
            else:
                todo.append(k)
        if not foreign and not cfg.rebuild:
            # another slice's shard as a canary (one read): slices of a job array started with
            # other arguments would otherwise each succeed and the manifest job refuse at the end
            other = next((k for k in range(self.num_shards) if k not in mine_set), None)
            state, diff = self.shard_state(other) if other is not None else ("todo", [])
            if state == "foreign":
                raise BuildError(f"{storage.safe_url(self.shard_url(other))} was built by another slice or build with "
                                 f"other input or arguments: {'; '.join(diff[:4])}; start every slice with the same "
                                 f"arguments (or pass --rebuild to all of them)")
        extra = self._extra_shards()
        if (foreign or extra) and not cfg.rebuild:
            if foreign:
                raise self._foreign_error(foreign)
            raise BuildError(f"{storage.safe_url(cfg.output)} holds {', '.join(extra[:4])}"
                             f"{' ...' if len(extra) > 4 else ''} beyond this build's {self.num_shards} shard(s) "
                             f"(another build); pass --rebuild to remove them, or choose another --output")
        if foreign or extra:
            log.warning("rebuild: replacing %d shard(s) of another build%s", len(foreign),
                        f" and removing {len(extra)} file(s) beyond shard {self.num_shards - 1}" if extra else "")
            self._remove(storage.join(cfg.output, MANIFEST_NAME))
            for name in extra:
                self._remove(storage.join(cfg.output, name))
            todo = sorted(todo + [k for k, _ in foreign])
        return todo, done

    def run(self) -> BuildSummary:
        with cleanup_on_sigterm():
            return self._run()

    def _run(self) -> BuildSummary:
        t0 = time.time()
        cfg = self.cfg
        self.check_output()
        if not self.handles:
            self.plan()
        mine = [k for k in range(self.num_shards) if k % cfg.num_slices == cfg.slice_index]
        todo, skipped = self._prepare(mine)
        if skipped:
            log.info("resuming: %d of %d shard(s) of this slice already finished", skipped, len(mine))
        if self.captions is not None:
            self._write(storage.join(cfg.output, CAPTION_POOL_NAME),
                        json.dumps(self.captions.pool, ensure_ascii=False).encode("utf-8"))
        totals = dict(samples=0, bytes=0)
        dropped: list[str] = []

        def done(st: dict[str, Any]) -> None:
            totals["samples"] += st["count"]
            totals["bytes"] += st["bytes"]
            dropped.extend(st["dropped"])

        expected = sum(len(self.handles[k * self.per_shard:(k + 1) * self.per_shard]) for k in todo)
        if cfg.workers > 1 and len(todo) > 1:
            self._build_parallel(todo, expected, done)
        else:
            with self.progress_bar(expected) as bar:
                for k in todo:
                    done(self.build_shard(k, bar.update))
        manifest = report = None
        if all(self.is_done(k) for k in range(self.num_shards)):
            manifest = self.write_manifest()
            report = storage.join(cfg.output, DROPPED_NAME)
        return BuildSummary(shards_total=self.num_shards, shards_built=len(todo), shards_skipped=skipped,
                            samples=totals["samples"], bytes=totals["bytes"], seconds=time.time() - t0,
                            records_dropped=len(dropped), manifest=manifest, dropped=dropped, dropped_report=report)

    def progress_bar(self, total: int):
        """The build's bar (a context manager with `update(n)`): tqdm on stderr, per sample."""
        from tqdm import tqdm

        # disable=None: tqdm shows the bar only when stderr is a terminal
        return tqdm(total=total, unit="sample", unit_scale=True, desc=f"shards {self.cfg.prefix}", file=sys.stderr,
                    disable=None if self.cfg.progress else True, dynamic_ncols=True, smoothing=0.1)

    def _build_parallel(self, todo: list[int], expected: int, done: Callable[[dict[str, Any]], None]) -> None:
        """Builds `todo` in forked processes, one shard at a time each; the bar moves per
        sample. A worker error stops the others (each removes its partial file) and is raised
        here; a worker that dies (SIGKILL, OOM) is named with the shard it was building."""
        ctx = mp.get_context("fork")  # workers inherit the index and captions
        queue = list(todo)
        workers: dict[Any, list] = {}  # parent end of the pipe -> [process, shard in progress]

        def assign(conn) -> None:
            k = queue.pop(0) if queue else None
            workers[conn][1] = k
            conn.send(k)

        try:
            for _ in range(min(self.cfg.workers, len(todo))):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(self, child), daemon=True)
                proc.start()
                child.close()
                workers[parent] = [proc, None]
                assign(parent)
            with self.progress_bar(expected) as bar:  # after the forks: tqdm starts a monitor thread
                while any(k is not None for _, k in workers.values()):
                    for conn in mp_connection.wait([c for c, (_, k) in workers.items() if k is not None]):
                        proc, k = workers[conn]
                        try:
                            msg = conn.recv()
                        except EOFError:
                            proc.join(5)
                            raise BuildError(f"build worker {proc.pid} died ({_exit_text(proc.exitcode)}) while building "
                                             f"{storage.safe_url(self.shard_url(k))}; rerun to resume (its partial "
                                             f"file is removed then)") from None
                        if msg[0] == "progress":
                            bar.update(msg[1])
                        elif msg[0] == "done":
                            done(msg[1])
                            assign(conn)
                        elif msg[0] == "error":
                            raise _WORKER_ERRORS[msg[1]](msg[2])
                        else:
                            raise RuntimeError(f"build worker {proc.pid} failed on shard {k}:\n{msg[1]}")
        finally:
            for proc, _ in workers.values():
                if proc.is_alive():
                    proc.terminate()  # SIGTERM: the worker's build_shard unwinds and removes its partial file
            for conn, (proc, _) in workers.items():
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                conn.close()


def build(inp: FeatureInput, captions: Captions | None, cfg: BuildConfig) -> BuildSummary:
    """Builds (this slice of) the shard set; see the module docstring."""
    return ShardBuilder(inp, captions, cfg).run()
