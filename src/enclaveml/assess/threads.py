"""How the assessment uses the cores: independent work items side by side, one thread each (owner side).

Why: the assessment's work splits into independent items (the KL oracle's batches of channel
images, the rMLE searches of different points, the decoders of different points). Two OpenMP
threads on one item synchronise at every operator, and under load a descheduled partner makes
the other spin: on the shared 2-core machine (load 8-10) the KL oracle took 1.75x and rMLE 5x the
CPU time that way (docs/benchmarks.md, "session 4"). One item per core, each single-threaded,
has no such cost. The items' results do not depend on how many run at once (each is computed
exactly as it would be alone).

Why one shared pool (`shared_cores`): the tests are independent of each other too, but each has
stretches where it cannot fill every core (a KL point's last float32 batches, the decoders' last
steps of a chunk, rMLE's two staircases of unequal speed). With every test submitting its items to
one pool of `workers` threads, the tests run at once and the cores stay busy; there are never more
compute threads than cores. Items are taken by priority: a test whose items come in small rounds
with a barrier after each (the decoders' chunks) goes first, and one with many independent items
(the KL oracle's batches) fills the cores around those rounds and finishes last, at full use. `Account` records the CPU seconds of one test's items, so each
test's CPU time is still known when the tests overlap.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_shared: "_CorePool | None" = None  # the pool `shared_cores` installed, if any
_users = 0  # blocks inside `shared_cores` now
_threads_before = 1  # the intra-op thread count the first block found (restored when the last ends)
_pool_lock = threading.Lock()
_local = threading.local()  # per thread: whether it is a shared-pool worker; the Account it charges


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Intra-op threads set to `n` for a block (process-wide; worker threads started inside inherit it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded():
    """Intra-op parallelism off: small convolutions lose more to synchronisation than they gain
    (measured: 631 s with 2 threads vs 389 s with 1 for darknet's 12 decoders)."""
    return torch_threads(1)


class Account:
    """CPU seconds spent for one caller: its own thread's, plus those of the items it sent to the pool;
    and the caller's priority in the shared pool (lower first; equal priorities first come, first served)."""

    def __init__(self, priority: int = 0) -> None:
        self._lock = threading.Lock()
        self.items_cpu = 0.0
        self.priority = priority

    def add(self, seconds: float) -> None:
        with self._lock:
            self.items_cpu += seconds


@contextmanager
def charging(account: Account) -> Iterator[None]:
    """Items that this thread sends to the pool charge `account` while the block runs."""
    before = getattr(_local, "account", None)
    _local.account = account
    try:
        yield
    finally:
        _local.account = before


class _CorePool:
    """`workers` threads taking items from one priority queue (lower priority value first, then in order)."""

    def __init__(self, workers: int) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._closed = False  # after `shutdown`: callers run their items themselves
        self._threads = [threading.Thread(target=self._work, name=f"assess-core_{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        _local.worker = True
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            fn, item, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(item))
                except BaseException as e:  # noqa: BLE001 - handed to the caller, as an executor does
                    fut.set_exception(e)

    def map(self, fn: Callable[[T], R], items: list[T], priority: int) -> list[R]:
        futures = []
        with self._lock:  # queued before any stop signal, whose priority sorts after every item's
            if self._closed:  # a caller that found the pool just as its last block ended
                return [fn(i) for i in items]
            for item in items:
                fut: Future = Future()
                self._queue.put((priority, next(self._order), (fn, item, fut)))
                futures.append(fut)
        return [f.result() for f in futures]

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put((math.inf, next(self._order), None))
        for t in self._threads:
            t.join()


@contextmanager
def shared_cores(workers: int) -> Iterator[None]:
    """While the block runs, `side_by_side` from any thread sends its items to one pool of `workers`
    single-threaded threads (intra-op threads are 1 for the whole block, in every thread), in the
    order of the callers' `Account.priority`. A block entered while another is active (two
    assessments in one process) shares the first one's pool."""
    global _shared, _users, _threads_before
    with _pool_lock:
        if _shared is None:  # the first block: one intra-op thread until the last block ends
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
            _shared = _CorePool(workers)
        _users += 1
    try:
        yield
    finally:
        with _pool_lock:
            _users -= 1
            pool = _shared if _users == 0 else None
            if pool is not None:
                _shared = None
                torch.set_num_threads(_threads_before)
        if pool is not None:
            pool.shutdown()


def side_by_side(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """`[fn(item) for item in items]`, the items spread over `workers` threads (default: torch's
    thread count), each single-threaded; in order. With one worker or one item: a plain loop.
    Inside `shared_cores` the items go to its pool instead (a pool worker itself runs them in a loop)."""
    items = list(items)
    if getattr(_local, "worker", False):
        return [fn(i) for i in items]
    pool = _shared
    if pool is not None:
        account = getattr(_local, "account", None)
        return pool.map(_charged(fn), items, account.priority if account is not None else 0)
    n = max(1, min(len(items), torch.get_num_threads() if workers is None else workers))
    if n < 2:
        return [fn(i) for i in items]
    with single_threaded(), ThreadPoolExecutor(max_workers=n) as ex:
        return list(ex.map(_charged(fn), items))


def _charged(fn: Callable[[T], R]) -> Callable[[T], R]:
    """`fn`, its thread CPU time charged to the calling thread's account (when it has one)."""
    account = getattr(_local, "account", None)
    if account is None:
        return fn

    def run(item: T) -> R:
        t0 = time.thread_time()
        try:
            return fn(item)
        finally:
            account.add(time.thread_time() - t0)
    return run
