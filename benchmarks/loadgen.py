"""A lean load generator for `bench_serve.py`'s server-capacity figure: the server's cost alone.

Trust side: client (run by the operator on the benchmark machine, loopback only).

The SDK client (`client/sdk.py`) spends about 135 CPU us per image (8 threads of httpx, sealing
and opening in the timed window) on the same 2 cores as the server: load-generator cost that a
plain PyTorch run does not pay. This generator seals every request beforehand with the real SDK
protocol (the attested key, the verified pin, `InferRequest` padded as the SDK pads it,
`protocol.seal_infer`), well within the enclave's freshness window, then sends them over a few
keep-alive HTTP/1.1 connections with a minimal client (one blocking socket per connection, one
`sendall` per request, a Content-Length reader), and opens and checks every answer only after the
timed window. The server sees exactly what SDK clients send; only the client's work moves out of
the measured window (it is still reported, as `cpu_ms`).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Sealed:
    """One request sealed ahead of time, and what opens and checks its answer afterwards."""

    path: str
    body: bytes
    images: int
    opener: object = field(repr=False)
    aad: bytes = b""


def seal_requests(client, model: str, chunks: "list[list[bytes]]", top_k: int = 1) -> list[Sealed]:
    """Seal one request per chunk of images for `model` exactly as `client.infer` would (its
    attestation, its verified pin, its padding and suite), without sending any."""
    from enclaveml.crypto import frame_fresh
    from enclaveml.protocol import infer as protocol

    att = client.attested()
    client.identity(model, att)  # the pin must accept the deployed identity before any image leaves
    target = client.target(model)
    suite = client.policy.suite_for(model)
    path = f"/v1/models/{target.ref}/infer"
    out = []
    for images in chunks:
        framed = frame_fresh(protocol.InferRequest(tuple(images), top_k, False).encode(pad=client.pad_requests))
        body, ctx, aad = protocol.seal_infer(att.recipient(suite), target, framed, suite)
        out.append(Sealed(path, body, len(images), ctx, aad))
    return out


def open_answers(sealed: list[Sealed], answers: list[bytes], model_target) -> list[list[dict]]:
    """Open each sealed answer with its request's context (TamperedMessage if it is not that
    request's) and decode its results, as the SDK does."""
    from enclaveml.protocol import infer as protocol

    return [protocol.decode_results(s.opener.open_response(a, s.aad), s.images, expected=model_target)
            for s, a in zip(sealed, answers)]


class _Conn:
    """One keep-alive HTTP/1.1 connection: POST a body, read the status and a Content-Length body."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
            elif k.strip().lower() == "transfer-encoding":
                raise ConnectionError("loadgen reads Content-Length answers only")
        if length is None:
            raise ConnectionError("answer without Content-Length")
        while len(self.buf) < length:
            self._recv()
        out, self.buf = self.buf[:length], self.buf[length:]
        return status, out

    def _recv(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


def run_threads(work, n: int) -> float:
    """Run `work(0)` .. `work(n - 1)` on n threads at once -> wall seconds from the first start to
    the last end; the first worker's exception is raised once all have ended."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt


class LoadGenerator:
    """`connections` keep-alive connections to `url`, each sending its share of the requests
    back to back (as many requests in flight as connections, like that many SDK clients). The
    connections are opened afresh by each `run`, before its clock starts (uvicorn closes one
    that idles for 5 s, as between the bench's phases)."""

    def __init__(self, url: str, connections: int = 8):
        u = urlsplit(url)
        self.addr = (u.hostname or "127.0.0.1", u.port or 80)
        self.n = max(1, connections)
        self.conns: list[_Conn] = []

    def run(self, sealed: list[Sealed]) -> tuple[float, list[bytes]]:
        """(seconds from first send to last answer, answers in request order); raises on any
        status other than 200 (the bench's requests are all good ones)."""
        self.close()
        self.conns = [_Conn(*self.addr) for _ in range(self.n)]
        answers: list = [None] * len(sealed)
        n = len(self.conns)

        def work(ci: int) -> None:
            for k in range(ci, len(sealed), n):
                status, body = self.conns[ci].post(sealed[k].path, sealed[k].body)
                if status != 200:
                    raise ConnectionError(f"request {k}: HTTP {status}: {body[:200]!r}")
                answers[k] = body

        dt = run_threads(work, n)
        return dt, answers

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns = []

    def __enter__(self) -> "LoadGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
