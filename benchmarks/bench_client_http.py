"""Client CPU per inference-sized POST: httpx (the SDK's general client) against the SDK's lean
keep-alive POST (`client/keepalive.py`, stdlib http.client), over loopback to a minimal server.

Trust side: client (no enclave; the server is a bare HTTP/1.1 responder in a thread here, so
the figures are the client's own cost). Prints microseconds of client-thread CPU and wall per
request (3,000-byte body, 600-byte answer: one image; `--body 131072 --answer 24576` is a
32-image request of bench-serve's throughput phase), then one JSON line.

    PYTHONPATH=src python benchmarks/bench_client_http.py [--n 2000] [--body B] [--answer B]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time

import httpx

from enclaveml.client.keepalive import KeepAlivePost
from enclaveml.client.sdk import NODELAY

ANSWER = [b"y" * 600]


def _serve(sock: socket.socket) -> None:
    while True:
        c, _ = sock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_connection, args=(c,), daemon=True).start()


def _connection(c: socket.socket) -> None:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                return
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        n = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        while len(rest) < n:
            rest += c.recv(65536)
        buf = rest[n:]
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n"
                  % len(ANSWER[0]) + ANSWER[0])


def _time(f, n: int) -> dict:
    for _ in range(100):
        f()
    c, w = time.thread_time(), time.perf_counter()
    for _ in range(n):
        f()
    return {"cpu_us": round((time.thread_time() - c) / n * 1e6, 1), "wall_us": round((time.perf_counter() - w) / n * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--body", type=int, default=3000, help="request body bytes")
    ap.add_argument("--answer", type=int, default=600, help="answer body bytes")
    args = ap.parse_args()
    ANSWER[0] = b"y" * args.answer
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    threading.Thread(target=_serve, args=(sock,), daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    body = os.urandom(args.body)
    hx = httpx.Client(transport=httpx.HTTPTransport(socket_options=NODELAY))
    lean = KeepAlivePost(url, 60.0)
    headers = {"content-type": "application/octet-stream"}
    out = {}
    for name in ("httpx", "keepalive", "httpx_again", "keepalive_again"):
        if name.startswith("httpx"):
            out[name] = _time(lambda: hx.post(url + "/v1/models/o/m/infer", content=body, headers=headers).content, args.n)
        else:
            out[name] = _time(lambda: lean.post("/v1/models/o/m/infer", body).content, args.n)
        print(f"{name:16} {out[name]['cpu_us']:8.1f} us CPU {out[name]['wall_us']:8.1f} us wall per request")
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
