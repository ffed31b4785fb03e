"""Request/reply on a channel: the caller's client (Futures, a reader) and the worker's serving loop.

Trust side: both (`ChannelClient` runs on the host, `serve_channel` in the enclave worker).

`ChannelClient.call()` tags a header with an id and returns a Future resolved when the reply with
that id arrives, so many requests can be in flight. `serve_channel()` runs a handler per request
(on a thread pool, or on the reading thread for requests marked inline) and replies with the
same id. Failures travel through ONE table (`error_fields` / `error_from_fields`): an
`enclaveml.errors` class travels as {"error": class name, "message": text} and is raised again by
the caller as the same class (an exception of a class outside the table travels as its nearest
ancestor in it); anything else is "InternalError", whose message is never sent, and the caller
raises `RemoteError`.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from .. import errors as _errors
from .errors import ChannelClosed, ChannelError
from .frames import Header
from .transport import Channel, Message

#: The error kinds that travel by name: every class of `enclaveml.errors`.
ERROR_TABLE: dict[str, type[_errors.EnclaveMLError]] = {
    name: cls for name, cls in vars(_errors).items()
    if isinstance(cls, type) and issubclass(cls, _errors.EnclaveMLError)}
INTERNAL = "InternalError"
_INTERNAL_MESSAGE = "internal error in the worker"
_MAX_MESSAGE = 500


class RemoteError(RuntimeError):
    """The worker failed with an error that is not one of `enclaveml.errors` (details withheld)."""


def error_fields(e: BaseException) -> dict[str, str]:
    """What travels for a failure: {"error": kind, "message": text} (no details for internal ones)."""
    if isinstance(e, _errors.EnclaveMLError):
        kind = next(c.__name__ for c in type(e).__mro__ if ERROR_TABLE.get(c.__name__) is c)
        return {"error": kind, "message": str(e)}
    return {"error": INTERNAL, "message": _INTERNAL_MESSAGE}


def error_from_fields(fields: dict) -> "Exception | None":
    """The exception a reply (or a per-item result) carries, as its own class; None if it has none."""
    kind = fields.get("error")
    if kind is None:
        return None
    msg = str(fields.get("message", ""))[:_MAX_MESSAGE]
    cls = ERROR_TABLE.get(str(kind))
    if cls is not None:
        return cls(msg)
    return RemoteError(msg or str(kind)[:_MAX_MESSAGE])


def raise_remote(header: Header) -> None:
    """Re-raise the error a reply carries as its own `enclaveml.errors` class."""
    e = error_from_fields(header)
    if e is not None:
        raise e


def error_reply(rid: Any, e: BaseException) -> Header:
    return {"id": rid, **error_fields(e)}


class ChannelClient:
    """Caller side: `call()` sends a request and returns a Future of the reply (many in flight).

    Replies are read by a thread of its own, or, given `loop`, by that asyncio event loop when the
    socket is readable: a reply then reaches the coroutine awaiting it without waking another
    thread first (one hand-off less per call on the serving path; blocking `request()` from
    other threads still works).
    """

    def __init__(self, channel: Channel, on_unsolicited: Callable[[Message], None] | None = None,
                 loop: "asyncio.AbstractEventLoop | None" = None):
        self.channel = channel
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._on_unsolicited = on_unsolicited
        self.closed: BaseException | None = None
        self._loop = loop
        self._reader: threading.Thread | None = None
        if loop is None:
            self._reader = threading.Thread(target=self._read_loop, name="channel-reader", daemon=True)
            self._reader.start()
        else:
            loop.call_soon_threadsafe(loop.add_reader, channel.sock.fileno(), self._on_readable)

    def call(self, header: Header, tensors: dict[str, torch.Tensor] | None = None,
             blobs: dict[str, bytes] | None = None) -> "Future[Message]":
        return self._send_pending(Future(), header, tensors, blobs)

    def _send_pending(self, fut, header: Header, tensors, blobs):
        """Register `fut` (a concurrent or an asyncio Future) under a fresh id and send the call;
        a closed channel or a failed send fails `fut` instead."""
        rid = next(self._ids)
        with self._lock:
            if self.closed is not None:
                fut.set_exception(ChannelClosed("the enclave channel is closed"))
                return fut
            self._pending[rid] = fut
        try:
            self.channel.send({**header, "id": rid}, tensors, blobs)
        except BaseException as e:
            with self._lock:
                self._pending.pop(rid, None)
            fut.set_exception(e)
        return fut

    def call_aio(self, header: Header, tensors: dict[str, torch.Tensor] | None = None,
                 blobs: dict[str, bytes] | None = None) -> "asyncio.Future[Message]":
        """`call` for a coroutine on the client's loop: an asyncio Future that the loop's reader
        resolves in place (no thread-safe hand-off, no extra turn of the loop). Without a loop
        (or off its thread), `call` wrapped."""
        loop = self._loop
        if loop is None or _running_loop() is not loop:
            return asyncio.wrap_future(self.call(header, tensors, blobs))
        return self._send_pending(loop.create_future(), header, tensors, blobs)

    def request(self, header: Header, tensors: dict[str, torch.Tensor] | None = None,
                blobs: dict[str, bytes] | None = None, timeout: float | None = 60.0) -> Message:
        """Blocking `call`: the reply, or the worker's error raised as its own class."""
        return self.call(header, tensors, blobs).result(timeout)

    def _dispatch(self, msg: Message) -> None:
        rid = msg[0].get("id")
        with self._lock:
            fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if fut is None:
            if self._on_unsolicited is not None:
                self._on_unsolicited(msg)
            return
        if fut.done():  # the caller gave up on it (cancelled): nothing to deliver
            return
        e = error_from_fields(msg[0])
        try:
            if e is None:
                fut.set_result(msg)
            else:
                fut.set_exception(e)
        except BaseException as err:  # cancelled meanwhile (InvalidStateError)
            if not fut.done():
                fut.set_exception(err)

    def _fail_all(self, e: BaseException) -> None:
        with self._lock:
            self.closed = e
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if isinstance(fut, asyncio.Future) and _running_loop() is not fut.get_loop():
                if not fut.get_loop().is_closed():  # an asyncio Future is resolved on its loop
                    fut.get_loop().call_soon_threadsafe(_fail, fut)
            else:
                _fail(fut)

    def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(self.channel.recv())
        except BaseException as e:
            self._fail_all(e)

    def _on_readable(self) -> None:
        """Loop mode: one frame per readiness event (the loop calls again while more is queued)."""
        try:
            msg = self.channel.recv_frame()
        except BaseException as e:
            self._stop_reading()
            self._fail_all(e)
            return
        if msg is not None:
            self._dispatch(msg)

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.channel.sock.fileno())
            except (ValueError, OSError):  # already closed
                pass

    def close(self) -> None:
        if self._loop is None or self._loop.is_closed() or not self._loop.is_running():
            self.channel.close()
            return
        done = threading.Event()

        def close_in_loop() -> None:
            try:
                self._stop_reading()
                self.channel.close()
            finally:
                done.set()

        if _running_loop() is self._loop:
            close_in_loop()
        else:
            self._loop.call_soon_threadsafe(close_in_loop)
            if not done.wait(5.0):
                self.channel.close()
        if self.closed is None:
            self._fail_all(ChannelClosed("the enclave channel is closed"))


def _fail(fut) -> None:
    if not fut.done():
        fut.set_exception(ChannelClosed("the enclave channel closed before replying"))


def _running_loop() -> "asyncio.AbstractEventLoop | None":
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


Handler = Callable[[Header, dict[str, torch.Tensor], dict[str, bytes]],
                   "tuple[Header, dict[str, torch.Tensor] | None, dict[str, bytes] | None]"]


def serve_channel(channel: Channel, handler: Handler, max_workers: int = 4,
                  inline: Callable[[Header], bool] | None = None,
                  inline_when_idle: "Callable[[Header, dict[str, torch.Tensor], dict[str, bytes]], bool] | None" = None
                  ) -> None:
    """Worker side: run `handler` for each request on a thread pool, reply with the same id.

    Returns (after closing the channel, which unlinks this side's arena) when the peer closes it.
    `inline(header)` may say that a request must run on the reading thread (e.g. a cheap one, or
    the liveness ping, which so answers while every pool thread is busy). With one pool thread
    the other requests run one at a time, in the order they arrived. `inline_when_idle(header,
    tensors, blobs)` may say that a request may run on the reading thread when no pool request
    is running or queued (a small one: the hand-off to a pool thread and its wake-up cost more
    than the wait it could cause; a ping arriving meanwhile waits for it, a busy pool never does).
    """
    pending = [0]  # requests submitted to the pool and not yet answered
    lock = threading.Lock()

    def run(header: Header, tensors, blobs) -> None:
        rid = header.get("id")
        try:
            h, t, b = handler(header, tensors, blobs)
            reply = ({**h, "id": rid}, t, b)
        except BaseException as e:  # every failure becomes a reply; the loop goes on
            reply = (error_reply(rid, e), None, None)
        try:
            channel.send(*reply)
        except ChannelClosed:
            pass
        except ChannelError as e:  # e.g. a tensor dtype that cannot travel
            try:
                channel.send(error_reply(rid, e))
            except ChannelError:
                pass

    def run_pooled(header: Header, tensors, blobs) -> None:
        try:
            run(header, tensors, blobs)
        finally:
            with lock:
                pending[0] -= 1

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="enclave") as pool:
        while True:
            try:
                header, tensors, blobs = channel.recv()
            except ChannelClosed:
                break
            if inline is not None and inline(header):
                run(header, tensors, blobs)
                continue
            with lock:
                idle = pending[0] == 0
                if not (idle and inline_when_idle is not None and inline_when_idle(header, tensors, blobs)):
                    pending[0] += 1
                    idle = False
            if idle:
                run(header, tensors, blobs)
            else:
                pool.submit(run_pooled, header, tensors, blobs)
    channel.close()
