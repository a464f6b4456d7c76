"""Byte-exact tar I/O for shards: a deterministic USTAR writer and a streaming member parser.

The writer emits plain USTAR members with fixed metadata (mtime 0, uid/gid 0, mode 0444, no
user names), so the same samples always give the same bytes, and it records the byte offset
where each sample starts. Those offsets (manifest) let a reader start at any sample with a
ranged read and re-synchronise after a corrupt sample. Any tar reader (GNU tar, Python
`tarfile`, webdataset) reads the result.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import numpy as np

BLOCK = 512  # tar block size, bytes
_ZERO_BLOCK = bytes(BLOCK)
_NAME_MAX = 100  # USTAR name field (we never use the prefix field: keys are short)


class TarFormatError(ValueError):
    """A tar header or member that cannot be parsed (truncated, bad checksum, not USTAR)."""


def _octal(value: int, width: int) -> bytes:
    digits = format(value, "o").encode()
    if len(digits) > width - 1:
        raise ValueError(f"tar field overflow: {value} does not fit {width - 1} octal digits")
    return digits.rjust(width - 1, b"0") + b"\0"


def member_header(name: str, size: int) -> bytes:
    """A 512-byte USTAR header for a regular file with fixed, deterministic metadata."""
    raw = name.encode("utf-8")
    if len(raw) >= _NAME_MAX:
        raise ValueError(f"tar member name too long ({len(raw)} bytes, max {_NAME_MAX - 1}): {name!r}")
    header = bytearray(BLOCK)
    header[0:len(raw)] = raw
    header[100:108] = _octal(0o444, 8)  # mode
    header[108:116] = _octal(0, 8)  # uid
    header[116:124] = _octal(0, 8)  # gid
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)  # mtime: fixed so builds are byte-for-byte reproducible
    header[148:156] = b" " * 8  # checksum placeholder while summing
    header[156:157] = b"0"  # regular file
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    checksum = sum(header)
    header[148:156] = format(checksum, "o").encode().rjust(6, b"0") + b"\0 "
    return bytes(header)


def padded(size: int) -> int:
    """Bytes a member of `size` data bytes occupies after its header (rounded up to 512)."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


class TarShardWriter:
    """Writes samples (ordered members) to a binary file and records sample offsets.

    `offsets[i]` is the byte offset of sample i's first header; `offsets[-1]` after `close()`
    is the end of the last sample (where the two end-of-archive blocks start).
    """

    def __init__(self, fileobj: BinaryIO):
        self.f = fileobj
        self.pos = 0
        self.offsets: list[int] = []
        self.keys: list[str] = []
        self.closed = False

    def write_sample(self, key: str, members: Iterable[tuple[str, bytes]]) -> int:
        """Writes `key.<ext>` for each (ext, data); returns the bytes written."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        start = self.pos
        self.offsets.append(start)
        self.keys.append(key)
        for ext, data in members:
            header = member_header(f"{key}.{ext}", len(data))
            self.f.write(header)
            self.f.write(data)
            pad = padded(len(data)) - len(data)
            if pad:
                self.f.write(b"\0" * pad)
            self.pos += BLOCK + padded(len(data))
        return self.pos - start

    def close(self) -> None:
        """Appends the end-of-archive marker (two zero blocks). Does not close the file."""
        if not self.closed:
            self.offsets.append(self.pos)
            self.f.write(b"\0" * (2 * BLOCK))
            self.pos += 2 * BLOCK
            self.closed = True


@dataclass
class Member:
    name: str
    data: bytes


def parse_header(header: bytes, where: str) -> tuple[str, int] | None:
    """(name, size) of a USTAR/GNU regular-file header; None for an end-of-archive block."""
    header = bytes(header)
    if len(header) < BLOCK:
        raise TarFormatError(f"{where}: truncated tar header ({len(header)} of {BLOCK} bytes)")
    if header == _ZERO_BLOCK:
        return None
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        expected = int(stored or b"0", 8)
    except ValueError:
        raise TarFormatError(f"{where}: tar header checksum field is not octal: {stored!r}") from None
    actual = int(np.frombuffer(header, dtype=np.uint8).sum(dtype=np.int64)) - sum(header[148:156]) + 8 * 32
    if actual != expected:
        raise TarFormatError(f"{where}: tar header checksum mismatch (corrupt or not a tar header)")
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
    if prefix:
        name = f"{prefix}/{name}"
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarFormatError(f"{where}: tar member size field is not octal") from None
    if header[156:157] not in (b"0", b"\0"):
        raise TarFormatError(f"{where}: member {name!r} has tar type {header[156:157]!r}; shards hold regular files only")
    return name, size


def parse_sample(data, where: str) -> list[Member]:
    """Members of one sample's byte range (from its first header to the next sample's); member
    data are slices of `data` (zero-copy when `data` is a memoryview)."""
    members: list[Member] = []
    pos = 0
    while pos < len(data):
        parsed = parse_header(data[pos:pos + BLOCK], f"{where} @+{pos}")
        if parsed is None:
            break
        name, size = parsed
        start = pos + BLOCK
        if start + size > len(data):
            raise TarFormatError(f"{where}: member {name!r} truncated ({len(data) - start} of {size} bytes)")
        members.append(Member(name, data[start:start + size]))
        pos = start + padded(size)
    return members


def iter_members(f: BinaryIO, where: str):
    """Yields (offset, Member) for every member of a whole tar stream (used by verify/index)."""
    pos = 0
    while True:
        header = f.read(BLOCK)
        if not header:
            raise TarFormatError(f"{where}: tar ends without the end-of-archive marker (truncated) at byte {pos}")
        parsed = parse_header(header, f"{where} @{pos}")
        if parsed is None:
            return
        name, size = parsed
        body = f.read(padded(size))
        if len(body) < size:
            raise TarFormatError(f"{where}: member {name!r} at byte {pos} truncated ({len(body)} of {size} bytes)")
        yield pos, Member(name, body[:size])
        pos += BLOCK + padded(size)


def split_name(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/KEY.ext.npy' -> ('KEY', 'ext.npy') (key up to the first dot
    of the base name)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return base, ""
    key, ext = base.split(".", 1)
    return key, ext


def tar_bytes(samples: Iterable[tuple[str, Iterable[tuple[str, bytes]]]]) -> bytes:
    """A whole tar in memory (tests and small tools)."""
    buf = io.BytesIO()
    w = TarShardWriter(buf)
    for key, members in samples:
        w.write_sample(key, members)
    w.close()
    return buf.getvalue()
