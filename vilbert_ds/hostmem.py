"""Host-memory allocator settings for training on CPU, and what a process has committed.

glibc's malloc serves every block above its mmap threshold (dynamic, 128 KiB rising to at most
32 MiB on 64-bit) with a fresh `mmap()` and unmaps it on `free()`, and gives the top of its heap
back to the kernel once more than twice that threshold is free there. A training step allocates
and frees the same blocks every time (activations, gradients, DeepSpeed's flat buffers), so each
step page-faults them in again and the kernel zero-fills every page (docs/PERFORMANCE.md).
`keep_freed_memory()` keeps freed memory for reuse, within bounds:
- blocks up to `MAX_HEAP_BLOCK` (32 MiB, the largest mmap threshold glibc accepts) come from the
  heap and are reused by the next step; larger ones still go back to the kernel when freed;
- free memory at the top of the heap is kept up to `MAX_KEPT_TOP` (512 MiB) instead of 64 MiB.
The bounds are the point. The first setting (commit 0517e5d) never used mmap and never trimmed,
so every block, however large, came from the heap, and a heap only ever gives back its top. A
2 GB buffer allocated per step (DeepSpeed's default ZeRO bucket) left a 2 GB hole that smaller
blocks then split, so a later step extended the heap by 2 GB more: the demo model on 2 ranks
reached a 9.7-11.6 GB heap mapping in 32-64 steps with 0.6 GB resident, all of it committed.
Each DataLoader worker forked from such a process is charged the whole heap again, and under the
kernel's default overcommit heuristic `fork()` fails with ENOMEM as soon as one mapping of the
parent is larger than RAM + swap, however much memory is free (issue 12 item 5). With the
bounds, the heap holds what the step keeps live in blocks up to 32 MiB plus at most 512 MiB free.

Opt out with `VILBERT_DS_KEEP_FREED_MEMORY=0` (glibc's defaults). Not applied on GPU runs (device
memory has its own caching allocator; the host side allocates little per step).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1

MAX_HEAP_BLOCK = 32 * 2**20  # glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
MAX_KEPT_TOP = 512 * 2**20  # free heap top kept for reuse (glibc's dynamic default ends at 64 MiB)

_applied: str | None = None


def keep_freed_memory(*, max_block: int | None = MAX_HEAP_BLOCK, max_kept: int | None = MAX_KEPT_TOP) -> bool:
    """Set glibc's malloc to keep freed blocks of up to `max_block` bytes in the heap for reuse,
    trimming its top only above `max_kept` free bytes. Returns whether the setting is in effect;
    a no-op off glibc or when opted out. Once per process (the first call's bounds stay).

    `max_block=None, max_kept=None` is the unbounded setting of commit 0517e5d (never mmap, never
    trim), kept for `bench/host_alloc.py` to measure against; do not train with it."""
    global _applied
    if _applied is not None:
        return True
    if os.environ.get("VILBERT_DS_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if max_block is None:
        ok = mallopt(M_MMAP_MAX, 0) == 1
    else:
        ok = mallopt(M_MMAP_THRESHOLD, int(max_block)) == 1
    ok = ok and mallopt(M_TRIM_THRESHOLD, INT_MAX if max_kept is None else int(max_kept)) == 1
    if ok:
        _applied = "unbounded" if max_block is None else f"blocks <= {max_block >> 20} MiB, top <= {max_kept >> 20} MiB"
        log.debug("glibc malloc keeps freed memory for reuse (%s)", _applied)
    return ok


@dataclass(frozen=True)
class Committed:
    """What the kernel charges a process for (its private writable mappings: heap, anonymous
    mmaps, stacks, writable data), in bytes. `largest` is the largest single such mapping: with
    the default overcommit heuristic, `fork()` fails with ENOMEM when one mapping of the parent
    exceeds RAM + swap, whatever is free."""

    total: int
    largest: int
    resident: int

    def __str__(self) -> str:
        return f"{self.total / 2**20:.0f} MiB committed (largest mapping {self.largest / 2**20:.0f} MiB, " \
               f"{self.resident / 2**20:.0f} MiB resident)"


def committed(pid: int | str = "self") -> Committed | None:
    """`Committed` of a process from /proc (Linux); None where /proc cannot tell."""
    total = largest = 0
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                span, perms = line.split(None, 2)[:2]
                if perms[1] == "w" and perms[3] == "p":
                    lo, hi = span.split("-")
                    size = int(hi, 16) - int(lo, 16)
                    total += size
                    largest = max(largest, size)
        with open(f"/proc/{pid}/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return Committed(total=total, largest=largest, resident=resident)
