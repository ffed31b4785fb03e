"""An active host for tests: a real HTTP server in front of a real `train serve` that rewrites answers.

It plays the untrusted host operator (who controls the server process and what it answers),
while the enclave worker behind it stays the real one: every request is forwarded unchanged, and
`rewrite(path, json_answer)` may change a JSON answer on its way back to the participant or owner.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Callable

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostileProxy:
    def __init__(self, upstream: str, rewrite: Callable[[str, dict], dict]):
        self.upstream, self.rewrite = upstream.rstrip("/"), rewrite
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        async def forward(request: Request) -> Response:
            async with httpx.AsyncClient(base_url=self.upstream, timeout=120) as c:
                r = await c.request(request.method, request.url.path, params=dict(request.query_params),
                                    content=await request.body(),
                                    headers={"content-type": request.headers.get("content-type", "application/json")})
            body = r.content
            if r.headers.get("content-type", "").startswith("application/json"):
                body = json.dumps(self.rewrite(request.url.path, r.json())).encode()
            return Response(body, status_code=r.status_code, media_type=r.headers.get("content-type"))

        app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
