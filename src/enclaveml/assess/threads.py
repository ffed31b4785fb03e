"""How the assessment uses the cores: independent work items side by side, one thread each (owner side).

Why: the assessment's work splits into independent items (the KL oracle's batches of channel
images, the rMLE searches of different points, the decoders of different points). Two OpenMP
threads on one item synchronise at every operator, and under load a descheduled partner makes
the other spin: on the shared 2-core machine (load 8-10) the KL oracle took 1.75x and rMLE 5x the
CPU time that way (docs/benchmarks.md, "session 4"). One item per core, each single-threaded,
has no such cost. The items' results do not depend on how many run at once (each is computed
exactly as it would be alone).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


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


def side_by_side(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """`[fn(item) for item in items]`, the items spread over `workers` threads (default: torch's
    thread count), each single-threaded; in order. With one worker or one item: a plain loop."""
    items = list(items)
    n = max(1, min(len(items), torch.get_num_threads() if workers is None else workers))
    if n < 2:
        return [fn(i) for i in items]
    with single_threaded(), ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))
