"""The node-local shard cache: each remote shard downloaded once per node, verified, then read
from local disk by every rank and loader worker of the node.

Layout of the cache directory, per shard (`<sha256[:16]>-<name>`: the same bytes under two URLs
share one entry; a set without sha256 is keyed by its URL):
- `<entry>`: the verified copy of the whole object;
- `<entry>.ok`: its stamp (size, mtime_ns, inode, sha256 when it was verified); its mtime is the
  entry's last access, the LRU clock of eviction;
- `<entry>.lock`: the flock that orders processes. A reader holds it shared while it reads the
  copy (so no other process evicts it under the reader); the one downloader holds it exclusive
  (the others wait on it, then find the copy there);
- `<entry>.part`: the download in progress, created at its full size so that the space it will
  take counts against the bound from the start.
`.evict.lock` serialises the accounting of the bound (reserve + evict), never held across a
download.

A copy is used only when its stamp matches the file (size, mtime, inode) and the manifest's
sha256; a copy without a valid stamp is hashed again, and one whose size or sha256 differs from
the manifest is refused (logged), deleted and downloaded again. Downloads go through the same
resumable ranged reads as streaming (`storage.RangeReader`) into the `.part` file, hashed as
they arrive, checked for the manifest's size and sha256, then renamed into place.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator

from . import storage
from .manifest import ShardInfo

log = logging.getLogger(__name__)

EVICT_LOCK = ".evict.lock"


@dataclass(frozen=True)
class CacheSpec:
    """Where the cache lives and how many bytes of shards it may hold (picklable: it travels to
    the loader workers)."""

    directory: str
    max_bytes: int


@dataclass
class CacheStats:
    """What one process's cache did: downloads (bytes and requests to the bucket), hits and
    refused copies."""

    downloads: int = 0
    download_bytes: int = 0
    download_requests: int = 0
    hits: int = 0
    refused: int = 0  # cached copies whose size / sha256 did not match the manifest
    evicted: int = 0


def entry_name(shard: ShardInfo) -> str:
    """The cache file name of a shard: content-addressed when the manifest has its sha256."""
    tag = shard.sha256[:16] if shard.sha256 else "url" + hashlib.blake2b(shard.url.encode(), digest_size=8).hexdigest()
    return f"{tag}-{shard.name}"


@contextlib.contextmanager
def _flock(path: str, mode: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


class ShardCache:
    """One process's handle on a node's cache directory. `open(shard)` gives the path of a
    verified local copy (downloading it first when needed) and keeps it from being evicted
    while the caller reads it."""

    def __init__(self, spec: CacheSpec, *, storage_options: dict | None = None, chunk_bytes: int = 8 << 20,
                 parallel: int = 4, retries: int = 6, backoff_s: float = 0.25):
        self.spec = spec
        self.dir = spec.directory
        self.storage_options = storage_options or {}
        self.chunk_bytes, self.parallel, self.retries, self.backoff_s = chunk_bytes, parallel, retries, backoff_s
        self.stats = CacheStats()
        self._verified: dict[str, tuple[int, int, int]] = {}  # entry -> (size, mtime_ns, inode) seen valid
        self._warned_full = False
        os.makedirs(self.dir, exist_ok=True)

    def path(self, shard: ShardInfo) -> str:
        return os.path.join(self.dir, entry_name(shard))

    @contextlib.contextmanager
    def open(self, shard: ShardInfo, stats: CacheStats | None = None) -> Iterator[str]:
        """The local path of `shard`'s verified copy, held (shared lock) until the block ends.
        Counters go to `stats` (default: the handle's own)."""
        stats = self.stats if stats is None else stats
        data = self.path(shard)
        fd = os.open(data + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            for _ in range(3):  # a lock conversion is not atomic: an evictor may slip in between
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._stamped(shard, data):
                    stats.hits += 1
                    break
                fcntl.flock(fd, fcntl.LOCK_EX)  # one downloader per shard; the others wait here
                found = self._check(shard, data, stats)  # another process may have downloaded it meanwhile
                if not found:
                    self._download(shard, data, stats)
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._stamped(shard, data):
                    stats.hits += found
                    break
            else:
                raise storage.ShardReadError(shard.url, f"cached copy {data} kept disappearing (evicted while opened)")
            try:
                os.utime(data + ".ok")  # the LRU clock
            except FileNotFoundError:
                pass
            yield data
        finally:
            os.close(fd)

    # -- verification --------------------------------------------------------------------------
    def _stamped(self, shard: ShardInfo, data: str) -> bool:
        """True when the copy's stamp says it was verified as it is now (cheap: two stats)."""
        try:
            st = os.stat(data)
        except FileNotFoundError:
            return False
        now = (st.st_size, st.st_mtime_ns, st.st_ino)
        name = os.path.basename(data)
        if self._verified.get(name) == now:
            return True
        try:
            with open(data + ".ok", encoding="utf-8") as f:
                stamp = json.load(f)
        except (FileNotFoundError, ValueError):
            return False
        ok = (st.st_size == shard.bytes and (stamp.get("size"), stamp.get("mtime_ns"), stamp.get("inode")) == now
              and stamp.get("sha256") == shard.sha256)
        if ok:
            self._verified[name] = now
        return ok

    def _check(self, shard: ShardInfo, data: str, stats: CacheStats) -> bool:
        """Under the exclusive lock: a copy without a valid stamp is hashed; a copy whose size or
        sha256 differs from the manifest is refused and deleted (True: a good copy is there)."""
        if self._stamped(shard, data):
            return True
        try:
            size = os.stat(data).st_size
        except FileNotFoundError:
            return False
        why = None
        if size != shard.bytes:
            why = f"{size} bytes, the manifest says {shard.bytes}"
        elif shard.sha256:
            digest = _sha256_file(data)
            if digest != shard.sha256:
                why = f"sha256 {digest[:16]}..., the manifest says {shard.sha256[:16]}..."
        if why is None:
            self._stamp(shard, data)
            return True
        stats.refused += 1
        log.warning("cached shard %s (%s): %s; refused, downloading it again", data, storage.safe_url(shard.url), why)
        _unlink(data, data + ".ok")
        return False

    def _stamp(self, shard: ShardInfo, data: str) -> None:
        st = os.stat(data)
        storage.write_bytes(data + ".ok", json.dumps(dict(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                                                          sha256=shard.sha256, url=storage.safe_url(shard.url))).encode())
        self._verified[os.path.basename(data)] = (st.st_size, st.st_mtime_ns, st.st_ino)

    # -- download ------------------------------------------------------------------------------
    def _download(self, shard: ShardInfo, data: str, stats: CacheStats) -> None:
        """Under the shard's exclusive lock: the whole object into `<entry>.part` (reserved at
        its full size), verified, renamed into place, stamped."""
        part = data + ".part"
        self._reserve(part, shard.bytes, stats)
        rstats = storage.ReadStats()
        sha = hashlib.sha256()
        try:
            fd = os.open(part, os.O_WRONLY)
            try:
                pos = 0
                if shard.bytes:
                    reader = storage.RangeReader(shard.url, 0, shard.bytes, storage_options=self.storage_options,
                                                 chunk_bytes=self.chunk_bytes, parallel=self.parallel,
                                                 retries=self.retries, backoff_s=self.backoff_s, stats=rstats)
                    for chunk in reader:
                        view = memoryview(chunk)
                        sha.update(view)
                        while view:
                            n = os.pwrite(fd, view, pos)
                            pos += n
                            view = view[n:]
                os.fdatasync(fd)  # the rename must not expose a file whose blocks are not on disk yet
            finally:
                os.close(fd)
            stats.download_bytes += rstats.bytes
            stats.download_requests += rstats.requests
            if pos != shard.bytes:
                raise storage.ShardReadError(shard.url, f"downloaded {pos} bytes, the manifest says {shard.bytes}")
            if shard.sha256 and sha.hexdigest() != shard.sha256:
                raise storage.ShardReadError(shard.url, f"downloaded bytes have sha256 {sha.hexdigest()[:16]}..., "
                                                        f"the manifest says {shard.sha256[:16]}... (object changed "
                                                        f"since the manifest was written?)")
            os.replace(part, data)
        except BaseException:
            _unlink(part)
            raise
        self._stamp(shard, data)
        stats.downloads += 1
        log.info("cached %s (%.1f MB) in %s", storage.safe_url(shard.url), shard.bytes / 1e6, self.dir)

    def _reserve(self, part: str, nbytes: int, stats: CacheStats) -> None:
        """Creates `part` at `nbytes` (sparse: it counts against the bound at once) and evicts
        least-recently-used copies that no process holds until the cache fits its bound."""
        with _flock(os.path.join(self.dir, EVICT_LOCK), fcntl.LOCK_EX):
            with open(part, "wb") as f:
                f.truncate(nbytes)
            entries = _scan(self.dir)
            used = sum(e.size for e in entries)
            mine = os.path.basename(part)[: -len(".part")]
            for e in sorted(entries, key=lambda e: (e.complete, e.access)):  # stale parts first, then LRU
                if used <= self.spec.max_bytes:
                    break
                if e.name == mine:
                    continue
                lock = os.path.join(self.dir, e.name + ".lock")
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as err:
                        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                            continue  # read or being downloaded by some process right now
                        raise
                    base = os.path.join(self.dir, e.name)
                    if e.complete:
                        _unlink(base, base + ".ok")
                        stats.evicted += 1
                        log.info("cache %s: evicted %s (%.1f MB, least recently used)", self.dir, e.name, e.size / 1e6)
                    else:
                        _unlink(base + ".part")  # left by a downloader that died
                    used -= e.size
                finally:
                    os.close(fd)
            if used > self.spec.max_bytes and not self._warned_full:
                self._warned_full = True
                log.warning("cache %s holds %.1f MB, over its bound of %.1f MB (data.cache_bytes): every other "
                            "cached shard is being read", self.dir, used / 1e6, self.spec.max_bytes / 1e6)


@dataclass
class _Entry:
    name: str  # entry name (no suffix)
    size: int
    access: int  # ns: the stamp's mtime (last open), else the file's
    complete: bool  # False: a .part


def _scan(directory: str) -> list[_Entry]:
    out = []
    with os.scandir(directory) as it:
        files = {e.name: e for e in it if e.is_file()}
    for name, e in files.items():
        if name.endswith((".lock", ".ok")) or name.startswith("."):
            continue
        try:
            st = e.stat()
        except FileNotFoundError:
            continue
        if name.endswith(".part"):
            out.append(_Entry(name[: -len(".part")], st.st_size, st.st_mtime_ns, False))
            continue
        stamp = files.get(name + ".ok")
        try:
            access = stamp.stat().st_mtime_ns if stamp is not None else st.st_mtime_ns
        except FileNotFoundError:
            access = st.st_mtime_ns
        out.append(_Entry(name, st.st_size, access, True))
    return out


def cached_bytes(directory: str) -> int:
    """Bytes the cache directory holds (copies and downloads in progress)."""
    return sum(e.size for e in _scan(directory)) if os.path.isdir(directory) else 0


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(8 << 20)
            if not block:
                return h.hexdigest()
            h.update(block)


def _unlink(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


_OPEN: dict[tuple, ShardCache] = {}


def shard_cache(spec: CacheSpec, **read) -> ShardCache:
    """The process's ShardCache for `spec` (one per process and spec: a forked worker makes its own)."""
    key = (os.getpid(), spec, tuple(sorted((k, repr(v)) for k, v in read.items())))
    cache = _OPEN.get(key)
    if cache is None:
        cache = _OPEN[key] = ShardCache(spec, **read)
    return cache
