"""The serving host's side of its enclave worker: start it, batch calls per model.

Trust side: host (untrusted). Everything that passes through here is ciphertext, evidence, IR
tensors, scores in the secret class order, opaque handles and sealed responses.
"""

from __future__ import annotations

import asyncio
import time

import torch

from ..errors import EnclaveMLError
from ..runtime.errors import ChannelError
from ..runtime.handle import EnclaveHandle
from ..runtime.rpc import RemoteError, error_from_fields
from ..runtime.spawn import WorkerSpec
from ..timing import StageClock, now, since
from .batcher import AsyncBatcher, BackNetExecutor
from .threads import with_bounded_spin

WORKER_MODULE = "enclaveml.serve.worker"


def _item_error(item: dict) -> Exception:
    return error_from_fields(item) or RemoteError("missing result")


def worker_spec(tee: str = "sim", threads: int = 2, extra_args: list[str] | None = None,
                env: dict[str, str] | None = None, socket_path: str | None = None, launch=None) -> WorkerSpec:
    """How the serving worker starts: by fd (tensors through shared memory), or at `socket_path`
    (tensors inline), where `launch` (e.g. `gramine-sgx worker`, whose argv the signed manifest
    fixes) may start it instead of this host. Its environment (default: this process's) bounds
    OpenMP's spin-wait (`threads.with_bounded_spin`): its lone FrontNet passes may use every core."""
    return WorkerSpec(WORKER_MODULE, ["--tee", tee, "--threads", str(threads), *(extra_args or [])],
                      env=with_bounded_spin(env), socket_path=socket_path, launch=launch)


class EnclaveProxy(EnclaveHandle):
    """Starts `python -m enclaveml.serve.worker` (the runtime's handle on it, `runtime.handle`)."""

    def __init__(self, tee: str = "sim", threads: int = 2, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 60.0, socket_path: str | None = None,
                 launch=None, loop: "asyncio.AbstractEventLoop | None" = None):
        super().__init__(worker_spec(tee, threads, extra_args, env, socket_path, launch), loop=loop,
                         timeout_s=timeout_s)


def front_calls_in_flight(enclave_threads: int) -> int:
    """Front calls the host keeps in flight: one per enclave pool thread, plus one that waits in
    the enclave's queue. Why: with exactly one call per pool thread, a thread that finishes its
    pass idles for a whole host round trip (reply, unpack, next batch, send) before its next
    call arrives; under load that left about a tenth of both cores idle (darknet k=10, 2 cores:
    server-only 1,692-1,808 -> 1,934-2,037 images/s, docs/benchmarks.md). A lone request is
    unaffected (nothing waits)."""
    return max(1, int(enclave_threads)) + 1


class ModelPipeline:
    """One deployed model on the host: enclave FrontNet calls, BackNet, enclave finish calls.

    Each stage batches on its own, in the event loop: `front` sends many ciphertexts in one
    channel call, the BackNet runs one tensor batch on its thread, `finish` seals many responses
    in one channel call. `front_in_flight` front calls may be in flight (`front_calls_in_flight`:
    one more than the enclave's pool threads) and two finish calls, so the stages overlap. A
    request may carry several images: its IR has one row per image the enclave decoded.

    With `finish_rows` > 0 (`serve/placement.py`: the enclave holds the BackNet) a `front` call
    whose decoded images number at most that many comes back answered, sealed: one round trip,
    no BackNet or finish stage on the host.
    """

    def __init__(self, model_id: str, enclave: EnclaveProxy, backnet: torch.nn.Module, device: torch.device,
                 max_batch: int = 64, window_s: float = 0.0, on_batch=None, on_failed=None, on_stage=None,
                 clock: "StageClock | None" = None, finish_rows: int = 0, front_in_flight: int = 2):
        self.model_id = model_id
        #: Passes of at most this many decoded images are answered whole by the enclave (0: none).
        self.finish_rows = int(finish_rows)
        self.enclave = enclave
        #: Per-stage totals (wall; CPU only for stretches without an await): /metrics "stages".
        self.clock = clock
        #: Called with (stage, seconds) for each request's front, backnet and finish (metrics).
        self.on_stage = on_stage
        #: Called with the number of a request's images the enclave could not decode (metrics).
        self.on_failed = on_failed
        self.front = AsyncBatcher(self._front, max_batch, 0.0, concurrency=max(1, int(front_in_flight)))
        # busy: a FrontNet pass may be running in the enclave (do not take its cores)
        self.back = BackNetExecutor(backnet, device, max_batch, window_s, on_batch=on_batch, clock=clock,
                                    busy=lambda: self.front.running > 0)
        self.finish = AsyncBatcher(self._finish, max_batch, 0.0, concurrency=2)

    async def run(self, ciphertext: bytes) -> bytes:
        """One request through the three stages -> the sealed response."""
        t0 = time.perf_counter()
        fronted = await self.front.submit(ciphertext)
        t1 = time.perf_counter()
        if isinstance(fronted, bytes):  # answered in the enclave's one op
            if self.on_stage is not None:
                self.on_stage("front", t1 - t0)
            if self.clock is not None:
                self.clock.add("front_total", int((t1 - t0) * 1e9))
                self.clock.add("one_op_answers", int((t1 - t0) * 1e9))
            return fronted
        handle, ir = fronted
        try:
            scores = await self.back.submit(ir) if ir.shape[0] else torch.empty(0)
        except BaseException:
            self.abort(handle)
            raise
        t2 = time.perf_counter()
        out = await self.finish.submit((handle, scores))
        t3 = time.perf_counter()
        if self.on_stage is not None:
            for stage, dt in (("front", t1 - t0), ("backnet", t2 - t1), ("finish", t3 - t2)):
                self.on_stage(stage, dt)
        if self.clock is not None:  # wall only: these stretches await (queueing included)
            for stage, dt in (("front_total", t1 - t0), ("backnet_total", t2 - t1), ("finish_total", t3 - t2)):
                self.clock.add(stage, int(dt * 1e9))
        return out

    async def _front(self, ciphertexts: list[bytes]) -> list:
        t0 = now()
        blobs = {f"r{i}": c for i, c in enumerate(ciphertexts)}
        header = {"op": "front_batch", "model": self.model_id, "n": len(ciphertexts)}
        if self.finish_rows:
            header["finish_rows"] = self.finish_rows
        fut = self.enclave.call_aio(header, None, blobs)
        since(self.clock, "front_send", t0)
        h, t, b = await fut
        t1 = now()
        if self.clock is not None:
            self.clock.add("front_call", t1[0] - t0[0])
        items = h.get("items", [])
        if len(items) != len(ciphertexts):
            raise RemoteError("enclave answered the wrong number of items")
        ir = t.get("ir")
        out, row = [], 0
        for i, it in enumerate(items):
            if it.get("answered") is True and isinstance(b.get(f"r{i}"), bytes):
                out.append(b[f"r{i}"])
                if it.get("failed") and self.on_failed is not None:
                    self.on_failed(int(it["failed"]))
            elif "handle" in it:
                rows = int(it.get("rows", 0))
                out.append((str(it["handle"]), ir[row:row + rows] if rows else torch.empty(0)))
                row += rows
                if it.get("failed") and self.on_failed is not None:
                    self.on_failed(int(it["failed"]))
            else:
                out.append(_item_error(it))
        since(self.clock, "front_unpack", t1)
        return out

    async def _finish(self, items: list[tuple[str, torch.Tensor]]) -> list:
        t0 = now()
        handles = [h for h, _ in items]
        rows = [int(s.shape[0]) if s.dim() == 2 else 0 for _, s in items]
        full = [s for _, s in items if s.dim() == 2 and s.shape[0]]
        tensors = {"scores": full[0] if len(full) == 1 else torch.cat(full)} if full else None
        fut = self.enclave.call_aio({"op": "finish_batch", "handles": handles, "rows": rows}, tensors)
        since(self.clock, "finish_send", t0)
        h, _, b = await fut
        if self.clock is not None:
            self.clock.add("finish_call", now()[0] - t0[0])
        res = h.get("items", [])
        if len(res) != len(items):
            raise RemoteError("enclave answered the wrong number of items")
        return [b[f"r{i}"] if r.get("ok") else _item_error(r) for i, r in enumerate(res)]

    def abort(self, handle: str) -> None:
        try:
            self.enclave.call_async({"op": "abort", "handles": [handle]})
        except (EnclaveMLError, ChannelError):
            pass

    def close(self) -> None:
        for b in (self.front, self.back, self.finish):
            b.close()
