"""The untrusted host server: HTTP routes that move bytes between clients and the enclave worker.

Trust side: host. It never holds a plaintext input, a decoded pixel, a label name or a key: it
forwards ciphertext to the enclave, runs the public BackNet on IR tensors, and returns sealed
responses. Every `EnclaveMLError` becomes a status code, a short JSON error and a counter; the
server keeps serving.

Routes (docs/serving.md):
    GET    /healthz                      liveness: "ok" (200) or why not (503): enclave restarting,
                                         unresponsive (missed a ping) or down; deployed models
    GET    /metrics[?format=json]        counters, latency and batch-size histograms
    GET    /v1/evidence?nonce=HEX        the enclave's nonce (HEX || time || MAC), evidence binding
                                         SHA-256(pk || that nonce), and pk
    GET    /v1/models                    deployments (OWNERHEX/name) and public bundle facts
    POST   /v1/models/{name}             deploy/replace: signed upload header, then
                                         pack_parts(key_release + bundle files) (serve/upload.py); the
                                         deployment is OWNERHEX/name for the key-release signer
    DELETE /v1/models/{owner}/{name}     delete: an owner command sealed to the enclave
    POST   /v1/models/{owner}/{name}/identity  the deployed identity, sealed to the asking client
    POST   /v1/models/{owner}/{name}/infer     one HPKE request (1..256 images) -> one sealed response
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import errors as E
from ..protocol.identity import ModelRef
from ..runtime.errors import ChannelError
from ..runtime.handle import UNRESPONSIVE, Supervisor, replace
from ..runtime.rpc import RemoteError
from . import protocol
from .batcher import BatcherClosed, pick_device
from .metrics import BATCH_BUCKETS, Metrics, json_logger
from .upload import MAX_HEADER_BYTES, PREFIX_BYTES, UploadHeader, UploadTooLarge

#: Status code for each error kind; anything not listed is a 500 (and its message is not sent).
STATUS = {
    "PayloadTooLarge": 413,
    "TamperedMessage": 400,
    "EvidenceRejected": 400,
    "DataError": 422,
    "UserInputError": 400,
    "PartitionError": 400,
    "Unauthorized": 403,
    "PolicyViolation": 403,
    "UnknownModel": 404,
    "ReplayedMessage": 409,
    "EnclaveUnavailable": 503,
    "ServerBusy": 503,
}
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


def error_body(e: BaseException) -> tuple[int, dict]:
    kind = error_kind(e)
    msg = str(e)[:300] if kind != "InternalError" else "internal error"
    if kind == "EnclaveUnavailable":
        msg = "the enclave worker is not available"
    return STATUS.get(kind, 500), {"error": kind, "message": msg}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` before reading it all."""
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise PayloadTooLarge(f"body of {int(cl)} bytes is over the {limit}-byte limit")
        except ValueError:
            raise E.UserInputError("bad Content-Length") from None
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
    return bytes(buf)


class _Stream:
    """Reads an ASGI request body in pieces of the caller's choosing, with time limits."""

    def __init__(self, request: Request):
        self._it = request.stream().__aiter__()
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


async def receive_upload(request: Request, model_id: str, s: "HostState") -> tuple[UploadHeader, dict[str, bytes]]:
    """Read an upload's signed header (at most 4 KiB), check it, and only then stream the body to
    a temporary file in the store (never whole in memory while it arrives), hashing it, under the
    signed size; the parts come back once the hash matches. The file is removed on every path.
    At most `max_concurrent_uploads` bodies are streamed at once (more: ServerBusy, 503)."""
    import hashlib

    from . import upload as U

    cfg = s.cfg
    cl = request.headers.get("content-length")
    try:
        declared = int(cl) if cl is not None else None
    except ValueError:
        raise E.UserInputError("bad Content-Length") from None
    if declared is not None and declared > PREFIX_BYTES + MAX_HEADER_BYTES + cfg.max_upload_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {cfg.max_upload_bytes}-byte limit")
    stream = _Stream(request)
    deadline = time.monotonic() + cfg.upload_header_timeout_s
    n = U.header_length(await stream.read_exact(PREFIX_BYTES, deadline))
    header = U.parse_upload_header(await stream.read_exact(n, deadline))
    U.check_upload_header(header, model_id, cfg.max_upload_bytes, time.time(), cfg.allowed_owners)
    if declared is not None and declared != PREFIX_BYTES + n + header.size:
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

    allowed = {protocol.KEY_RELEASE, B.MANIFEST, B.SIGNATURE, *B.PARTS, B.HEAD}
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return protocol.unpack_parts(b"", allowed)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return protocol.unpack_parts(view, allowed)
            finally:
                view.release()


async def wait(fut: Future):
    return await asyncio.wrap_future(fut)


#: /healthz statuses (all but "ok" answer 503 with Retry-After; docs/serving.md).
STATUS_OK = "ok"
STATUS_RESTARTING = "enclave restarting"
STATUS_UNRESPONSIVE = "enclave unresponsive"
STATUS_DOWN = "enclave down"


class HostState:
    """What the host process holds: the enclave proxy, per-model pipelines, store, metrics, log."""

    def __init__(self, cfg: ServerConfig, loop: "asyncio.AbstractEventLoop | None" = None):
        from .store import ModelStore

        self.cfg = cfg
        self.loop = loop
        self.metrics = Metrics()
        self.log = json_logger()
        self.store = ModelStore(cfg.store)
        self.device = pick_device(cfg.device)
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

        factory_args = [a for f in protocol.check_factory_names(list(self.cfg.allowed_factories))
                        for a in ("--allow-factory", f)]
        enclave = EnclaveProxy(self.cfg.tee, threads=self.cfg.enclave_threads,
                               extra_args=[*factory_args, *self.cfg.worker_args],
                               socket_path=self.cfg.worker_socket, launch=self.cfg.worker_launch, loop=self.loop)
        self.log.info("enclave started", extra={"fields": {
            "enclave_pid": enclave.pid, "tee": self.cfg.tee, "device": str(self.device),
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
        from .host import ModelPipeline

        pipe = ModelPipeline(model_id, self.enclave, backnet, self.device, self.cfg.max_batch, self.cfg.window_ms / 1000.0,
                             on_batch=lambda n: self.metrics.observe("backnet_batch_size", n, BATCH_BUCKETS, model=model_id),
                             on_failed=lambda n: self.metrics.inc("errors_total", n, kind="DataError"),
                             on_stage=lambda st, dt: self.metrics.observe("stage_seconds", dt, model=model_id, stage=st))
        with self.lock:
            old = self.pipelines.get(model_id)
            self.pipelines[model_id] = pipe
            self.public[model_id] = {"bundle_id": manifest.bundle_id, "name": manifest.name, "k": manifest.k,
                                     "head": manifest.head, "ir_shape": list(manifest.ir_shape),
                                     "owner": manifest.owner, "owner_fingerprint": owner}
        if old is not None:
            old.close()

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
                parts = {n: files[n] for n in (B.MANIFEST, B.SIGNATURE, B.FRONTNET, B.CLASSMAP, B.HEAD) if n in files}
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


def create_app(cfg: ServerConfig) -> FastAPI:
    state: dict[str, HostState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["s"] = await asyncio.to_thread(HostState, cfg, asyncio.get_running_loop())
        await state["s"].restore_all()
        state["s"].status = STATUS_OK
        supervisor = asyncio.ensure_future(state["s"].supervise())
        try:
            yield
        finally:
            supervisor.cancel()
            for p in list(state["s"].pipelines.values()):
                p.close()  # in the loop: the batchers' futures belong to it
            await asyncio.to_thread(state["s"].enclave.close)

    app = FastAPI(title="enclaveml host", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def S() -> HostState:
        return state["s"]

    app.add_middleware(ObserveMiddleware, state=state)

    async def on_error(request: Request, e: Exception):
        code, body = error_body(e)
        s = state.get("s")
        if s is not None:
            s.metrics.inc("errors_total", kind=body["error"])
            if code >= 500:
                s.log.warning("server error", extra={"fields": {"route": _route_name(request.url.path, request.method), "kind": body["error"],
                                                                "type": type(e).__name__}})
        headers = {"Retry-After": str(cfg.retry_after_s)} if code == 503 else None
        return JSONResponse(body, status_code=code, headers=headers)

    for exc_type in (E.EnclaveMLError, ChannelError, RemoteError, Exception):
        app.add_exception_handler(exc_type, on_error)

    @app.get("/healthz")
    async def healthz():
        s = S()
        status = s.status if s.enclave.alive() or s.status != STATUS_OK else STATUS_DOWN
        ok = status == STATUS_OK
        body = {"status": status, "tee": cfg.tee, "enclave_pid": s.enclave.pid,
                "device": str(s.device), "models": sorted(s.pipelines)}
        return JSONResponse(body, status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": str(cfg.retry_after_s)})

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        if format == "json":
            return JSONResponse(S().metrics.to_json())
        return PlainTextResponse(S().metrics.to_prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/evidence")
    async def evidence(nonce: str = ""):
        if not 16 <= len(nonce) <= 128:
            raise E.DataError("nonce must be 8 to 64 bytes of hex")
        h, _, _ = await wait(S().enclave.call_async({"op": "evidence", "nonce": nonce}))
        # The enclave's nonce: the caller's, extended with a time and the enclave's MAC (bound
        # into the evidence; an owner command carries it).
        return {"evidence": h["evidence"], "public_key": h["public_key"], "nonce": h["nonce"]}

    @app.get("/v1/models")
    async def list_models():
        return {"models": [{"id": m, **S().public.get(m, {})} for m in sorted(S().pipelines)]}

    @app.post("/v1/models/{name}")
    async def deploy(name: str, request: Request):
        s = S()
        protocol.check_model_id(name)
        s.check_ready()
        from ..models import bundle as B

        header, files = await receive_upload(request, name, s)
        missing = {protocol.KEY_RELEASE, B.MANIFEST, B.SIGNATURE, *B.PARTS} - set(files)
        if missing:
            raise E.DataError(f"upload is missing {', '.join(sorted(missing))}")
        # Check the public half first, so that a bad BackNet changes nothing in the enclave.
        public = B.load_manifest(files)
        if public.owner != header.owner.to_bytes().hex():  # the uploader is the bundle's owner
            raise E.Unauthorized("the upload is signed by another key than the bundle's owner")
        protocol.check_servable_arch(public.arch, cfg.allowed_factories)
        if set(files) - {protocol.KEY_RELEASE, B.MANIFEST, B.SIGNATURE} != set(public.part_names):
            raise E.DataError(f"upload parts do not match the manifest ({', '.join(public.part_names)})")
        manifest, backnet = await asyncio.to_thread(B.read_public_bundle, files, None, cfg.allowed_factories)
        enclave_parts = {n: files[n] for n in (protocol.KEY_RELEASE, B.MANIFEST, B.SIGNATURE, B.FRONTNET, B.CLASSMAP,
                                               B.HEAD) if n in files}
        h, _, sealed = await wait(s.enclave.call_async({"op": "deploy", "model": name}, None, enclave_parts))
        ref = ModelRef(manifest.owner, name)
        if h.get("bundle_id") != manifest.bundle_id or h.get("model") != str(ref):
            raise E.TamperedMessage("the enclave accepted another bundle than the host loaded")
        from .store import SEALED_DEPLOYMENT

        stored = {n: files[n] for n in files if n != protocol.KEY_RELEASE}
        await asyncio.to_thread(s.store.save, ref, {**stored, SEALED_DEPLOYMENT: sealed.get("sealed", b"")})
        s.install(str(ref), manifest, backnet, h.get("owner"))
        s.metrics.inc("deployments_total", outcome="replaced" if h.get("replaced") else "created")
        return {"model": str(ref), "name": name, "owner": manifest.owner, "bundle_id": manifest.bundle_id,
                "k": manifest.k, "head": manifest.head, "replaced": bool(h.get("replaced"))}

    @app.delete("/v1/models/{owner}/{name}")
    async def delete(owner: str, name: str, request: Request):
        s = S()
        ref = ModelRef(owner, name)
        s.check_ready()
        body = await read_body(request, 65536)
        await wait(s.enclave.call_async({"op": "delete", "model": str(ref)}, None, {"command": body}))
        with s.lock:
            old = s.pipelines.pop(str(ref), None)
            s.public.pop(str(ref), None)
        if old is not None:
            old.close()
        await asyncio.to_thread(s.store.delete, ref)
        s.metrics.inc("deployments_total", outcome="deleted")
        return {"model": str(ref), "deleted": True}

    @app.post("/v1/models/{owner}/{name}/identity")
    async def identity(owner: str, name: str, request: Request):
        s = S()
        ref = ModelRef(owner, name)
        s.check_ready()
        body = await read_body(request, 8192)
        _, _, b = await wait(s.enclave.call_async({"op": "identity", "model": str(ref)}, None, {"request": body}))
        return Response(b["identity"], media_type="application/octet-stream")

    @app.post("/v1/models/{owner}/{name}/infer")
    async def infer(owner: str, name: str, request: Request):
        s = S()
        model_id = str(ModelRef(owner, name))
        pipe = s.pipeline(model_id)
        s.metrics.add_gauge("in_flight_requests", 1)  # queue depth (the replicas' autoscaling signal)
        try:
            body = await read_body(request, cfg.max_request_bytes)
            t0 = time.perf_counter()
            resp = await pipe.run(body)
        finally:
            s.metrics.add_gauge("in_flight_requests", -1)
        s.metrics.observe("inference_seconds", time.perf_counter() - t0, model=model_id)
        s.metrics.inc("inferences_total", model=model_id, outcome="ok")
        return Response(resp, media_type="application/octet-stream")

    return app


def _route_name(p: str, method: str) -> str:
    if p.startswith("/v1/models/"):
        rest = p[len("/v1/models/"):]
        if rest.endswith("/infer"):
            return "infer"
        if rest.endswith("/identity"):
            return "identity"
        return "model_" + method.lower()
    return {"/healthz": "healthz", "/metrics": "metrics", "/v1/evidence": "evidence", "/v1/models": "models"}.get(p, "other")


class ObserveMiddleware:
    """Pure ASGI middleware: a request id header, one JSON log line and metrics per request.

    (Starlette's BaseHTTPMiddleware would add a task and a stream copy per request.)
    """

    def __init__(self, app, state: dict):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = os.urandom(8).hex()
        info = {"status": 500, "bytes_out": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                headers = list(message.get("headers", []))
                for k, v in headers:
                    if k == b"content-length":
                        info["bytes_out"] = int(v)
                message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            s = self.state.get("s")
            if s is not None:
                dt = time.perf_counter() - t0
                route = _route_name(scope.get("path", ""), scope.get("method", ""))
                bytes_in = next((int(v) for k, v in scope.get("headers", []) if k == b"content-length"), 0)
                s.metrics.inc("http_requests_total", route=route, status=str(info["status"]))
                s.metrics.observe("http_request_seconds", dt, route=route)
                s.log.info("request", extra={"fields": {
                    "request_id": rid, "method": scope.get("method"), "route": route, "status": info["status"],
                    "bytes_in": bytes_in, "bytes_out": info["bytes_out"], "ms": round(dt * 1000, 3)}})


def serve(cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8080, torch_threads: int = 1) -> None:
    """Run the server until interrupted; logs one JSON line `listening` with the real port."""
    import socket

    import uvicorn

    torch.set_num_threads(max(1, torch_threads))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it: no Nagle delays
    sock.bind((host, port))
    log = json_logger()
    config = uvicorn.Config(create_app(cfg), log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    startup = server.startup

    async def announce(sockets=None):
        await startup(sockets=sockets)
        log.info("listening", extra={"fields": {"host": host, "port": sock.getsockname()[1], "pid": os.getpid()}})

    server.startup = announce  # type: ignore[method-assign]
    server.run(sockets=[sock])
