"""Storage through fsspec: URLs, small-file I/O, and ranged reads that survive broken connections.

Every path (local, `file://`, `s3://`, `gs://`, `http(s)://`) goes through the same functions.
`RangeReader` reads a byte range of a shard in chunks, several chunks in flight (parallel ranged
GETs give object stores the throughput of several connections), and resumes a chunk at the exact
byte where a connection broke: the bytes received before the cut are kept, the next request
starts after them. Transient errors are retried with exponential backoff; what stays unreadable
raises `ShardReadError` naming the URL (never credentials).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import posixpath
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
import numpy as np
from fsspec.core import url_to_fs as _url_to_fs

from .config import check_url, redact

log = logging.getLogger(__name__)

# Errors that retrying cannot fix: the object is absent or forbidden, or the request (or the
# storage options) are wrong.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TypeError,
                    ValueError, NotImplementedError)
_S3_STREAM_PIECE = 1 << 20  # bytes per body.read() of a streamed S3 GET


def is_permanent(e: BaseException) -> bool:
    """True for errors a retry cannot fix (missing, forbidden, bad request/options, HTTP 4xx
    other than 408/429)."""
    if isinstance(e, PERMANENT_ERRORS):
        return True
    status = getattr(e, "status", None) or getattr(e, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


class ShardReadError(OSError):
    """A shard (or a byte range of it) that stayed unreadable after retries."""

    def __init__(self, url: str, message: str):
        super().__init__(f"{safe_url(url)}: {redact(message)}")  # error texts can quote signed URLs
        self.url = safe_url(url)


def safe_url(url: str) -> str:
    """The URL as it may appear in logs (user:password@ and presigned signatures removed)."""
    return redact(str(url))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, *names: str) -> str:
    """Joins URL path components without touching the protocol (`s3://b/x` + `y` -> `s3://b/x/y`)."""
    if is_local(base):
        return os.path.join(local_path(base), *names)
    return posixpath.join(base, *names)


def dirname(url: str) -> str:
    if is_local(url):
        return os.path.dirname(os.path.abspath(local_path(url)))
    proto, rest = url.split("://", 1)
    return f"{proto}://{posixpath.dirname(rest)}"


def basename(url: str) -> str:
    return posixpath.basename(local_path(url).rstrip("/"))


def get_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for a URL; fsspec caches filesystem instances per process and
    re-creates them after fork (DataLoader workers). Credentials inside an object-store URL are
    refused here, before any request (`config.check_url`)."""
    check_url(url)
    return _url_to_fs(url, **(storage_options or {}))


_INHERITED: list = []  # filesystem instances a forked child got from its parent; never used, never closed


def forget_inherited_filesystems() -> None:
    """In a forked child: drop the parent's cached fsspec instances without closing them.
    Their async sessions belong to the parent's event loop; closing them from the child fails
    ("attached to a different loop") and stalls. Call first thing in a forked worker."""
    from fsspec.spec import AbstractFileSystem

    stack = [AbstractFileSystem]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        cache = getattr(cls, "_cache", None)
        if cache:
            _INHERITED.extend(cache.values())
            cache.clear()
        cls._pid = os.getpid()


def with_retries(fn: Callable, what: str, *, retries: int = 6, backoff_s: float = 0.25,
                 on_retry: Callable[[], None] | None = None):
    """Calls fn() and retries transient errors with exponential backoff (capped at 8 s)."""
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - object stores raise many transient error types
            if is_permanent(e):
                clean = redacted_error(e)
                if clean is e:
                    raise
                raise clean from None  # the original (and its traceback) would quote the signed URL
            if attempt == retries:
                raise ShardReadError(what, f"failed after {retries + 1} attempts: {type(e).__name__}: {e}") from e
            log.warning("%s: %s: %s; retry %d/%d in %.2fs", safe_url(what), type(e).__name__, redact(str(e)), attempt + 1,
                        retries, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def redacted_error(e: BaseException) -> BaseException:
    """`e`, or an error of the same type whose message has its URLs redacted: errors of fsspec's
    HTTP and object-store layers quote the full URL, presigned signature included."""
    text = str(e)
    clean = redact(text)
    if clean == text:
        return e
    try:
        if isinstance(e, OSError) and e.errno is not None:
            return type(e)(e.errno, redact(str(e.strerror)), *( [redact(str(e.filename))] if e.filename else []))
        return type(e)(clean)
    except Exception:  # noqa: BLE001 - an error type with another constructor: say what it was
        return OSError(f"{type(e).__name__}: {clean}")


def read_bytes(url: str, storage_options: dict | None = None, *, retries: int = 6, backoff_s: float = 0.25) -> bytes:
    """A whole (small) file: manifests, stats, caption pools."""
    def fetch():
        fs, path = get_fs(url, storage_options)
        return fs.cat_file(path)
    return with_retries(fetch, url, retries=retries, backoff_s=backoff_s)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def _umask_mode() -> int:
    """0666 minus the process umask: what open() would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Writes a whole file atomically: local files via rename, object stores by one PUT."""
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs, path = get_fs(url, storage_options)
    fs.pipe_file(path, data)


def put_file(local: str, url: str, storage_options: dict | None = None) -> None:
    """Moves a finished local file to `url` (rename on local disk; upload + delete otherwise).
    Object stores make the upload visible only when complete (multipart upload for large files)."""
    if is_local(url):
        dest = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        os.chmod(local, _umask_mode())
        os.replace(local, dest)
        return
    fs, path = get_fs(url, storage_options)
    fs.put_file(local, path)
    os.unlink(local)


def file_size(url: str, storage_options: dict | None = None) -> int | None:
    fs, path = get_fs(url, storage_options)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# ranged reads


@dataclass
class ReadStats:
    """Counters of one reader (bytes, requests, retries, resumed cuts)."""

    bytes: int = 0
    requests: int = 0
    retries: int = 0
    resumed: int = 0  # chunk reads continued after a broken connection


class Fill:
    """A chunk buffer being filled: `buf[:n]` holds the bytes that arrived so far."""

    __slots__ = ("buf", "n")

    def __init__(self, size: int):
        # allocated once at its final size, uninitialised: growing a buffer piece by piece
        # re-copies it and touches fresh pages at every step (half the S3 client's CPU time
        # before). numpy also asks the kernel for huge pages for large buffers, so filling
        # them costs a few page faults per chunk instead of one per 4 KiB.
        self.buf = memoryview(np.empty(size, dtype=np.uint8))
        self.n = 0

    def put(self, piece) -> None:
        k = len(piece)
        self.buf[self.n:self.n + k] = piece
        self.n += k


class _Backend:
    """Reads a byte range of one object into a Fill; may stop early (a cut connection)."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url = url
        self.storage_options = storage_options or {}

    def read_into(self, start: int, fill: Fill) -> None:
        """Fills `fill` from byte `start + fill.n` to its end; raises on errors after recording
        what arrived (the caller resumes at start + fill.n)."""
        raise NotImplementedError


class _LocalBackend(_Backend):
    def read(self, start, end) -> np.ndarray:
        """The whole range at once (local files do not break mid-transfer), uint8 [end - start]."""
        fill = Fill(end - start)
        self.read_into(start, fill)
        return fill.buf.obj

    def read_into(self, start, fill):
        with open(local_path(self.url), "rb") as f:
            f.seek(start + fill.n)
            while fill.n < len(fill.buf):
                got = f.readinto(fill.buf[fill.n:])
                if not got:
                    raise EOFError(f"file ends at byte {start + fill.n}, expected {start + len(fill.buf)}")
                fill.n += got


class _S3Backend(_Backend):
    """Streams a ranged GET body through s3fs' client so a cut keeps the bytes before it."""

    def read_into(self, start, fill):
        from fsspec.asyn import sync

        fs, path = get_fs(self.url, self.storage_options)
        bucket, key, version = fs.split_path(path)
        pos, end = start + fill.n, start + len(fill.buf)
        kwargs = dict(Bucket=bucket, Key=key, Range=f"bytes={pos}-{end - 1}")
        if version:
            kwargs["VersionId"] = version

        async def fetch():
            resp = await fs._call_s3("get_object", **kwargs)
            body = resp["Body"]
            try:
                while fill.n < len(fill.buf):
                    got = await body.readinto(fill.buf[fill.n:fill.n + _S3_STREAM_PIECE])
                    if not got:
                        raise EOFError(f"stream ended {len(fill.buf) - fill.n} bytes early")
                    fill.n += got
            finally:
                body.close()

        sync(fs.loop, fetch)


class _FsspecBackend(_Backend):
    """Any other fsspec filesystem: small ranged cat_file calls (a cut loses at most one)."""

    piece = 1 << 20

    def read_into(self, start, fill):
        fs, path = get_fs(self.url, self.storage_options)
        end = start + len(fill.buf)
        while fill.n < len(fill.buf):
            pos = start + fill.n
            stop = min(end, pos + self.piece)
            data = fs.cat_file(path, start=pos, end=stop)
            fill.put(data)
            if len(data) < stop - pos:
                raise EOFError(f"short read at byte {pos + len(data)}, expected {stop}")


def backend_for(url: str, storage_options: dict | None) -> _Backend:
    if is_local(url):
        return _LocalBackend(url, storage_options)
    if url.startswith(("s3://", "s3a://")):
        return _S3Backend(url, storage_options)
    return _FsspecBackend(url, storage_options)


class RangeReader:
    """Iterates the bytes [start, end) of `url` as chunks of `chunk_bytes`, with `parallel`
    chunk reads in flight. Each chunk resumes at the exact offset after a broken connection and
    retries transient errors `retries` times with backoff; then `ShardReadError`."""

    def __init__(self, url: str, start: int, end: int, *, storage_options: dict | None = None,
                 chunk_bytes: int = 8 << 20, parallel: int = 4, retries: int = 6, backoff_s: float = 0.25,
                 stats: ReadStats | None = None):
        self.url, self.start, self.end = url, start, end
        self.chunk_bytes = chunk_bytes
        self.parallel = max(1, parallel)
        self.retries, self.backoff_s = retries, backoff_s
        self.stats = stats if stats is not None else ReadStats()
        self.backend = backend_for(url, storage_options)
        self._lock = threading.Lock()

    def _read_chunk(self, start: int, end: int) -> np.ndarray:
        if isinstance(self.backend, _LocalBackend):  # no partial transfers: skip the resume buffer
            try:
                data = with_retries(lambda: self.backend.read(start, end), self.url, retries=self.retries,
                                    backoff_s=self.backoff_s)
            except PERMANENT_ERRORS as e:
                raise ShardReadError(self.url, f"{type(e).__name__}: {e}") from e
            with self._lock:
                self.stats.requests += 1
                self.stats.bytes += len(data)
            return data
        fill = Fill(end - start)
        delay = self.backoff_s
        failures = 0
        while fill.n < end - start:
            pos = start + fill.n
            before = fill.n
            try:
                with self._lock:
                    self.stats.requests += 1
                self.backend.read_into(start, fill)
            except Exception as e:  # noqa: BLE001 - network stacks raise many transient types
                if is_permanent(e):
                    raise ShardReadError(self.url, f"{type(e).__name__}: {e}") from e
                if fill.n > before:  # a cut mid-transfer: keep the bytes, continue where it broke
                    with self._lock:
                        self.stats.resumed += 1
                    log.info("%s: connection broke at byte %d (%s); resuming there",
                             safe_url(self.url), start + fill.n, type(e).__name__)
                    failures, delay = 0, self.backoff_s
                    continue
                failures += 1
                if failures > self.retries:
                    raise ShardReadError(self.url, f"bytes {pos}-{end}: failed after {failures} attempts: "
                                                   f"{type(e).__name__}: {e}") from e
                with self._lock:
                    self.stats.retries += 1
                log.warning("%s: bytes %d-%d: %s: %s; retry %d/%d in %.2fs", safe_url(self.url), pos, end,
                            type(e).__name__, redact(str(e)), failures, self.retries, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        with self._lock:
            self.stats.bytes += fill.n
        return fill.buf.obj

    def __iter__(self) -> Iterator[np.ndarray]:
        bounds = [(s, min(s + self.chunk_bytes, self.end)) for s in range(self.start, self.end, self.chunk_bytes)]
        if self.parallel == 1 or len(bounds) <= 1 or isinstance(self.backend, _LocalBackend):
            # local files: sequential reads (the page cache reads ahead; threads only add overhead)
            for s, e in bounds:
                yield self._read_chunk(s, e)
            return
        with cf.ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="shard-read") as pool:
            pending: deque = deque()
            it = iter(bounds)
            try:
                for s, e in it:
                    pending.append(pool.submit(self._read_chunk, s, e))
                    if len(pending) >= self.parallel:
                        break
                while pending:
                    data = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(self._read_chunk, *nxt))
                    yield data
            finally:
                for fut in pending:
                    fut.cancel()


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None, **kwargs):
    """fsspec.open for whole-file streaming (verify, index)."""
    check_url(url)
    return fsspec.open(url, mode, **(storage_options or {}), **kwargs)
