"""Keep the assessment's freed tensor memory in the process instead of handing it back (owner side).

Why: glibc's malloc serves every allocation above a (dynamic, at most 32 MiB) threshold with a
fresh `mmap` and returns it with `munmap` when freed, and each worker thread allocates from its
own arena, whose heaps cannot hold more than 64 MiB. At 224x224 a batch's activations are tens to
hundreds of MiB, so every layer of every oracle pass page-faulted its output in anew: for
EfficientNet-Lite0 half of the process's CPU time was the kernel's (305 of 623 CPU s, 140 million
minor page faults in a 2-sample assessment; docs/benchmarks.md, "helper lite, session 5"), and the
oracle ran at half speed. With one arena and no mmap or trim below 1 GiB, freed blocks are
reused: same results, no faults; the process keeps its peak heap until it exits (the assessment
is a short-lived owner-side command). Linux with glibc only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
_KEEP = 1 << 30  # allocations up to 1 GiB come from (and return to) the heap
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory (once per process); True when the allocator took it."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, _KEEP), (M_TRIM_THRESHOLD, _KEEP)))
    return _done
