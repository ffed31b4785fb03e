"""The untrusted host server's HTTP routes: thin adapters over `serve/service.py`.

Trust side: host. Each route hands the request's bytes to one `HostService` method and wraps
what it returns; the service holds no HTTP type. Every `EnclaveMLError` becomes a status code, a
short JSON error and a counter; the server keeps serving.

Routes (docs/serving.md):
    GET    /healthz                      liveness: "ok" (200) or why not (503): enclave restarting,
                                         unresponsive (missed a ping) or down; deployed models
    GET    /metrics[?format=json]        counters, latency and batch-size histograms
    GET    /v1/evidence?nonce=HEX        the enclave's nonce (HEX || time || MAC), evidence binding
                                         SHA-256(pk || that nonce), and pk
    GET    /v1/models                    deployments (OWNERHEX/name) and public bundle facts
    POST   /v1/models/{name}             deploy/replace: signed upload header, then
                                         pack_parts(key_release + bundle files) (protocol/deploy.py); the
                                         deployment is OWNERHEX/name for the key-release signer
    DELETE /v1/models/{owner}/{name}     delete: an owner command sealed to the enclave
    POST   /v1/models/{owner}/{name}/identity  the deployed identity, sealed to the asking client
    POST   /v1/models/{owner}/{name}/infer     one HPKE request (1..256 images) -> one sealed response

The inference route is also served by a lean ASGI handler (`_LeanInfer`) ahead of FastAPI: the
app (`HostApp`) hands it `POST .../infer` before FastAPI's own entry (its telemetry check) and
Starlette's middleware stack; the same service call, the same answers, errors, request-id
header, counters and log line, without FastAPI's routing, request and response objects and
exception middlewares (on the latency path of every single-image request).
"""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import errors as E
from ..runtime import heap
from ..runtime.errors import ChannelError
from ..runtime.rpc import RemoteError
from .metrics import json_logger, log_event
from .service import BodyStream, HostService, ServerConfig, error_kind  # ServerConfig: `serve`'s argument

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


def error_body(e: BaseException) -> tuple[int, dict]:
    kind = error_kind(e)
    msg = str(e)[:300] if kind != "InternalError" else "internal error"
    if kind == "EnclaveUnavailable":
        msg = "the enclave worker is not available"
    return STATUS.get(kind, 500), {"error": kind, "message": msg}


def _body(request: Request) -> BodyStream:
    return BodyStream(request.stream(), request.headers.get("content-length"))


class HostApp(FastAPI):
    """The FastAPI app, with `POST /v1/models/{owner}/{name}/infer` answered by `lean` (a
    `_LeanInfer`) before anything of FastAPI's or Starlette's runs; every other request (and
    lifespan) goes the usual way, through `ObserveMiddleware` and the router."""

    lean: "_LeanInfer | None" = None
    #: {"s": the HostService} once the lifespan has started it.
    service_state: "dict | None" = None

    async def __call__(self, scope, receive, send) -> None:
        lean = self.lean
        if lean is not None and scope["type"] == "http":
            target = infer_target(scope)
            if target is not None:
                scope["app"] = self  # as Starlette sets it
                await lean.serve(scope, receive, send, target)
                return
        await super().__call__(scope, receive, send)


def create_app(cfg: ServerConfig, service=HostService.open, lean_infer: bool = True) -> FastAPI:
    """The app; `service(cfg)` (awaited at startup) builds the `HostService` and starts its enclave.
    `lean_infer=False` leaves /infer to the FastAPI route too (for comparison)."""
    state: dict[str, HostService] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["s"] = await service(cfg)
        try:
            yield
        finally:
            await state["s"].close()

    app = HostApp(title="enclaveml host", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.service_state = state

    def S() -> HostService:
        return state["s"]

    def error_response(route: str, e: BaseException) -> JSONResponse:
        code, body = error_body(e)
        s = state.get("s")
        if s is not None:
            s.metrics.inc("errors_total", kind=body["error"])
            if code >= 500:
                s.log.warning("server error", extra={"fields": {"route": route, "kind": body["error"],
                                                                "type": type(e).__name__}})
        headers = {"Retry-After": str(cfg.retry_after_s)} if code == 503 else None
        return JSONResponse(body, status_code=code, headers=headers)

    async def on_error(request: Request, e: Exception):
        return error_response(_route_name(request.url.path, request.method), e)

    app.add_middleware(ObserveMiddleware, state=state)
    app.lean = _LeanInfer(S, error_response, state) if lean_infer else None

    for exc_type in (E.EnclaveMLError, ChannelError, RemoteError, Exception):
        app.add_exception_handler(exc_type, on_error)

    @app.get("/healthz")
    async def healthz():
        ok, body = S().health()
        return JSONResponse(body, status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": str(cfg.retry_after_s)})

    @app.get("/metrics")
    async def metrics(format: str = "prometheus", stages: int = 0):
        if format == "json":
            out = S().metrics.to_json()
            if stages:
                out["stages"] = await S().stage_totals()
            return JSONResponse(out)
        return PlainTextResponse(S().metrics.to_prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/evidence")
    async def evidence(nonce: str = "", keys: str = ""):
        return await S().evidence(nonce, pq=keys == "pq")

    @app.get("/v1/models")
    async def list_models():
        return S().models()

    @app.post("/v1/models/{name}")
    async def deploy(name: str, request: Request):
        return await S().deploy(name, _body(request))

    @app.delete("/v1/models/{owner}/{name}")
    async def delete(owner: str, name: str, request: Request):
        return await S().delete(owner, name, _body(request))

    @app.post("/v1/models/{owner}/{name}/identity")
    async def identity(owner: str, name: str, request: Request):
        return Response(await S().identity(owner, name, _body(request)), media_type="application/octet-stream")

    @app.post("/v1/models/{owner}/{name}/infer")
    async def infer(owner: str, name: str, request: Request):
        return Response(await S().infer(owner, name, _body(request)), media_type="application/octet-stream")

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


_INFER_PREFIX, _INFER_SUFFIX = "/v1/models/", "/infer"


def infer_target(scope) -> "tuple[str, str] | None":
    """(owner, name) of a `POST /v1/models/{owner}/{name}/infer` request, as FastAPI's router
    would match it (each a non-empty path segment), else None."""
    if scope.get("method") != "POST":
        return None
    path = scope.get("path", "")
    if not (path.startswith(_INFER_PREFIX) and path.endswith(_INFER_SUFFIX)):
        return None
    parts = path[len(_INFER_PREFIX):len(path) - len(_INFER_SUFFIX)].split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]


async def _body_chunks(receive):
    """The request body's chunks as the ASGI server hands them over (no copy, no join)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            from starlette.requests import ClientDisconnect

            raise ClientDisconnect()
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


def _header(scope, name: bytes) -> "bytes | None":
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


class _LeanInfer:
    """`POST /v1/models/{owner}/{name}/infer` as a plain ASGI app: the body as it arrives (a
    `BodyStream` with its declared length), `HostService.infer`, the sealed response; every
    failure becomes the same JSON error as the FastAPI routes give (`error_response`), and an
    exception that escapes gets what Starlette's `ServerErrorMiddleware` would do (the app's
    500 handler's answer if nothing was sent yet, then raised to the server). The request id
    header, counters and log line are `ObserveMiddleware`'s (`_observe`)."""

    _HEADERS = (b"content-type", b"application/octet-stream")

    def __init__(self, service, error_response, state: dict):
        self.service = service
        self.error_response = error_response
        self.state = state

    async def serve(self, scope, receive, send, target: tuple[str, str]) -> None:
        t0 = time.perf_counter()
        rid = os.urandom(8).hex()
        info = {"status": 500, "bytes_out": 0, "started": False}
        send_error = _tagged(send, rid, info)  # an error answer (JSONResponse)

        try:
            declared = _header(scope, b"content-length")
            try:
                out = await self.service().infer(target[0], target[1], BodyStream(
                    _body_chunks(receive), declared.decode("latin-1") if declared is not None else None))
            except Exception as e:
                await self.error_response("infer", e)(scope, receive, send_error)
                return
            n = str(len(out)).encode()
            info["status"], info["bytes_out"], info["started"] = 200, len(out), True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", n), self._HEADERS, (b"x-request-id", rid.encode())]})
            await send({"type": "http.response.body", "body": out})
        except Exception as e:
            if not info["started"]:
                await self.error_response("infer", e)(scope, receive, send_error)
            raise
        finally:
            _observe(self.state, scope, t0, rid, info)


def _tagged(send, rid: str, info: dict):
    """`send` with the request id header added to the response's start, whose status, length and
    sending it notes in `info` (for `_observe`)."""

    async def tagged(message):
        if message["type"] == "http.response.start":
            info["status"], info["started"] = message["status"], True
            headers = list(message.get("headers", []))
            for k, v in headers:
                if k == b"content-length":
                    info["bytes_out"] = int(v)
            message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
        await send(message)

    return tagged


def _observe(state: dict, scope, t0: float, rid: str, info: dict) -> None:
    """One request's metrics, stage clock (inference) and JSON log line."""
    s = state.get("s")
    if s is None:
        return
    dt = time.perf_counter() - t0
    route = _route_name(scope.get("path", ""), scope.get("method", ""))
    length = _header(scope, b"content-length")
    bytes_in = int(length) if length is not None else 0
    if route == "infer":
        s.clock.add("http_infer", int(dt * 1e9))
    s.metrics.inc("http_requests_total", route=route, status=str(info["status"]))
    s.metrics.observe("http_request_seconds", dt, route=route)
    log_event(s.log, "request", {
        "request_id": rid, "method": scope.get("method"), "route": route, "status": info["status"],
        "bytes_in": bytes_in, "bytes_out": info["bytes_out"], "ms": round(dt * 1000, 3)})


class ObserveMiddleware:
    """Pure ASGI middleware: a request id header, one JSON log line and metrics per request, for
    every route but the lean /infer (`HostApp` hands that to `_LeanInfer`, which does the same).

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
        info = {"status": 500, "bytes_out": 0, "started": False}
        try:
            await self.app(scope, receive, _tagged(send, rid, info))
        finally:
            _observe(self.state, scope, t0, rid, info)


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
    heap.configure()  # runtime/heap.py: no collection of the startup heap in a request's path
    app = create_app(cfg)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    startup = server.startup

    async def announce(sockets=None):
        await startup(sockets=sockets)
        s = (app.service_state or {}).get("s")
        if s is not None:
            heap.observe(s.clock)  # collections timed as stages gc_gen0..2
        heap.settle()
        log.info("listening", extra={"fields": {"host": host, "port": sock.getsockname()[1], "pid": os.getpid()}})

    server.startup = announce  # type: ignore[method-assign]
    server.run(sockets=[sock])
