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

    def __init__(self, close_after: int = 1000, drop: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/base"
        self.close_after, self.drop = close_after, drop
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
                out = body[::-1]
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(out) + out)
                served += 1


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
