"""Dynamic batching: gather items submitted one at a time into batches for one call.

Trust side: host. Used for the BackNet (IR tensors -> scores, on the GPU when there is one) and
for the channel calls to the enclave (many requests per FrontNet pass, many responses per call).

Policy: at most `concurrency` batches run at once. When a runner is free, a batch takes the
waiting items (up to `max_batch`), at once if `window_s` is 0, else after waiting `window_s` for
more. Under light load a request waits at most `window_s`; under heavy load items queue while
the runners are busy, so batches grow by themselves. With no window, an item that finds a runner
free and nobody waiting runs as a batch of one in its own task. It all happens inside the server's event
loop: no collector thread, so no thread hop per stage.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Sequence

import torch

from ..timing import now, since
from .placement import SMALL_ROWS  # passes of at most this many rows use the channels-last copy
from .threads import LoneThreads, spin_bounded


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> the first CUDA GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


#: A CPU BackNet batch of at most this many rows runs on the event loop's thread (measured:
#: the hop to the BackNet thread and back cost ~0.4 ms of a single request's latency).
INLINE_ROWS = 1



class BatcherClosed(RuntimeError):
    """The batcher was closed (its model was replaced, or its enclave is restarting)."""


class BackNetExecutor:
    """Runs one BackNet on batches of IR tensors (each (rows, ...), one request's decoded images)
    on its own thread (GPU if any); `max_batch` counts rows. On the CPU, a small batch that runs
    while `busy()` is false (the pipeline's enclave calls are idle) may use more torch threads
    (`threads.LoneThreads`)."""

    def __init__(self, backnet: torch.nn.Module, device: torch.device, max_batch: int = 64,
                 window_s: float = 0.0, on_batch: Callable[[int], None] | None = None, clock=None,
                 busy: Callable[[], bool] | None = None, threads: "LoneThreads | None" = None):
        self.device = device
        self.busy = busy or (lambda: False)
        # More threads only where OpenMP's idle threads stop spinning soon (`threads.spin_bounded`).
        if threads is None and device.type == "cpu":
            threads = LoneThreads(None if spin_bounded() else 1)
        self.threads = threads
        #: A `timing.StageClock` for the forward pass (wall and CPU of the thread running it).
        self.clock = clock
        self.backnet = backnet.to(device).eval()
        #: For passes of at most SMALL_ROWS rows on a CPU: a copy with channels-last convolution
        #: weights. On one image oneDNN's NCHW path is far slower (darknet's k=10 BackNet: 1734 ->
        #: 355 us, one thread; outputs equal to ~1e-6), on large batches a little faster (138 vs
        #: 176 us per image): docs/benchmarks.md, issue 13. The weights are public (host side).
        self.backnet_small = (copy.deepcopy(self.backnet).to(memory_format=torch.channels_last)
                              if device.type == "cpu" else self.backnet)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="backnet")
        self.batcher = AsyncBatcher(self._run, max_batch, window_s, concurrency=1, on_batch=on_batch,
                                    weight=lambda ir: int(ir.shape[0]))

    @torch.no_grad()
    def _forward(self, irs: list[torch.Tensor]) -> list[torch.Tensor]:
        t = now()
        rows = [int(ir.shape[0]) for ir in irs]
        x = (irs[0] if len(irs) == 1 else torch.cat(irs)).to(self.device, non_blocking=True)
        net = self.backnet_small if sum(rows) <= SMALL_ROWS else self.backnet
        if self.threads is None:
            y = net(x)
        else:
            with self.threads.run(sum(rows), self.busy()):
                y = net(x)
        out = list(y.float().cpu().split(rows))
        since(self.clock, "backnet_forward", t)
        return out

    async def _run(self, irs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cpu" and sum(int(ir.shape[0]) for ir in irs) <= INLINE_ROWS:
            return self._forward(irs)  # a lone image: the thread hop costs more than blocking the loop
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._forward, irs)

    async def submit(self, ir: torch.Tensor) -> torch.Tensor:
        return await self.batcher.submit(ir)

    def close(self) -> None:
        self.batcher.close()
        self._thread.shutdown(wait=False)


class AsyncBatcher:
    """`await submit(item)` -> result; `run_batch(items)` is a coroutine returning one result (or
    an Exception) per item. At most `concurrency` batches run at once; a batch starts at once
    when a runner is free and `window_s` is 0 (or `max_batch` worth of items wait), else after
    `window_s`. An item weighs `weight(item)` (default 1) against `max_batch`; a batch always
    takes at least one item. Use from one event loop only.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Awaitable[Sequence[Any]]], max_batch: int = 64,
                 window_s: float = 0.0, concurrency: int = 1, on_batch: Callable[[int], None] | None = None,
                 weight: Callable[[Any], int] | None = None):
        if max_batch < 1 or window_s < 0 or concurrency < 1:
            raise ValueError("max_batch >= 1, window_s >= 0, concurrency >= 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.concurrency = concurrency
        self.on_batch = on_batch
        self.weight = weight or (lambda _: 1)
        self._items: list[tuple[Any, asyncio.Future]] = []
        self._waiting = 0  # total weight of self._items
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def running(self) -> int:
        """Batches running now."""
        return self._running

    async def submit(self, item: Any) -> Any:
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if not self._items and self._running < self.concurrency and self.window_s == 0:
            return await self._run_alone(item)
        fut = asyncio.get_running_loop().create_future()
        self._items.append((item, fut))
        self._waiting += self.weight(item)
        self._maybe_start()
        return await fut

    async def _run_alone(self, item: Any) -> Any:
        """A runner is free and nothing waits: this item's batch runs in the caller's task (no
        task to start and no future to resolve: two turns of the loop less per stage for a lone
        request). Items submitted meanwhile queue, and start when it ends, as after any batch."""
        self._running += 1
        try:
            if self.on_batch is not None:
                self.on_batch(self.weight(item))
            results = list(await self.run_batch([item]))
            if len(results) != 1:
                raise RuntimeError("batch function returned the wrong number of results")
        finally:
            self._running -= 1
            self._maybe_start()
        if isinstance(results[0], BaseException):
            raise results[0]
        return results[0]

    def _maybe_start(self) -> None:
        while self._items and self._running < self.concurrency:
            if self._waiting < self.max_batch and self.window_s > 0:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self.window_s, self._on_timer)
                return
            self._start()

    def _on_timer(self) -> None:
        self._timer = None
        if self._items and self._running < self.concurrency:
            self._start()

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        take, total = 0, 0
        while take < len(self._items) and (take == 0 or total + self.weight(self._items[take][0]) <= self.max_batch):
            total += self.weight(self._items[take][0])
            take += 1
        batch, self._items = self._items[:take], self._items[take:]
        self._waiting -= total
        self._running += 1
        asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list) -> None:
        items = [it for it, _ in batch]
        try:
            if self.on_batch is not None:
                self.on_batch(sum(self.weight(it) for it in items))
            results = list(await self.run_batch(items))
            if len(results) != len(items):
                raise RuntimeError("batch function returned the wrong number of results")
        except BaseException as e:  # every item learns about the failure
            results = [e] * len(items)
        finally:
            self._running -= 1
        for (_, fut), r in zip(batch, results):
            if fut.done():
                continue
            if isinstance(r, BaseException):
                fut.set_exception(r)
            else:
                fut.set_result(r)
        self._maybe_start()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        items, self._items = self._items, []
        self._waiting = 0
        for _, fut in items:
            if not fut.done():
                fut.set_exception(BatcherClosed("batcher is closed"))
