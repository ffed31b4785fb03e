"""Process hardening for the enclave worker (enclave side, run first thing in the worker).

What the sim backend can do without hardware: make the process non-dumpable (no ptrace attach by
same-user processes, no /proc/PID/mem reads by them, no core dumps), set the core-file limit to
zero, and lock memory so decrypted inputs and keys are not swapped to disk. None of this stops root
or the kernel; docs/tee.md says so. Linux only, through ctypes; each step reports honestly whether
it applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from typing import Any

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _err() -> str:
    e = ctypes.get_errno()
    return f"{os.strerror(e)} (errno {e})"


def set_non_dumpable(libc: ctypes.CDLL | None) -> str:
    if libc is None:
        return "skipped: not Linux"
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return f"failed: prctl(PR_SET_DUMPABLE, 0): {_err()}"
    return "applied" if libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 else "failed: still dumpable"


def disable_core_files() -> str:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        return f"failed: setrlimit(RLIMIT_CORE, 0): {e}"
    return "applied"


def lock_memory(libc: ctypes.CDLL | None) -> str:
    """mlockall(MCL_CURRENT|MCL_FUTURE[|MCL_ONFAULT]) only when RLIMIT_MEMLOCK is unlimited.

    Why the condition: with a finite limit, a Python process is already past it (so the call
    fails), or, worse, it succeeds and later allocations fail once the locked total reaches the
    limit, crashing the worker mid-request. MCL_ONFAULT (Linux 4.4+) locks pages as they are
    touched instead of populating every reserved mapping up front.
    """
    if libc is None:
        return "skipped: not Linux"
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY:
        return f"skipped: RLIMIT_MEMLOCK is {soft} bytes, too small to lock a Python worker safely"
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return "applied (MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)"
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        return "applied (MCL_CURRENT|MCL_FUTURE)"
    return f"failed: mlockall: {_err()}"


def harden_process(lock: bool = True) -> dict[str, Any]:
    """Apply every step; return {step: "applied" | "skipped: why" | "failed: why"}."""
    libc = _libc()
    return {
        "non_dumpable": set_non_dumpable(libc),
        "no_core_files": disable_core_files(),
        "memory_locked": lock_memory(libc) if lock else "skipped: disabled by option",
    }
