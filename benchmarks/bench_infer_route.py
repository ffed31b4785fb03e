"""CPU per /infer request in the host's ASGI app, lean route against FastAPI's, with a stub service.

Trust side: operator (host code only; no enclave, no network). The app (`serve.app.create_app`)
with its middleware, driven directly through ASGI with a 3,000-byte body; the service only reads
the body and echoes it, so what is timed is the HTTP app layer on the latency path. Prints, per
route, microseconds of wall and thread CPU per request in total and up to the response's body
(the latency path; the log line and metrics after it are not), then one JSON line.

    PYTHONPATH=src python benchmarks/bench_infer_route.py [--n 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time


class _StubService:
    def __init__(self):
        import logging

        from enclaveml.serve.metrics import Metrics, json_logger
        from enclaveml.timing import StageClock

        self.metrics, self.clock = Metrics(), StageClock()
        self.log = json_logger(stream=open(os.devnull, "w"), name="bench-infer-route")
        self.log.setLevel(logging.INFO)

    async def infer(self, owner, name, body):
        from enclaveml.serve.service import read_body

        return await read_body(body, 1 << 20)

    async def close(self):
        pass


async def _drive(app, n: int) -> dict:
    body = os.urandom(3000)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/models/" + "ab" * 32 + "/darknet/infer", "raw_path": b"", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"host", b"x"), (b"content-type", b"application/octet-stream"),
                         (b"content-length", str(len(body)).encode())]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    start, path = [0.0, 0.0], [0.0, 0.0]

    async def send(m):
        if m["type"] == "http.response.body":
            assert m["body"] == body
            path[0] += time.perf_counter() - start[0]
            path[1] += time.thread_time() - start[1]

    for _ in range(200):
        await app(dict(scope), receive, send)
    path[:] = [0.0, 0.0]
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(n):
        start[:] = [time.perf_counter(), time.thread_time()]
        await app(dict(scope), receive, send)
    us = 1e6 / n
    return {"wall_us": round((time.perf_counter() - t) * us, 1), "cpu_us": round((time.thread_time() - c) * us, 1),
            "to_body_wall_us": round(path[0] * us, 1), "to_body_cpu_us": round(path[1] * us, 1)}


async def _main(n: int) -> dict:
    from enclaveml.serve.app import create_app
    from enclaveml.serve.service import ServerConfig

    out = {}
    for name, lean in (("fastapi", False), ("lean", True), ("fastapi_again", False), ("lean_again", True)):
        async def stub(cfg):
            return _StubService()

        app = create_app(ServerConfig(), service=stub, lean_infer=lean)
        async with app.router.lifespan_context(app):
            out[name] = await _drive(app, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per route")
    args = ap.parse_args()
    out = asyncio.run(_main(args.n))
    for name, v in out.items():
        print(f"{name:14} total {v['wall_us']:8.1f} us wall {v['cpu_us']:8.1f} us CPU; up to the body "
              f"{v['to_body_wall_us']:8.1f} us wall {v['to_body_cpu_us']:8.1f} us CPU")
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
