"""The host's handle on one enclave worker, and the supervisor that replaces a dead or hung one.

Trust side: host (untrusted). Used by the serving host (`serve/app.py`) and the CalTrain host
(`train/host.py`) alike, so both restart a dead worker, find a hung one by a liveness ping, and
launch under Gramine the same way (`spawn.WorkerSpec`).

`EnclaveHandle(spec)` starts the worker (`spawn.start_worker`), asks its `info`, and offers calls
(blocking `call`, Future-returning `call_async`), `alive()`, `ping()` and `kill()`. `respawn()`
starts a fresh worker from the same spec (a new process: a new enclave key, nothing carried over
but what the app restores from sealed state).

`Supervisor(get, restart)` watches the current handle: every `poll_s` it checks the process, every
`ping_interval_s` it sends a ping (answered on the worker's reading thread, so long work does not
delay it); a dead worker ("died") or one that misses the ping's `ping_timeout_s`
("unresponsive") is handed to `restart(reason)`, which the app writes (close what depended on the
old worker, `replace(...)`, restore state); when that fails the supervisor backs off, doubling up
to `max_backoff_s`. It runs as a task in the app's event loop (`run()`), or on a thread of its
own for a host without one (`start_thread()`).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from concurrent.futures import Future
from typing import Any, Awaitable, Callable

from .rpc import ChannelClient
from .spawn import WorkerSpec, start_worker

#: Why a worker is replaced.
DIED = "died"
UNRESPONSIVE = "unresponsive"
#: How often the supervisor checks that the worker is alive, and its longest wait between
#: restarts of a worker that keeps dying.
SUPERVISE_S = 0.5
MAX_RESTART_BACKOFF_S = 30.0


class EnclaveHandle:
    """A started enclave worker: its process, its channel client, and its `info` answer."""

    def __init__(self, spec: WorkerSpec, loop: "asyncio.AbstractEventLoop | None" = None, timeout_s: float = 60.0):
        self.spec = spec
        self.loop = loop
        self.timeout_s = timeout_s
        self.proc, chan = start_worker(spec)
        self.client = ChannelClient(chan, loop=loop)  # loop: replies read by the host's event loop
        try:
            self.info: dict[str, Any] = self.call({"op": "info"})[0]
        except BaseException:
            self.kill()
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None and self.client.closed is None

    def kill(self) -> None:
        """SIGKILL the worker (also when it is stopped or hung); `close` then reaps it."""
        try:
            self.proc.kill()
        except OSError:
            pass

    def respawn(self) -> "EnclaveHandle":
        """A fresh worker from the same spec (call after `close`)."""
        return EnclaveHandle(self.spec, self.loop, self.timeout_s)

    async def ping(self, timeout_s: float) -> bool:
        """True if the worker answers a liveness ping within `timeout_s`. Never cancels the call:
        a late answer just finds its Future already given up on."""
        fut = self.call_async({"op": "ping"})
        deadline = time.monotonic() + timeout_s
        while not fut.done() and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        for _ in range(3):  # a reply already readable (the loop was busy) is dispatched first
            if fut.done():
                break
            await asyncio.sleep(0)
        return fut.done() and fut.exception() is None

    def call(self, header: dict, tensors=None, blobs=None, timeout: "float | None" = None):
        """Blocking call: the reply (header, tensors, blobs), or the worker's error as its class."""
        return self.client.request(header, tensors, blobs, timeout=self.timeout_s if timeout is None else timeout)

    def call_async(self, header: dict, tensors=None, blobs=None) -> Future:
        return self.client.call(header, tensors, blobs)

    def call_aio(self, header: dict, tensors=None, blobs=None) -> "asyncio.Future":
        """For a coroutine: an awaitable reply, resolved in place by the loop's reader when the
        handle has the caller's loop (`rpc.ChannelClient.call_aio`)."""
        return self.client.call_aio(header, tensors, blobs)

    def close(self) -> None:
        self.client.close()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)


async def replace(dead: EnclaveHandle, reason: str,
                  start: "Callable[[], EnclaveHandle] | None" = None) -> EnclaveHandle:
    """Stop `dead` (killed first if it is hung: a stopped process never exits by itself), reap it,
    and start its successor (`start()`, default `dead.respawn()`), off the event loop."""
    if reason == UNRESPONSIVE:
        dead.kill()
    await asyncio.to_thread(dead.close)
    return await asyncio.to_thread(start or dead.respawn)


class Supervisor:
    """Restarts a dead or hung worker through the app's `restart(reason) -> bool` (see module doc)."""

    def __init__(self, get: Callable[[], EnclaveHandle], restart: "Callable[[str], bool | Awaitable[bool]]",
                 ping_interval_s: float = 2.0, ping_timeout_s: float = 10.0, poll_s: float = SUPERVISE_S,
                 max_backoff_s: float = MAX_RESTART_BACKOFF_S):
        self.get, self.restart = get, restart
        self.ping_interval_s, self.ping_timeout_s = ping_interval_s, ping_timeout_s
        self.poll_s, self.max_backoff_s = poll_s, max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def check(self, ping: bool) -> "str | None":
        """Why the current worker must be replaced (DIED, UNRESPONSIVE), or None if it is well."""
        h = self.get()
        if not h.alive():
            return DIED
        if ping and not await h.ping(self.ping_timeout_s):
            return UNRESPONSIVE if h.alive() else DIED
        return None

    async def run(self) -> None:
        """Watch until cancelled (or `stop()`)."""
        backoff = self.poll_s
        next_ping = time.monotonic() + self.ping_interval_s
        while not self._stop.is_set():
            await asyncio.sleep(self.poll_s)
            due = time.monotonic() >= next_ping
            reason = await self.check(due)
            if due:
                next_ping = time.monotonic() + self.ping_interval_s
            if reason is None:
                backoff = self.poll_s
                continue
            if self._stop.is_set():  # the host is closing its worker: not a death to repair
                return
            ok = self.restart(reason)
            if inspect.isawaitable(ok):
                ok = await ok
            if not ok:
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
            next_ping = time.monotonic() + self.ping_interval_s

    def start_thread(self, name: str = "enclave-supervisor") -> threading.Thread:
        """Run the supervisor on a daemon thread with its own event loop (hosts without a loop)."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self.run()), name=name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
