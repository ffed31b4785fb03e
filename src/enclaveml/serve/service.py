"""The host's service: everything the server does, without HTTP (`serve/app.py` routes to it).

Trust side: host. It never holds a plaintext input, a decoded pixel, a label name or a key: it
forwards ciphertext to the enclave, runs the public BackNet on IR tensors, and returns sealed
responses. Operations take bytes (a request body arrives as a `BodyStream`: its declared length
and its chunks) and return bytes or JSON-able dicts, or raise `EnclaveMLError`s; `serve/app.py`
turns those into status codes. Every enclave call is awaited (`call_async` futures), never a
blocking call on the event loop; file work goes to threads.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from .. import errors as E
from ..models.servable import check_factory_names, check_servable_arch
from ..protocol import deploy as D
from ..protocol.attest import EvidenceAnswer, check_nonce_hex
from ..protocol.identity import ModelRef, check_model_id
from ..timing import StageClock, now, since
from .batcher import BatcherClosed, pick_device
from .placement import describe as describe_placement, enclave_finish_rows
from ..runtime import heap
from ..runtime.errors import ChannelError
from ..runtime.handle import UNRESPONSIVE, Supervisor, replace
from .metrics import BATCH_BUCKETS, Metrics, json_logger
from .upload import UploadTooLarge, check_upload_header

ERROR_CLASSES = (E.UnknownModel, E.DataError, E.PartitionError, E.UserInputError, E.TamperedMessage,
                 E.ReplayedMessage, E.EvidenceRejected, E.PolicyViolation, E.Unauthorized)


class PayloadTooLarge(E.UserInputError):
    """A request body is over the configured limit."""


class ServerBusy(E.EnclaveMLError):
    """The host cannot take this request now (too many uploads, enclave restarting): 503 + Retry-After."""


@dataclass
class ServerConfig:
    tee: str = "sim"
    store: Path = Path("store")
    device: str = "auto"
    max_batch: int = 64
    window_ms: float = 0.0
    enclave_threads: int = 2
    max_request_bytes: int = 8 * 1024 * 1024 + 4096
    max_upload_bytes: int = 512 * 1024 * 1024
    worker_args: list[str] = field(default_factory=list)
    worker_socket: str | None = None
    #: Starts the worker at `worker_socket` instead of `python -m enclaveml.serve.worker` (gramine-sgx).
    worker_launch: Any = None
    #: Model factories besides the zoo that host and enclave build ('package.module:function').
    allowed_factories: tuple[str, ...] = ()
    #: Owner keys (raw 32 bytes) that may upload; None: any key that signs its upload header.
    allowed_owners: "frozenset[bytes] | None" = None
    #: Uploads streamed at once; more get 503 with Retry-After.
    max_concurrent_uploads: int = 2
    #: Longest wait for an upload's signed header, and for its whole body (slow senders).
    upload_header_timeout_s: float = 10.0
    upload_timeout_s: float = 600.0
    #: Liveness: a ping through the channel every `ping_interval_s`; no answer within
    #: `ping_timeout_s` means the worker is hung (reported by /healthz, then restarted).
    ping_interval_s: float = 2.0
    ping_timeout_s: float = 10.0
    #: Seconds a 503 answer tells the client to wait (Retry-After).
    retry_after_s: int = 2
    #: Where BackNet passes run (`serve/placement.py`): on a CPU host ("auto") every pass in the
    #: enclave, in one round trip; with a GPU every pass on the host's GPU; "host" / "enclave" pin
    #: it (`backnet="host"` on a CPU host: passes of at most SMALL_ROWS images still in the enclave).
    backnet_small: str = "auto"
    backnet: str = "auto"


def error_kind(e: BaseException) -> str:
    if isinstance(e, (PayloadTooLarge, UploadTooLarge)):
        return "PayloadTooLarge"
    if isinstance(e, ServerBusy):
        return "ServerBusy"
    for cls in ERROR_CLASSES:
        if isinstance(e, cls):
            return cls.__name__
    if isinstance(e, (ChannelError, BatcherClosed)):
        return "EnclaveUnavailable"
    return "InternalError"


@dataclass
class BodyStream:
    """A request body as it arrives, with no HTTP type: the length the sender declared (its
    Content-Length, unparsed, or None) and the chunks."""

    chunks: AsyncIterator[bytes]
    declared: "str | None" = None

    @classmethod
    def of(cls, data: bytes) -> "BodyStream":
        """A whole body at once (tests, and callers that already hold the bytes)."""

        async def one():
            yield bytes(data)

        return cls(one(), str(len(data)))

    def declared_length(self) -> "int | None":
        try:
            return int(self.declared) if self.declared is not None else None
        except ValueError:
            raise E.UserInputError("bad Content-Length") from None


async def read_body(body: BodyStream, limit: int) -> bytes:
    """The whole body, refusing (413) anything over `limit` before reading it all."""
    declared = body.declared_length()
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    buf = bytearray()
    async for chunk in body.chunks:
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
    return bytes(buf)


class _Stream:
    """Reads a request body in pieces of the caller's choosing, with time limits."""

    def __init__(self, body: BodyStream):
        self._it = body.chunks.__aiter__()
        self._buf = bytearray()
        self._eof = False

    async def _more(self, deadline: float) -> bool:
        if self._eof:
            return False
        try:
            chunk = await asyncio.wait_for(self._it.__anext__(), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            self._eof = True
            return False
        except asyncio.TimeoutError:
            raise E.DataError("upload is too slow") from None
        self._buf += chunk
        return True

    async def read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            if not await self._more(deadline):
                raise E.DataError("upload is truncated")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def chunks(self, deadline: float):
        """The rest of the body, as it arrives."""
        while True:
            if self._buf:
                out, self._buf = bytes(self._buf), bytearray()
                yield out
            if not await self._more(deadline):
                return


async def receive_upload(body: BodyStream, model_id: str, s: "HostService") -> tuple[D.UploadHeader, dict[str, bytes]]:
    """Read an upload's signed header (at most 4 KiB), check it, and only then stream the body to
    a temporary file in the store (never whole in memory while it arrives), hashing it, under the
    signed size; the parts come back once the hash matches. The file is removed on every path.
    At most `max_concurrent_uploads` bodies are streamed at once (more: ServerBusy, 503)."""
    import hashlib

    cfg = s.cfg
    declared = body.declared_length()
    if declared is not None and declared > D.PREFIX_BYTES + D.MAX_HEADER_BYTES + cfg.max_upload_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {cfg.max_upload_bytes}-byte limit")
    stream = _Stream(body)
    deadline = time.monotonic() + cfg.upload_header_timeout_s
    n = D.header_length(await stream.read_exact(D.PREFIX_BYTES, deadline))
    header = D.parse_upload_header(await stream.read_exact(n, deadline))
    check_upload_header(header, model_id, cfg.max_upload_bytes, time.time(), cfg.allowed_owners)
    if declared is not None and declared != D.PREFIX_BYTES + n + header.size:
        raise E.DataError("Content-Length does not match the upload's signed size")
    if s.uploads.locked():
        raise ServerBusy(f"{cfg.max_concurrent_uploads} uploads are in progress; try again later")
    async with s.uploads:
        path = s.store.new_upload_path()
        try:
            digest, got = hashlib.sha256(), 0
            deadline = time.monotonic() + cfg.upload_timeout_s
            with open(path, "wb") as f:
                pending: list[bytes] = []
                queued = 0
                async for chunk in stream.chunks(deadline):
                    got += len(chunk)
                    if got > header.size:
                        raise UploadTooLarge("upload body is longer than its signed size")
                    digest.update(chunk)
                    pending.append(chunk)
                    queued += len(chunk)
                    if queued >= 1 << 20:
                        await asyncio.to_thread(f.writelines, pending)
                        pending, queued = [], 0
                await asyncio.to_thread(f.writelines, pending)
            if got != header.size:
                raise E.DataError("upload body is shorter than its signed size")
            if not hmac.compare_digest(digest.digest(), header.sha256):
                raise E.TamperedMessage("upload body does not match its signed SHA-256")
            return header, await asyncio.to_thread(_unpack_upload, path)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _unpack_upload(path: Path) -> dict[str, bytes]:
    """The parts of a verified upload file (mapped, not read whole, then copied part by part)."""
    import mmap

    from ..models import bundle as B

    allowed = {D.KEY_RELEASE, B.MANIFEST, B.SIGNATURE, *B.PARTS, B.HEAD}
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return D.unpack_parts(b"", allowed)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return D.unpack_parts(view, allowed)
            finally:
                view.release()


async def wait(fut: Future):
    return await asyncio.wrap_future(fut)


#: /healthz statuses (all but "ok" answer 503 with Retry-After; docs/serving.md).
STATUS_OK = "ok"
STATUS_RESTARTING = "enclave restarting"
STATUS_UNRESPONSIVE = "enclave unresponsive"
STATUS_DOWN = "enclave down"


class HostService:
    """What the host process holds (the enclave proxy, per-model pipelines, store, metrics, log)
    and what it does: one method per route, no HTTP type in or out."""

    def __init__(self, cfg: ServerConfig, loop: "asyncio.AbstractEventLoop | None" = None):
        from .store import ModelStore

        self.cfg = cfg
        self.loop = loop
        self.metrics = Metrics()
        self.clock = StageClock()  # per-stage totals: /metrics?format=json&stages=1
        self.log = json_logger()
        self.store = ModelStore(cfg.store)
        self.device = pick_device(cfg.device)
        #: Passes of at most this many images the enclave runs whole (0: none); only then does the
        #: enclave get the BackNet, so that it holds it only when it runs it (enclave memory).
        self.finish_rows = enclave_finish_rows(cfg.backnet_small, cfg.backnet, self.device)
        self.pipelines: dict = {}
        self.public: dict[str, dict] = {}
        self.lock = threading.Lock()
        #: Upload bodies being streamed to disk (`receive_upload`).
        self.uploads = asyncio.Semaphore(max(1, cfg.max_concurrent_uploads))
        #: What /healthz reports: STATUS_OK, or why the enclave cannot serve now.
        self.status = STATUS_RESTARTING  # until the stored deployments are restored
        self.enclave = self.start_enclave()

    def start_enclave(self):
        from .host import EnclaveProxy

        factory_args = [a for f in check_factory_names(list(self.cfg.allowed_factories))
                        for a in ("--allow-factory", f)]
        enclave = EnclaveProxy(self.cfg.tee, threads=self.cfg.enclave_threads,
                               extra_args=[*factory_args, *self.cfg.worker_args],
                               socket_path=self.cfg.worker_socket, launch=self.cfg.worker_launch, loop=self.loop)
        self.log.info("enclave started", extra={"fields": {
            "enclave_pid": enclave.pid, "tee": self.cfg.tee, "device": str(self.device),
            "backnet": describe_placement(self.finish_rows),
            "measurement": enclave.info.get("measurement"), "hardening": enclave.info.get("hardening")}})
        return enclave

    def check_ready(self) -> None:
        """While the worker restarts (its deployments not yet restored), every model route answers
        503 with Retry-After, never 404: the client should wait, not conclude the model is gone."""
        if self.status != STATUS_OK or not self.enclave.alive():
            raise ChannelError("the enclave worker is restarting")

    def pipeline(self, model_id: str):
        self.check_ready()
        with self.lock:
            p = self.pipelines.get(model_id)
        if p is None:
            raise E.UnknownModel(f"no model {model_id[:90]!r} is deployed")
        return p

    def install(self, model_id: str, manifest, backnet, owner: str | None):
        """Serve `model_id` through a new pipeline (in the event loop: its batchers live there)."""
        from .host import ModelPipeline, front_calls_in_flight

        pipe = ModelPipeline(model_id, self.enclave, backnet, self.device, self.cfg.max_batch, self.cfg.window_ms / 1000.0,
                             on_batch=lambda n: self.metrics.observe("backnet_batch_size", n, BATCH_BUCKETS, model=model_id),
                             on_failed=lambda n: self.metrics.inc("errors_total", n, kind="DataError"),
                             on_stage=lambda st, dt: self.metrics.observe("stage_seconds", dt, model=model_id, stage=st),
                             clock=self.clock, finish_rows=self.finish_rows,
                             front_in_flight=front_calls_in_flight(self.cfg.enclave_threads))
        with self.lock:
            old = self.pipelines.get(model_id)
            self.pipelines[model_id] = pipe
            self.public[model_id] = {"bundle_id": manifest.bundle_id, "name": manifest.name, "k": manifest.k,
                                     "head": manifest.head, "ir_shape": list(manifest.ir_shape),
                                     "owner": manifest.owner, "owner_fingerprint": owner}
        if old is not None:
            old.close()
        heap.settle(again=True)  # the new pipeline's objects join the frozen heap (no-op unless `serve` tuned it)

    async def restore_all(self) -> None:
        """Bring back every stored deployment from its sealed record (after a start or a worker
        restart): the enclave opens what it sealed; the owner is not needed. A deployment that
        does not restore (e.g. sealed by other enclave code) is logged and skipped."""
        from ..models import bundle as B
        from .store import SEALED_DEPLOYMENT

        for ref in await asyncio.to_thread(self.store.models):
            model_id = str(ref)
            try:
                files = await asyncio.to_thread(self.store.load, ref)
                if SEALED_DEPLOYMENT not in files:
                    raise E.DataError("no sealed deployment stored")
                parts = {n: files[n] for n in self._enclave_part_names(B) if n in files}
                h, _, _ = await wait(self.enclave.call_async({"op": "restore", "model": model_id}, None,
                                                             {**parts, "sealed": files[SEALED_DEPLOYMENT]}))
                manifest, backnet = await asyncio.to_thread(B.read_public_bundle, files, None, self.cfg.allowed_factories)
                if manifest.bundle_id != h.get("bundle_id"):
                    raise E.TamperedMessage("the enclave restored another bundle than the host loaded")
                self.install(model_id, manifest, backnet, h.get("owner"))
                self.metrics.inc("deployments_total", outcome="restored")
                self.log.info("deployment restored", extra={"fields": {"model": model_id, "bundle_id": manifest.bundle_id}})
            except Exception as e:  # one bad record must not keep the others down
                self.log.warning("deployment not restored", extra={"fields": {
                    "model": model_id, "kind": error_kind(e), "message": str(e)[:200]}})

    async def supervise(self) -> None:
        """Restart a dead or hung enclave worker and restore its deployments (with backoff if it
        keeps dying; `runtime.handle.Supervisor`). Hung: it did not answer a liveness ping within
        `ping_timeout_s`.

        Requests in flight when it died get 503 (EnclaveUnavailable); so does every model request
        until the deployments are restored (`check_ready`). Clients then see a new enclave key,
        attest again and resend themselves (the SDK never resends on the host's word).
        """
        await Supervisor(lambda: self.enclave, self.restart, self.cfg.ping_interval_s, self.cfg.ping_timeout_s).run()

    async def restart(self, reason: str) -> bool:
        """Replace the worker ("died" or "unresponsive": then it is killed first) and restore the
        deployments; False if the new worker did not start (the caller retries)."""
        dead = self.enclave
        self.status = STATUS_UNRESPONSIVE if reason == UNRESPONSIVE else STATUS_RESTARTING
        self.metrics.inc("enclave_restarts_total", reason=reason)
        self.log.warning("enclave worker " + ("does not answer" if reason == UNRESPONSIVE else "died")
                         + "; restarting", extra={"fields": {"enclave_pid": dead.pid, "reason": reason,
                                                             "exit_code": dead.proc.poll()}})
        with self.lock:
            old, self.pipelines, self.public = list(self.pipelines.values()), {}, {}
        for p in old:
            p.close()
        try:
            self.enclave = await replace(dead, reason, self.start_enclave)
        except Exception as e:
            self.status = STATUS_DOWN
            self.log.warning("enclave restart failed", extra={"fields": {"type": type(e).__name__}})
            return False
        await self.restore_all()
        self.status = STATUS_OK
        return True


    def _enclave_part_names(self, B) -> tuple[str, ...]:
        """The bundle files the enclave gets: its sealed parts, and the BackNet only where it runs
        passes whole (`finish_rows`; it checks the BackNet against the signed manifest)."""
        return (B.MANIFEST, B.SIGNATURE, B.FRONTNET, B.CLASSMAP, B.HEAD, *((B.BACKNET,) if self.finish_rows else ()))

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, cfg: ServerConfig) -> "HostService":
        """Start the enclave worker (in a thread: spawning blocks), restore the stored deployments,
        then supervise the worker until `close`."""
        s = await asyncio.to_thread(cls, cfg, asyncio.get_running_loop())
        await s.restore_all()
        s.status = STATUS_OK
        s._supervisor = asyncio.ensure_future(s.supervise())
        return s

    async def close(self) -> None:
        sup = getattr(self, "_supervisor", None)
        if sup is not None:
            sup.cancel()
        for p in list(self.pipelines.values()):
            p.close()  # in the loop: the batchers' futures belong to it
        await asyncio.to_thread(self.enclave.close)

    # -- operations (one per route) -------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(serving?, what /healthz reports)."""
        status = self.status if self.enclave.alive() or self.status != STATUS_OK else STATUS_DOWN
        return status == STATUS_OK, {"status": status, "tee": self.cfg.tee, "enclave_pid": self.enclave.pid,
                                     "device": str(self.device), "backnet": describe_placement(self.finish_rows),
                                     "models": sorted(self.pipelines)}

    def models(self) -> dict[str, Any]:
        return {"models": [{"id": m, **self.public.get(m, {})} for m in sorted(self.pipelines)]}

    async def evidence(self, nonce: str, pq: bool = False) -> dict[str, Any]:
        """The enclave's evidence for the caller's `nonce` (hex), which the enclave extends with a
        time and its MAC (bound into the evidence; an owner command carries it). `pq`: the hybrid
        request key too, bound in the report data's upper half (crypto/suites.py)."""
        op = {"op": "evidence", "nonce": check_nonce_hex(nonce), **({"keys": "pq"} if pq else {})}
        h, _, _ = await wait(self.enclave.call_async(op))
        return EvidenceAnswer.from_dict(h).to_dict()

    async def stage_totals(self) -> dict[str, Any]:
        """Per-stage time totals of the host and (one channel call) of the enclave (timing.py)."""
        h, _, _ = await wait(self.enclave.call_async({"op": "stats"}))
        return {"host": self.clock.snapshot(), "enclave": h.get("stages", {})}

    async def deploy(self, name: str, body: BodyStream) -> dict[str, Any]:
        """Deploy or replace OWNER/name from a signed upload (`protocol.deploy`)."""
        check_model_id(name)
        self.check_ready()
        from ..models import bundle as B

        cfg = self.cfg
        header, files = await receive_upload(body, name, self)
        missing = {D.KEY_RELEASE, B.MANIFEST, B.SIGNATURE, *B.PARTS} - set(files)
        if missing:
            raise E.DataError(f"upload is missing {', '.join(sorted(missing))}")
        # Check the public half first, so that a bad BackNet changes nothing in the enclave.
        public = B.load_manifest(files)
        if public.owner != header.owner.to_bytes().hex():  # the uploader is the bundle's owner
            raise E.Unauthorized("the upload is signed by another key than the bundle's owner")
        check_servable_arch(public.arch, cfg.allowed_factories)
        if set(files) - {D.KEY_RELEASE, B.MANIFEST, B.SIGNATURE} != set(public.part_names):
            raise E.DataError(f"upload parts do not match the manifest ({', '.join(public.part_names)})")
        manifest, backnet = await asyncio.to_thread(B.read_public_bundle, files, None, cfg.allowed_factories)
        enclave_parts = {n: files[n] for n in (D.KEY_RELEASE, *self._enclave_part_names(B)) if n in files}
        h, _, sealed = await wait(self.enclave.call_async({"op": "deploy", "model": name}, None, enclave_parts))
        ref = ModelRef(manifest.owner, name)
        if h.get("bundle_id") != manifest.bundle_id or h.get("model") != str(ref):
            raise E.TamperedMessage("the enclave accepted another bundle than the host loaded")
        from .store import SEALED_DEPLOYMENT

        stored = {n: files[n] for n in files if n != D.KEY_RELEASE}
        await asyncio.to_thread(self.store.save, ref, {**stored, SEALED_DEPLOYMENT: sealed.get("sealed", b"")})
        self.install(str(ref), manifest, backnet, h.get("owner"))
        self.metrics.inc("deployments_total", outcome="replaced" if h.get("replaced") else "created")
        return D.DeployAnswer(str(ref), name, manifest.owner, manifest.bundle_id, manifest.k, manifest.head,
                              bool(h.get("replaced"))).to_dict()

    async def delete(self, owner: str, name: str, body: BodyStream) -> dict[str, Any]:
        """Delete OWNER/name on the owner's command, sealed to the enclave (which checks it)."""
        ref = ModelRef(owner, name)
        self.check_ready()
        command = await read_body(body, 65536)
        await wait(self.enclave.call_async({"op": "delete", "model": str(ref)}, None, {"command": command}))
        with self.lock:
            old = self.pipelines.pop(str(ref), None)
            self.public.pop(str(ref), None)
        if old is not None:
            old.close()
        await asyncio.to_thread(self.store.delete, ref)
        self.metrics.inc("deployments_total", outcome="deleted")
        return {"model": str(ref), "deleted": True}

    async def identity(self, owner: str, name: str, body: BodyStream) -> bytes:
        """The deployed identity of OWNER/name, sealed by the enclave to the asking client."""
        ref = ModelRef(owner, name)
        self.check_ready()
        request = await read_body(body, 8192)
        _, _, b = await wait(self.enclave.call_async({"op": "identity", "model": str(ref)}, None, {"request": request}))
        return b["identity"]

    async def infer(self, owner: str, name: str, body: BodyStream) -> bytes:
        """One HPKE request (1..256 images) to OWNER/name -> the enclave's sealed response."""
        model_id = str(ModelRef(owner, name))
        pipe = self.pipeline(model_id)
        self.metrics.add_gauge("in_flight_requests", 1)  # queue depth (the replicas' autoscaling signal)
        try:
            tb = now()
            request = await read_body(body, self.cfg.max_request_bytes)
            since(self.clock, "read_body", tb)
            t0 = time.perf_counter()
            resp = await pipe.run(request)
        finally:
            self.metrics.add_gauge("in_flight_requests", -1)
        self.metrics.observe("inference_seconds", time.perf_counter() - t0, model=model_id)
        self.metrics.inc("inferences_total", model=model_id, outcome="ok")
        return resp
