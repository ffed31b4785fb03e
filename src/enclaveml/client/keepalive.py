"""A lean keep-alive HTTP/1.1 POST for the SDK's inference requests: one socket per thread, the
HTTP/1.1 framing done by h11 (the sans-I/O protocol library uvicorn itself uses).

Trust side: client. It only carries bytes that are already sealed (the HPKE request out, the
sealed response or a JSON error back); the SDK checks everything that comes back as before.
The server is the host, so its answer is untrusted input: h11 parses it (status line, headers,
Content-Length, chunked, read-to-close, interim 1xx answers, 204/304), with the head capped at
`MAX_HEAD_BYTES` and the body at `MAX_ANSWER_BYTES`; anything malformed is an
`http.client.HTTPException` (`BadAnswer`), as `http.client` itself would raise.

Why: httpx spends about 0.35 ms of client CPU on each request (its request and response
models, cookies, the connection pool), `http.client` about 0.07 ms, most of it parsing the
answer's headers with the `email` package (`benchmarks/bench_client_http.py`, docs/benchmarks.md).
That CPU is on the latency path of every single-image request. The SDK uses this only for
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

import h11

#: Longest status line plus headers accepted in an answer.
MAX_HEAD_BYTES = 64 * 1024
#: Largest answer body accepted (a sealed answer is 768 bytes an image; far above any batch).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: Bodies up to this size go out in one write with their head (one segment, one copy).
_JOIN_BELOW = 64 * 1024
_RECV = 262144


class BadAnswer(http.client.HTTPException):
    """The server's answer is not well-formed HTTP/1.1, or is larger than this client accepts."""


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


class _Connection:
    """One kept-alive socket and its h11 state machine."""

    __slots__ = ("sock", "proto", "__weakref__")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.proto = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)

    def close(self) -> None:
        self.sock.close()

    def exchange(self, request: h11.Request, body: bytes) -> Answer:
        """Send one request with its body; read its answer (interim 1xx answers skipped)."""
        p = self.proto
        head = p.send(request)
        if len(body) < _JOIN_BELOW:
            self.sock.sendall(head + p.send(h11.Data(data=body)) + p.send(h11.EndOfMessage()))
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)
            p.send(h11.Data(data=body))
            p.send(h11.EndOfMessage())
        status, parts, size, received = 0, [], 0, 0
        while True:
            try:
                ev = p.next_event()
            except h11.RemoteProtocolError as e:
                raise BadAnswer(f"malformed answer ({e})") from None
            if ev is h11.NEED_DATA:
                data = self.sock.recv(_RECV)
                received += len(data)
                p.receive_data(data)  # b"" = the server closed: h11 decides
                continue
            if isinstance(ev, (h11.Response, h11.InformationalResponse)):
                # h11 caps only a head still incomplete; one that arrived whole is checked here
                if received - len(p.trailing_data[0]) > MAX_HEAD_BYTES:
                    raise BadAnswer(f"answer head larger than {MAX_HEAD_BYTES} bytes")
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                size += len(ev.data)
                if size > MAX_ANSWER_BYTES:
                    raise BadAnswer(f"answer larger than {MAX_ANSWER_BYTES} bytes")
                parts.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return Answer(status, b"".join(parts))
            elif isinstance(ev, h11.ConnectionClosed):
                raise http.client.RemoteDisconnected("the server closed the connection before it answered")
            # h11.InformationalResponse: skipped, as http.client does

    def reusable(self) -> bool:
        """Ready for the next request on this socket (both sides done, neither closing)."""
        p = self.proto
        if p.our_state is h11.DONE and p.their_state is h11.DONE:
            p.start_next_cycle()
            return True
        return False


class KeepAlivePost:
    """POSTs to one server, each calling thread on a connection of its own, kept open between
    requests; a connection the server closed meanwhile (keep-alive timeout) is replaced before
    use, never after a request was sent (a POST is never sent twice)."""

    def __init__(self, base_url: str, timeout: float):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port = u.hostname or "", u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = (host if self.port == 80 else f"{host}:{self.port}").encode("idna")
        self._local = threading.local()
        self._lock = threading.Lock()
        #: Open connections, for `close`; weak, so a finished thread's connection goes with it.
        self._conns: "weakref.WeakSet[_Connection]" = weakref.WeakSet()

    def _connection(self) -> _Connection:
        c = getattr(self._local, "conn", None)
        if c is not None and _readable(c.sock):  # closed by the server (or junk)
            c.close()
            c = None
        if c is None:
            sock = socket.create_connection((self.host, self.port), self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = self._local.conn = _Connection(sock)
            with self._lock:
                self._conns.add(c)
        return c

    def post(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> Answer:
        """One POST -> its answer. Transport failures raise OSError or http.client.HTTPException
        (the connection is dropped; the next call opens a new one)."""
        c = self._connection()
        request = h11.Request(method="POST", target=(self.prefix + path).encode("ascii"),
                              headers=[(b"host", self._host_header), (b"accept-encoding", b"identity"),
                                       (b"content-type", content_type.encode("latin-1")),
                                       (b"content-length", b"%d" % len(body))])
        try:
            answer = c.exchange(request, body)
            if not c.reusable():
                c.close()
                self._local.conn = None
            return answer
        except BaseException:
            c.close()
            self._local.conn = None
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
