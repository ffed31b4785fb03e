"""Garbage-collector settings of the long-running processes (the host server, an enclave worker):
no collection of the startup heap in a request's path.

Trust side: both (each process sets its own). Why: after start a serving process tracks about
200,000 container objects (torch, FastAPI, the model), and a full (generation 2) collection walks
every one of them: 180-240 ms measured on the shared 2-core machine, and whichever request meets
it waits that long (docs/benchmarks.md, "Single-request latency, second pass"). So once a process
has loaded what it serves (`settle()`: after start, after each deploy or restore), everything alive
is collected once and moved to the permanent generation (`gc.freeze`), which no later collection
walks; a full collection then walks only what came since. Generation 0's threshold is raised from
700 to `GEN0_THRESHOLD`: its counter is allocations less deallocations of tracked containers, so a
lone request that frees what it made seldom trips it, but concurrent requests and batches with
thousands of objects alive at once do, and each young collection promotes what is alive then (the
requests in flight) towards the generations a full collection walks (measured with CPython's
defaults over 2,000 load requests: 8 young collections of 1-10 ms in the enclave, one full one of
360-450 ms in the host; none with these settings). At most `GEN0_THRESHOLD` young containers wait
(a few MB). Cyclic garbage is still collected: automatic collections of every generation stay on.

`ENCLAVEML_GC=0` (inherited by the worker) keeps CPython's defaults, for comparison. Either way
`observe(clock)` times each collection into the process's stage clock (`gc_gen0`..`gc_gen2`: calls,
wall and CPU), which `/metrics?format=json&stages=1` and `bench_serve.py`'s table show.
"""

from __future__ import annotations

import gc
import os
import time

#: Young-generation threshold (allocations minus deallocations of tracked containers).
GEN0_THRESHOLD = 20_000
_STAGES = ("gc_gen0", "gc_gen1", "gc_gen2")
_state = {"tuned": False, "frozen": False, "timer": None}


def enabled(env: "dict[str, str] | None" = None) -> bool:
    """False when ENCLAVEML_GC=0 (CPython's defaults kept)."""
    return (os.environ if env is None else env).get("ENCLAVEML_GC", "1").strip() != "0"


def configure() -> bool:
    """Raise generation 0's threshold in this process (unless ENCLAVEML_GC=0); True if tuned.
    Call once, at a serving process's start; `settle()` is a no-op until then."""
    if not enabled():
        return False
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, g1, g2)
    _state["tuned"] = True
    return True


def settle(again: bool = False) -> None:
    """After loading what the process serves: collect once, then freeze every surviving object
    (no later collection walks it). No-op unless `configure()` tuned this process; with `again`
    (after a deploy or restore) also until the startup heap was frozen, which the process's own
    startup `settle()` then does once for everything (restores at start cost no collection each)."""
    if _state["tuned"] and (not again or _state["frozen"]):
        gc.collect()
        gc.freeze()
        _state["frozen"] = True


def observe(clock) -> None:
    """Time every collection of this process into `clock` (a `timing.StageClock`), one stage per
    generation; replaces an earlier `observe`."""
    old = _state["timer"]
    if old is not None and old in gc.callbacks:
        gc.callbacks.remove(old)
    start = [0, 0]
    wall, cpu = time.perf_counter_ns, time.thread_time_ns

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            start[0], start[1] = wall(), cpu()
        elif start[0]:
            gen = int(info.get("generation", 2))
            clock.add(_STAGES[min(2, max(0, gen))], wall() - start[0], cpu() - start[1])
            start[0] = 0

    _state["timer"] = timer
    gc.callbacks.append(timer)
