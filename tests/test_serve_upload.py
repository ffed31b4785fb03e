"""Deploy uploads are authenticated before they are buffered (security review F-30).

The attacker is anyone who can reach the host's port: 20 concurrent oversized uploads, some
garbage, some signed by a throwaway key, must leave the host's peak memory flat and the server
serving; an upload over the concurrency cap gets 503 with Retry-After; a body that is not the
signed one is refused and leaves no file behind. Real server process, loopback only.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import httpx
import pytest
import torch

from enclaveml import errors as E
from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle
from enclaveml.protocol import deploy as U
from enclaveml.serve import upload as H
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package

FLOOD = 20
FLOOD_BYTES = 24 * 1024 * 1024  # each: 480 MiB in all, under the 512 MiB upload limit


# -- the pure header -------------------------------------------------------------------------


def test_header_round_trip_and_checks():
    owner = SigningKey.generate()
    body = b"parts" * 100
    prefix = U.sign_upload(owner, "m", body, 1000.0)
    n = U.header_length(prefix[:U.PREFIX_BYTES])
    h = U.parse_upload_header(prefix[U.PREFIX_BYTES:U.PREFIX_BYTES + n])
    assert (h.owner, h.model_id, h.size, h.ts) == (owner.public_key(), "m", len(body), 1000.0)
    H.check_upload_header(h, "m", 1 << 20, 1000.0 + H.MAX_SKEW_S - 1)
    with pytest.raises(E.TamperedMessage):
        H.check_upload_header(h, "other", 1 << 20, 1000.0)
    with pytest.raises(H.UploadTooLarge):
        H.check_upload_header(h, "m", len(body) - 1, 1000.0)
    with pytest.raises(E.ReplayedMessage):
        H.check_upload_header(h, "m", 1 << 20, 1000.0 + H.MAX_SKEW_S + 1)
    with pytest.raises(E.Unauthorized):
        H.check_upload_header(h, "m", 1 << 20, 1000.0, frozenset({SigningKey.generate().public_key().to_bytes()}))
    H.check_upload_header(h, "m", 1 << 20, 1000.0, H.parse_owner_keys([owner.public_key().to_bytes().hex()]))


def test_header_is_verified_before_it_is_parsed():
    owner = SigningKey.generate()
    raw = bytearray(U.sign_upload(owner, "m", b"x", 1.0)[U.PREFIX_BYTES:])
    raw[-3] ^= 1  # in the JSON
    with pytest.raises(E.TamperedMessage):
        U.parse_upload_header(bytes(raw))
    # another key's signature over the same JSON
    other = SigningKey.generate().public_key().to_bytes()
    with pytest.raises(E.TamperedMessage):
        U.parse_upload_header(other + bytes(raw[32:]))
    # the upload label: a signature made for an owner command does not verify here
    doc = bytes(raw[96:])
    with pytest.raises(E.TamperedMessage):
        U.parse_upload_header(owner.public_key().to_bytes() + owner.sign(b"enclaveml/v1 owner-command\x00" + doc) + doc)
    for bad in (b"\x00\x00", b"\xff\xff", b"\x00"):
        with pytest.raises(E.DataError):
            U.header_length(bad)
    with pytest.raises(E.UserInputError):
        H.parse_owner_keys(["zz"])


# -- against a real server -------------------------------------------------------------------


def _vm(pid: int, field: str) -> int:
    """A /proc/PID/status memory figure in bytes (VmRSS now, VmHWM the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


class RawUpload:
    """An HTTP upload written by hand, so the test decides what is sent and when."""

    def __init__(self, url: str, model: str, content_length: int):
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        self.conn.putrequest("POST", f"/v1/models/{model}")
        self.conn.putheader("Content-Length", str(content_length))
        self.conn.putheader("Content-Type", "application/octet-stream")
        self.conn.endheaders()

    def send(self, data: bytes) -> bool:
        try:
            self.conn.send(data)
            return True
        except OSError:  # the server answered and closed while we were still sending
            return False

    def response(self) -> tuple[int | None, dict, bytes]:
        try:
            r = self.conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        except (OSError, http.client.HTTPException):
            return None, {}, b""
        finally:
            self.conn.close()


def _flood_one(url: str, i: int, out: list) -> None:
    chunk = (b"\xff" if i % 2 else b"\x00") * (1 << 20)
    if i % 2:  # garbage from the first byte: a 65535-byte header, over the limit
        prefix = b""
    else:  # a valid header signed by a throwaway key, a body that does not match it
        prefix = U.sign_upload(SigningKey.generate(), "flood", b"\x01" * FLOOD_BYTES, time.time())
    up = RawUpload(url, "flood", len(prefix) + FLOOD_BYTES)
    sent = up.send(prefix)
    for _ in range(FLOOD_BYTES // len(chunk)):
        if not (sent and up.send(chunk)):
            break
    out[i] = up.response()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, cifar10_dir):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("upload")
    home, pkg = base / "home", snapshot_package(base / "pkg")
    owner = SigningKey.generate()
    model, entry = zoo.load("darknet", pretrained=False), zoo.entry("darknet")
    _, key = make_bundle(model, 3, base / "bundle", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    image = sorted((cifar10_dir / "test" / "cat").glob("*.jpg"))[0].read_bytes()
    with ServerProcess(base / "store", base / "server.log", env=server_env(home, pkg),
                       extra_args=["--max-uploads", "2"]) as srv:
        with EnclaveClient(srv.url, local_sim_policy(home, pkg)) as c:
            yield SimpleNamespace(srv=srv, client=c, owner=owner, key=key, base=base, image=image)


def _uploads_on_disk(s) -> list[str]:
    return [p.name for p in (s.base / "store").iterdir() if p.name.startswith(".upload-")]


def test_upload_flood_leaves_host_memory_flat(server):
    s = server
    s.client.deploy(s.base / "bundle", s.key, s.owner, model_id="m")  # warm the deploy path first
    peak0, rss0 = _vm(s.srv.pid, "VmHWM"), _vm(s.srv.pid, "VmRSS")
    out: list = [None] * FLOOD
    threads = [threading.Thread(target=_flood_one, args=(s.srv.url, i, out)) for i in range(FLOOD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    grown = _vm(s.srv.pid, "VmHWM") - peak0
    assert grown < 50 * 1024 * 1024, f"host peak memory grew by {grown / 2**20:.0f} MiB under the flood"
    assert _vm(s.srv.pid, "VmRSS") - rss0 < 50 * 1024 * 1024
    assert all(code in (None, 400, 413, 422, 503) for code in out), out  # refused, or cut off mid-send
    assert not any(code == 200 for code in out)
    assert _uploads_on_disk(s) == []
    # ... and the server still serves its owner.
    s.client.deploy(s.base / "bundle", s.key, s.owner, model_id="m")
    assert s.client.infer([s.image], model="m")[0]["top"]
    assert not any(m.endswith("/flood") for m in s.client.health()["models"])


def test_concurrent_uploads_are_capped_with_retry_after(server):
    s = server
    size = 4 << 20
    held = []
    for _ in range(2):  # two slow uploads with valid (throwaway-key) headers hold both slots
        prefix = U.sign_upload(SigningKey.generate(), "slow", b"\x00" * size, time.time())
        up = RawUpload(s.srv.url, "slow", len(prefix) + size)
        assert up.send(prefix + b"\x00" * 1024)
        held.append(up)
    deadline = time.time() + 30
    while len(_uploads_on_disk(s)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(_uploads_on_disk(s)) == 2  # streamed to disk, in the store's folder
    with pytest.raises(E.EnclaveMLError, match="uploads are in progress"):
        s.client.deploy(s.base / "bundle", s.key, s.owner, model_id="m")
    prefix = U.sign_upload(s.owner, "m", b"", time.time())
    r = httpx.post(s.srv.url + "/v1/models/m", content=prefix, timeout=30)
    assert r.status_code == 503 and r.json()["error"] == "ServerBusy" and int(r.headers["retry-after"]) >= 1
    for up in held:  # the slow senders give up: their files go
        up.conn.close()
    deadline = time.time() + 30
    while _uploads_on_disk(s) and time.time() < deadline:
        time.sleep(0.05)
    assert _uploads_on_disk(s) == []
    s.client.deploy(s.base / "bundle", s.key, s.owner, model_id="m")


def test_body_that_is_not_the_signed_one_is_refused(server):
    s = server
    body = os.urandom(4096)
    prefix = U.sign_upload(s.owner, "m2", body, time.time())
    for bad, kind in ((body[:-1] + b"!", "TamperedMessage"),  # same size, other bytes
                      (body[:-1], "DataError")):  # shorter than signed
        r = httpx.post(s.srv.url + "/v1/models/m2", content=prefix + bad, timeout=30)
        assert r.status_code in (400, 422) and r.json()["error"] == kind
    r = httpx.post(s.srv.url + "/v1/models/m2", content=prefix + body + b"!", timeout=30)  # longer
    assert r.status_code in (400, 413, 422)
    old = U.sign_upload(s.owner, "m2", body, time.time() - 2 * H.MAX_SKEW_S)
    r = httpx.post(s.srv.url + "/v1/models/m2", content=old + body, timeout=30)
    assert r.status_code == 409 and r.json()["error"] == "ReplayedMessage"
    big = U.sign_upload(s.owner, "m2", b"", time.time())  # a header that lies about nothing, empty
    r = httpx.post(s.srv.url + "/v1/models/m2", content=big, timeout=30)
    assert r.status_code == 422 and r.json()["error"] == "DataError"
    assert _uploads_on_disk(s) == [] and not any(m.endswith("/m2") for m in s.client.health()["models"])


def test_allow_owner_refuses_other_keys_before_the_body(tmp_path, cifar10_dir):
    home, pkg = tmp_path / "home", snapshot_package(tmp_path / "pkg")
    owner, mallory = SigningKey.generate(), SigningKey.generate()
    model, entry = zoo.load("darknet", pretrained=False), zoo.entry("darknet")
    _, key = make_bundle(model, 3, tmp_path / "b", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    _, key2 = make_bundle(model, 3, tmp_path / "e", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), mallory)
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", env=server_env(home, pkg),
                       extra_args=["--allow-owner", owner.public_key().to_bytes().hex()]) as srv:
        with EnclaveClient(srv.url, local_sim_policy(home, pkg)) as c:
            with pytest.raises(E.Unauthorized, match="may not upload"):
                c.deploy(tmp_path / "e", key2, mallory, model_id="evil")
            size = 64 << 20  # announced, never sent: refused on the header alone
            prefix = U.sign_upload(mallory, "evil", b"", time.time())
            up = RawUpload(srv.url, "evil", len(prefix) + size)
            up.send(prefix)
            status, _, body = up.response()
            assert status == 403 and b"Unauthorized" in body
            assert c.deploy(tmp_path / "b", key, owner, model_id="good")["name"] == "good"
