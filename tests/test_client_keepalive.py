"""The SDK's lean inference POST (client/keepalive.py): plain HTTP only and never past a proxy
httpx would use, one kept-alive connection per thread, a connection the server closed replaced
before use, and a request never sent twice."""

from __future__ import annotations

import socket
import threading

import pytest

from enclaveml.client.keepalive import KeepAlivePost, usable_for


class TinyServer:
    """HTTP/1.1 on a real socket: answers each POST with its body reversed; `close_after` requests
    per connection, then it closes it; `drop` closes without answering."""

    def __init__(self, close_after: int = 1000, drop: bool = False, answer=None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/base"
        self.close_after, self.drop = close_after, drop
        #: body -> the raw answer bytes (default: 200, Content-Length, the body reversed)
        self.answer = answer or (lambda body: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body[::-1])
        self.connections, self.requests = 0, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf, served = b"", 0
        with c:
            while served < self.close_after:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, rest = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                n = int(next(l for l in lines if l.lower().startswith(b"content-length")).split(b":")[1])
                while len(rest) < n:
                    rest += c.recv(65536)
                body, buf = rest[:n], rest[n:]
                self.requests.append((lines[0], body))
                if self.drop:
                    return
                out = self.answer(body)
                c.sendall(out)
                served += 1
                if (b"connection: close" in out.lower() or out.startswith(b"HTTP/1.0")
                        or b"content-length" not in out.lower() and b"chunked" not in out and b" 204 " not in out):
                    return


def test_only_plain_http_without_a_proxy(monkeypatch):
    for k in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    assert usable_for("http://127.0.0.1:8080")
    assert not usable_for("https://example.org")
    monkeypatch.setenv("http_proxy", "http://proxy:3128")
    assert not usable_for("http://10.0.0.1:8080")
    monkeypatch.setenv("no_proxy", "10.0.0.1")
    assert usable_for("http://10.0.0.1:8080")


def test_one_connection_per_thread_kept_between_requests():
    srv = TinyServer()
    p = KeepAlivePost(srv.url, 10)
    try:
        for i in range(5):
            a = p.post("/x", b"abc%d" % i)
            assert a.status_code == 200 and a.content == (b"abc%d" % i)[::-1]
        assert srv.connections == 1
        assert srv.requests[0][0] == b"POST /base/x HTTP/1.1"
        t = threading.Thread(target=p.post, args=("/x", b"other"))
        t.start()
        t.join()
        assert srv.connections == 2
        import gc

        gc.collect()
        assert len(p._conns) == 1  # the finished thread's connection went with it
    finally:
        p.close()


def test_a_connection_the_server_closed_is_replaced_before_use():
    srv = TinyServer(close_after=1)  # like a keep-alive timeout after each answer
    p = KeepAlivePost(srv.url, 10)
    try:
        assert p.post("/x", b"one").content == b"eno"
        import time

        time.sleep(0.2)  # the server's close has arrived
        assert p.post("/x", b"two").content == b"owt"
        assert srv.connections == 2 and len(srv.requests) == 2  # each request sent once
    finally:
        p.close()


def test_a_request_is_never_sent_twice():
    srv = TinyServer(drop=True)  # reads the request, then closes without an answer
    p = KeepAlivePost(srv.url, 10)
    try:
        with pytest.raises((OSError, __import__("http.client").client.HTTPException)):
            p.post("/x", b"once")
        assert len(srv.requests) == 1
        srv.drop = False
        assert p.post("/x", b"next").content == b"txen"  # a fresh connection for the next one
    finally:
        p.close()


@pytest.mark.parametrize("kind", ["chunked", "to-close", "interim", "close-header", "http1.0", "no-content"])
def test_answers_chunked_or_read_to_the_close_or_after_an_interim_answer(kind):
    def answer(body):
        out = body[::-1]
        if kind == "chunked":
            return (b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                    + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(out[i:i + 3]), out[i:i + 3]) for i in range(0, len(out), 3))
                    + b"0\r\nTrailer: x\r\n\r\n")
        if kind == "to-close":
            return b"HTTP/1.1 200 OK\r\n\r\n" + out
        if kind == "http1.0":  # no keep-alive: the client must not reuse the connection
            return b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)
        if kind == "no-content":  # no body whatever the headers say
            return b"HTTP/1.1 204 No Content\r\nContent-Type: x\r\n\r\n"
        if kind == "interim":
            return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)

    srv = TinyServer(answer=answer)
    p = KeepAlivePost(srv.url, 10)
    try:
        for body in (b"hello world", b"x" * 70_000):
            a = p.post("/x", body)
            if kind == "no-content":
                assert a.status_code == 204 and a.content == b""
            else:
                assert a.content == body[::-1] and a.status_code == (403 if kind == "chunked" else 200)
        assert srv.connections == (1 if kind in ("chunked", "interim", "no-content") else 2)
    finally:
        p.close()


@pytest.mark.parametrize("raw", [b"HTTP/1.1 2000 OK\r\n\r\n", b"SMTP 200 OK\r\n\r\n",
                                 b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                                 b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n"])
def test_malformed_answers_are_transport_errors(raw):
    import http.client

    srv = TinyServer(answer=lambda body: raw, close_after=1)
    p = KeepAlivePost(srv.url, 10)
    try:
        with pytest.raises((OSError, http.client.HTTPException)):
            p.post("/x", b"abc")
    finally:
        p.close()


def test_an_oversized_answer_is_refused_not_buffered(monkeypatch):
    """The host is the adversary: a huge head or body is a transport error, not memory spent."""
    import http.client

    import enclaveml.client.keepalive as ka

    monkeypatch.setattr(ka, "MAX_ANSWER_BYTES", 1000)
    big_body = TinyServer(answer=lambda body: b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
    big_chunks = TinyServer(answer=lambda body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n")
    big_head = TinyServer(answer=lambda body: b"HTTP/1.1 200 OK\r\nX-Pad: " + b"z" * (ka.MAX_HEAD_BYTES + 10)
                          + b"\r\nContent-Length: 0\r\n\r\n", close_after=1)
    for srv in (big_body, big_chunks, big_head):
        p = KeepAlivePost(srv.url, 10)
        try:
            with pytest.raises(http.client.HTTPException):
                p.post("/x", b"abc")
            assert p._local.conn is None  # dropped: the next request starts clean
        finally:
            p.close()
