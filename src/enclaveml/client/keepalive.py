"""A lean keep-alive HTTP/1.1 POST for the SDK's inference requests: one socket per thread, the
request written and the answer parsed here (stdlib `socket` only).

Trust side: client. It only carries bytes that are already sealed (the HPKE request out, the
sealed response or a JSON error back); the SDK checks everything that comes back as before.

Why: httpx spends about 0.35 ms of client CPU on each request (its request and response
models, cookies, the connection pool), `http.client` about 0.07 ms, most of it parsing the
answer's headers with the `email` package; this reads the status line and the few headers it
needs (Content-Length, Transfer-Encoding, Connection) itself (`benchmarks/bench_client_http.py`,
docs/benchmarks.md). That CPU is on the latency path of every single-image request. The SDK
uses this only for `infer` requests to a plain `http://` URL through its own HTTP client with no
proxy configured for it; TLS, proxies, a caller's own `httpx.Client` (tests, replicas) and every
other route keep httpx. Answers may be sized by Content-Length, chunked, or run to the
connection's close (HTTP/1.1, RFC 9112); anything else is an `http.client.HTTPException`.
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

#: Longest status line plus headers accepted in an answer, and most header lines.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
#: Bodies up to this size go out in one write with their head (one segment, one copy).
_JOIN_BELOW = 64 * 1024
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
    """One kept-alive socket and the bytes read past the last answer (none, normally)."""

    __slots__ = ("sock", "buf", "__weakref__")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise http.client.RemoteDisconnected("the server closed the connection before it answered")
        self.buf += data

    def read_head(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > MAX_HEAD_BYTES:
                raise http.client.LineTooLong("answer headers")
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            need = n - len(self.buf)
            data = self.sock.recv(max(need, 65536))
            if not data:
                raise http.client.IncompleteRead(bytes(self.buf), need)
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > MAX_HEAD_BYTES:
                raise http.client.LineTooLong("chunk size line")
            self._fill()

    def read_to_close(self) -> bytes:
        while True:
            data = self.sock.recv(262144)
            if not data:
                out = bytes(self.buf)
                self.buf.clear()
                return out
            self.buf += data


def _parse_head(head: bytes) -> tuple[int, dict[bytes, bytes], bool]:
    """Status code, the headers (names lower-cased; a repeated header's values comma-joined), and
    whether the server keeps the connection open after this answer (HTTP/1.1 unless it says
    `close`; HTTP/1.0 only if it says `keep-alive`)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise http.client.BadStatusLine(lines[0][:100].decode("latin-1"))
    if len(lines) > MAX_HEADERS + 1:
        raise http.client.HTTPException("too many headers in the answer")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise http.client.HTTPException("malformed header line in the answer")
        name, value = name.lower(), value.strip()
        headers[name] = headers[name] + b", " + value if name in headers else value
    connection = headers.get(b"connection", b"").lower()
    keep = b"close" not in connection if parts[0] != b"HTTP/1.0" else b"keep-alive" in connection
    return int(parts[1]), headers, keep


def _read_body(conn: _Connection, status: int, headers: dict[bytes, bytes]) -> bytes:
    if status in (204, 304):  # no body, whatever the headers say (RFC 9112 section 6.3)
        return b""
    te = headers.get(b"transfer-encoding")
    if te is not None:
        if te.lower() != b"chunked":
            raise http.client.HTTPException("unsupported transfer-encoding in the answer")
        out = []
        while True:
            size_text = conn.read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise http.client.HTTPException("malformed chunk size in the answer") from None
            if size < 0:
                raise http.client.HTTPException("malformed chunk size in the answer")
            if size == 0:
                while conn.read_line():  # trailers, up to the empty line
                    pass
                return b"".join(out)
            out.append(conn.read_exact(size))
            if conn.read_exact(2) != b"\r\n":
                raise http.client.HTTPException("malformed chunk in the answer")
    length = headers.get(b"content-length")
    if length is None:
        return conn.read_to_close()
    try:
        n = int(length)
    except ValueError:
        raise http.client.HTTPException("malformed content-length in the answer") from None
    if n < 0:
        raise http.client.HTTPException("malformed content-length in the answer")
    return conn.read_exact(n)


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
        if c is not None and (c.buf or _readable(c.sock)):  # closed by the server (or junk)
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
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nAccept-Encoding: identity\r\ncontent-type: %s\r\nContent-Length: %d\r\n\r\n" % (
            (self.prefix + path).encode("ascii"), self._host_header, content_type.encode("latin-1"), len(body))
        try:
            if len(body) < _JOIN_BELOW:
                c.sock.sendall(head + body)
            else:
                c.sock.sendall(head)
                c.sock.sendall(body)
            status, headers, keep = _parse_head(c.read_head())
            while 100 <= status < 200:  # interim answers (we send no Expect; skipped as http.client does)
                status, headers, keep = _parse_head(c.read_head())
            content = _read_body(c, status, headers)
            read_to_close = status not in (204, 304) and not ({b"content-length", b"transfer-encoding"} & headers.keys())
            if read_to_close or not keep:
                c.close()
                self._local.conn = None
            return Answer(status, content)
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
