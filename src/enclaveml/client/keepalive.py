"""A lean keep-alive HTTP/1.1 POST for the SDK's inference requests: stdlib `http.client`, one
connection per thread.

Trust side: client. It only carries bytes that are already sealed (the HPKE request out, the
sealed response or a JSON error back); the SDK checks everything that comes back as before.

Why: httpx spends about 0.35 ms of client CPU on each request (its request and response
models, cookies, the connection pool), `http.client` about 0.07 ms (`benchmarks/bench_client_http.py`,
docs/benchmarks.md), and that CPU is on the latency path of every single-image request. The SDK uses this only for
`infer` requests to a plain `http://` URL through its own HTTP client with no proxy configured
for it; TLS, proxies, a caller's own `httpx.Client` (tests, replicas) and every other route
keep httpx.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """What an HTTP answer carries that the SDK reads (the same names as httpx.Response's)."""

    status_code: int
    content: bytes


def usable_for(url: str) -> bool:
    """Whether `url` (the server's base URL) may use `KeepAlivePost`: plain HTTP, and no proxy
    that httpx would use for it (HTTP_PROXY and friends, unless NO_PROXY names the host)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        return False
    proxies = urllib.request.getproxies()
    if not (proxies.get("http") or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(u.hostname))


class KeepAlivePost:
    """POSTs to one server, each calling thread on a connection of its own, kept open between
    requests; a connection the server closed meanwhile (keep-alive timeout) is replaced before
    use, never after a request was sent (a POST is never sent twice)."""

    def __init__(self, base_url: str, timeout: float):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port = u.hostname or "", u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        #: Open connections, for `close`; weak, so a finished thread's connection goes with it.
        self._conns: "weakref.WeakSet[http.client.HTTPConnection]" = weakref.WeakSet()

    def _connection(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is not None and c.sock is not None and _readable(c.sock):  # closed by the server (or junk)
            c.close()
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = c
            with self._lock:
                self._conns.add(c)
        if c.sock is None:
            c.connect()
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    def post(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> Answer:
        """One POST -> its answer. Transport failures raise OSError or http.client.HTTPException
        (the connection is dropped; the next call opens a new one)."""
        c = self._connection()
        try:
            c.request("POST", self.prefix + path, body=body, headers={"content-type": content_type})
            r = c.getresponse()
            return Answer(r.status, r.read())
        except BaseException:
            c.close()
            raise

    def close(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True
