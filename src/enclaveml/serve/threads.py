"""How many torch threads a lone request's FrontNet or BackNet pass uses: the machine's cores when
it has them to itself, one otherwise, chosen by measuring both.

Trust side: host (the BackNet) and enclave (the FrontNet) each keep their own; pure logic apart
from `torch.set_num_threads` on the calling thread (torch's OpenMP thread count is per thread,
so one pass's choice never changes another thread's).

Why: under load every process runs one torch thread, so the two processes and their batches share
the cores without oversubscription. A lone single-image request, though, would then use one core
of a machine whose plain PyTorch baseline uses all of them for the same model. Whether more
threads help depends on what else runs on the machine (on a 2-core machine shared with other
work, a 2-thread pass waits at every barrier for a descheduled thread and is several times
slower), so `LoneThreads` measures: per batch size (rows), a running mean of the pass's wall time
at 1 thread and at `best` threads; it picks the faster, and measures the other one afresh once its
figure is `explore_s` old (doubling up to `MAX_EXPLORE_S` each time a re-measure confirms the
choice, so that a loaded machine pays a slow multi-thread pass rarely). Only small passes (at
most `max_rows` rows) that start while no other pass runs in the process are eligible; every
other pass runs at the process's own thread count (`base`, 1 when serving), as before.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

#: Rows (images) of the largest pass that may use more than one thread.
LONE_MAX_ROWS = 4
#: Seconds after which the option not chosen is measured again (a changed machine load).
EXPLORE_S = 2.0
#: Longest wait between re-measures of the option not chosen.
MAX_EXPLORE_S = 64.0
#: Weight of a new sample in the running mean.
ALPHA = 0.3


def machine_threads() -> int:
    """The cores this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: GOMP_SPINCOUNT given to the enclave worker (and set by `serve.launcher`) when the environment
#: names no OpenMP wait policy: libgomp's default (300,000 spins, milliseconds) keeps an idle
#: OpenMP thread spinning on a core long after a multi-thread pass, where the other process (the
#: next stage of the same request) wants to run; a few thousand spins still bridge the gaps
#: between the layers of one pass.
SPIN_COUNT = "5000"


def spin_bounded(env: "dict[str, str] | None" = None) -> bool:
    """Does this environment (default: the process's) bound OpenMP's spin-wait?"""
    env = os.environ if env is None else env
    return "GOMP_SPINCOUNT" in env or env.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"


def with_bounded_spin(env: "dict[str, str] | None" = None) -> dict[str, str]:
    """A copy of `env` (default: the process's) with GOMP_SPINCOUNT=SPIN_COUNT unless it already
    names a wait policy."""
    out = dict(os.environ if env is None else env)
    if not spin_bounded(out) and "OMP_WAIT_POLICY" not in out:
        out["GOMP_SPINCOUNT"] = SPIN_COUNT
    return out


def lone_threads_default() -> int:
    """ENCLAVEML_LONE_THREADS (0 or 1: never more than one thread; inherited by the enclave
    worker), else the cores."""
    raw = os.environ.get("ENCLAVEML_LONE_THREADS", "").strip()
    try:
        return max(1, int(raw)) if raw else machine_threads()
    except ValueError:
        return machine_threads()


class LoneThreads:
    """Picks the thread count of a pass from measured wall times (see the module doc).

    Thread-safe. `clock` (seconds, monotonic) is injectable for tests.
    """

    def __init__(self, best: int | None = None, max_rows: int = LONE_MAX_ROWS, explore_s: float = EXPLORE_S,
                 clock: Callable[[], float] = time.monotonic, base: int | None = None):
        self.best = max(1, int(best)) if best is not None else lone_threads_default()
        #: The process's configured thread count (every other pass uses it).
        self.base = max(1, int(base)) if base is not None else torch.get_num_threads()
        self.max_rows = int(max_rows)
        self.explore_s = float(explore_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._active = 0  # passes running now in this process
        #: (rows, threads) -> [running mean of seconds, time of the last sample]
        self._stats: dict[tuple[int, int], list[float]] = {}
        #: rows -> seconds between re-measures (explore_s, doubled while they confirm the choice)
        self._interval: dict[int, float] = {}
        self._exploring: dict[int, int] = {}  # rows -> the thread count being re-measured

    def eligible(self, rows: int, busy: bool = False, base: int = 1) -> bool:
        """May a pass of `rows` rows use more threads than `base` (ignoring passes running now)?"""
        return self.best > base and not busy and 0 < rows <= self.max_rows

    def pick(self, rows: int, busy: bool = False, base: int = 1) -> int:
        """Threads for a pass of `rows` rows on a thread set to `base`; `busy`: the caller knows
        other work runs now."""
        if not self.eligible(rows, busy, base):
            return base
        with self._lock:
            return self._pick(rows, base)

    def _pick(self, rows: int, base: int) -> int:  # under the lock
        if self._active:
            return base
        one, many = self._stats.get((rows, base)), self._stats.get((rows, self.best))
        if many is None:
            return self.best
        if one is None:
            return base
        choice, other = (self.best, one) if many[0] <= one[0] else (base, many)
        if self.clock() - other[1] >= self._interval.get(rows, self.explore_s):  # stale: measure it again
            self._exploring[rows] = base if choice == self.best else self.best
            return self._exploring[rows]
        return choice

    def _choice(self, rows: int, base: int) -> "int | None":
        one, many = self._stats.get((rows, base)), self._stats.get((rows, self.best))
        return None if one is None or many is None else (self.best if many[0] <= one[0] else base)

    def record(self, rows: int, threads: int, seconds: float, base: "int | None" = None) -> None:
        base = self.base if base is None else base
        with self._lock:
            before = self._choice(rows, base)
            s = self._stats.get((rows, threads))
            exploring = self._exploring.get(rows) == threads
            if s is None or exploring:  # a re-measure replaces the stale figure
                self._stats[(rows, threads)] = [seconds, self.clock()]
            else:
                s[0] += ALPHA * (seconds - s[0])
                s[1] = self.clock()
            if exploring:
                del self._exploring[rows]
                if self._choice(rows, base) == before:  # confirmed: re-measure less often
                    self._interval[rows] = min(MAX_EXPLORE_S, 2 * self._interval.get(rows, self.explore_s))
                else:
                    self._interval[rows] = self.explore_s

    @contextmanager
    def run(self, rows: int, busy: bool = False) -> Iterator[int]:
        """Run a pass of `rows` rows under the picked thread count, set on this thread (and back
        to `base` after); its wall time is recorded when it was eligible for more threads.

        Every pass sets its thread's count, since `torch.set_num_threads` also sets the count a
        thread started meanwhile takes up at its first parallel region."""
        base = self.base
        eligible = self.eligible(rows, busy, base)
        with self._lock:
            n = self._pick(rows, base) if eligible else base
            eligible = eligible and self._active == 0
            self._active += 1
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        t = time.perf_counter()
        try:
            yield n
        finally:
            dt = time.perf_counter() - t
            if n != base:
                torch.set_num_threads(base)
            with self._lock:
                self._active -= 1
            if eligible:
                self.record(rows, n, dt, base)
