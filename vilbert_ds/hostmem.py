"""Host-memory allocator settings for training on CPU.

glibc's malloc serves every block above its mmap threshold (dynamic, at most 32 MiB on 64-bit)
with a fresh `mmap()` and unmaps it on `free()`. A training step allocates and frees the same
large blocks every time (activations, gradients such as the 30522 x 768 word-embedding
gradient, DeepSpeed's flat buffers), so each step page-faults them in again and the kernel
zero-fills every page: on CPU that costs 15-25% of a base-size step (docs/PERFORMANCE.md).
`keep_freed_memory()` turns this off for the process (`mallopt`): blocks come from the heap
and freed heap is kept, so a step reuses the memory of the previous one. The resident size
then stays at the step's peak, which the next step would reach again anyway. The cost shows
when a process changes its allocation pattern for good: one that builds several engines one
after another keeps more (bench/zero.py, 4 engines in turn: max RSS 1.37 instead of 1.07 GiB).

Opt out with `VILBERT_DS_KEEP_FREED_MEMORY=0`. Not applied on GPU runs (device memory has its own
caching allocator; the host side allocates little per step).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (no mmap per large block, no trimming).
    Returns whether the setting is in effect; a no-op off glibc or when opted out."""
    global _applied
    if _applied:
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
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
    if ok:
        _applied = True
        log.debug("glibc malloc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=%d (freed memory kept for reuse)", INT_MAX)
    return ok
