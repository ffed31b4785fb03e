"""A restarting enclave answers 503 with Retry-After, never 404; a hung one is found and replaced.

Security review F-32 (restart window) and F-33 (SIGSTOP). Real server, real worker processes,
real signals: a SIGKILLed worker while requests keep arriving, and a SIGSTOPped worker that
still holds its socket open (so only a liveness ping through the channel can tell). Then the
worker's ping must not be fooled by long legitimate work: it is answered on the reading thread.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle
from enclaveml.runtime.enclave.main import add_builtin_ops
from enclaveml.runtime.enclave.ops import OpRegistry
from enclaveml.runtime.rpc import ChannelClient, serve_channel
from enclaveml.runtime.transport import Channel
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package
from enclaveml.serve.worker import INLINE_OPS, register_ops


@pytest.fixture(scope="module")
def served(tmp_path_factory, cifar10_dir):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("liveness")
    home, pkg = base / "home", snapshot_package(base / "pkg")
    owner = SigningKey.generate()
    model, entry = zoo.load("darknet", pretrained=False), zoo.entry("darknet")
    _, key = make_bundle(model, 3, base / "b", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    image = sorted((cifar10_dir / "test" / "dog").glob("*.jpg"))[0].read_bytes()
    policy = local_sim_policy(home, pkg)
    with ServerProcess(base / "store", base / "server.log", env=server_env(home, pkg),
                       extra_args=["--ping-interval", "0.5", "--ping-timeout", "2"]) as srv:
        with EnclaveClient(srv.url, policy) as c:
            c.deploy(base / "b", key, owner, model_id="m")
            assert c.infer([image], model="m")[0]["top"]
            policy = c.policy  # now pins "m", as a client's policy file would
        ref = f"{owner.public_key().to_bytes().hex()}/m"
        yield SimpleNamespace(srv=srv, policy=policy, image=image, base=base, ref=ref)


def _health(s) -> tuple[int, dict]:
    r = httpx.get(s.srv.url + "/healthz", timeout=30)
    return r.status_code, r.json()


def _restarted(s, old_pid: int, timeout_s: float = 90.0, seen: list | None = None) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        code, body = _health(s)
        if seen is not None:
            seen.append((code, body["status"]))
        if code == 200 and body["enclave_pid"] != old_pid and [m.split("/")[-1] for m in body["models"]] == ["m"]:
            return body
        time.sleep(0.1)
    raise AssertionError(f"no restarted enclave with its model within {timeout_s} s: {body}")


def _serves_again(s) -> None:
    with EnclaveClient(s.srv.url, s.policy) as c:  # a new enclave key: attest afresh
        assert c.infer([s.image], model="m")[0]["top"]


def _our_segments(*pids: int) -> list[str]:
    """/dev/shm entries of ours (eml*) made by these processes (names carry the creator's pid)."""
    return [p.name for p in Path("/dev/shm").iterdir()
            if p.name.startswith("eml") and any(f"_{pid}_" in p.name for pid in pids)]


def _restarts(s, reason: str) -> float:
    m = httpx.get(s.srv.url + "/metrics", params={"format": "json"}, timeout=30).json()
    return sum(c["value"] for c in m["counters"]
               if c["name"] == "enclave_restarts_total" and c["labels"].get("reason") == reason)


def test_requests_during_a_restart_get_503_with_retry_after_never_404(served):
    s = served
    old = s.srv.enclave_pid()
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:  # what a client keeps sending while the worker comes back
        with httpx.Client(timeout=30) as h:
            while not stop.is_set():
                for method, path in (("POST", f"/v1/models/{s.ref}/infer"), ("POST", "/v1/models/m"),
                                     ("DELETE", f"/v1/models/{s.ref}")):
                    r = h.request(method, s.srv.url + path, content=b"\x00" * 200)
                    answers.append((r.status_code, r.headers.get("retry-after")))

    assert _our_segments(s.srv.pid, old) == []  # tensors travelled (the model ran): no names in /dev/shm
    t = threading.Thread(target=hammer)
    t.start()
    try:
        time.sleep(0.3)
        os.kill(old, signal.SIGKILL)
        _restarted(s, old)
    finally:
        stop.set()
        t.join(60)
    codes = [c for c, _ in answers]
    new = s.srv.enclave_pid()
    assert _our_segments(s.srv.pid, old, new) == [], "a shared-memory segment outlived its process"
    assert 404 not in codes, "a restarting enclave answered UnknownModel"
    assert 503 in codes
    assert all(ra is not None and int(ra) >= 1 for c, ra in answers if c == 503)
    assert set(codes) <= {400, 409, 422, 503}, set(codes)
    _serves_again(s)
    assert _restarts(s, "died") == 1


def test_a_stopped_worker_is_reported_and_restarted(served):
    s = served
    old = s.srv.enclave_pid()
    os.kill(old, signal.SIGSTOP)
    try:
        seen: list = []
        _restarted(s, old, seen=seen)
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert (503, "enclave unresponsive") in seen, seen[:5]
    assert not Path(f"/proc/{old}").exists(), "the hung worker was left behind"
    _serves_again(s)
    assert _restarts(s, "unresponsive") == 1
    log = (s.base / "server.log").read_text()
    assert '"reason":"unresponsive"' in log


def test_ping_is_answered_while_every_pool_thread_is_busy():
    """The worker's ping runs on the reading thread (the runtime's built-in, inline), so long
    legitimate work on the pool does not make a busy worker look hung."""
    serving = add_builtin_ops(register_ops(OpRegistry(), None), dict)
    assert {n for n in serving.names() if serving.is_inline({"op": n})} == set(INLINE_OPS)
    a, b = socket.socketpair()
    release = threading.Event()
    ops = OpRegistry()

    @ops.op("slow")
    def slow(call):
        release.wait(30)
        return {"op": "slow"}

    add_builtin_ops(ops, dict)
    worker = threading.Thread(target=serve_channel, args=(Channel(b), ops.handle, 1),
                              kwargs={"inline": ops.is_inline})
    worker.start()
    client = ChannelClient(Channel(a))
    try:
        slow = [client.call({"op": "slow"}) for _ in range(3)]  # the one pool thread, and a queue
        t0 = time.monotonic()
        assert client.request({"op": "ping"}, timeout=5)[0]["pong"] is True
        assert time.monotonic() - t0 < 2.0
        assert not any(f.done() for f in slow)
        release.set()
        assert all(f.result(30)[0]["op"] == "slow" for f in slow)
    finally:
        release.set()
        client.close()
        worker.join(30)
