"""CalTrain's enclave worker through the one runtime handle, as serving's: restarted when it dies
(SIGKILL) or hangs (SIGSTOP: only a liveness ping through the channel can tell), a run in progress
resumed from its sealed checkpoint by the owner's next start, and `train serve --tee gramine-sgx`
launched under (stand-in) Gramine tools exactly as `serve --tee gramine-sgx` is. Real processes,
real signals; the Gramine tools are the stand-ins of tests/manifest_helpers.py (no SGX here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import torch

from enclaveml.crypto import SigningKey, seal_owner_command
from enclaveml.train.enclave import START
from enclaveml.train.host import STATUS_OK, STATUS_UNRESPONSIVE, TrainingHost
from enclaveml.train.instances import make_upload
from enclaveml.train.partitioned import TrainConfig
from image_helpers import random_png
from manifest_helpers import fake_gramine_env, render

OWNER = SigningKey.generate()
OWNER_HEX = OWNER.public_key().to_bytes().hex()


def _replaced(host: TrainingHost, old_pid: int, seen: list | None = None, timeout_s: float = 90.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        h = host.health()
        if seen is not None:
            seen.append(h["status"])
        if h["status"] == STATUS_OK and h["enclave_pid"] != old_pid:
            return h
        time.sleep(0.05)
    raise AssertionError(f"no new enclave worker within {timeout_s} s: {host.health()}")


@pytest.fixture
def host(tmp_path):
    torch.set_num_threads(1)
    h = TrainingHost(tmp_path / "store", owner=OWNER_HEX, ping_interval_s=0.5, ping_timeout_s=2.0)
    yield h
    h.close()


def _attest(host: TrainingHost) -> tuple[bytes, bytes]:
    ev = host.evidence(os.urandom(16).hex())
    return bytes.fromhex(ev["public_key"]), bytes.fromhex(ev["plan_hash"])


def test_a_killed_then_a_stopped_worker_is_replaced(host):
    pub, _ = _attest(host)
    old = host.enclave.pid
    os.kill(old, signal.SIGKILL)
    _replaced(host, old)
    assert host.metrics["enclave_restarts_died"] == 1
    pub2, _ = _attest(host)  # a new worker: a new key, the same plan and measurement
    assert pub2 != pub and host.enclave.info["measurement"]

    old = host.enclave.pid
    os.kill(old, signal.SIGSTOP)  # alive, socket open: only the ping can tell
    try:
        seen: list = []
        _replaced(host, old, seen)
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert STATUS_UNRESPONSIVE in seen
    assert not Path(f"/proc/{old}").exists(), "the hung worker was left behind"
    assert host.metrics["enclave_restarts_unresponsive"] == 1
    _attest(host)


def test_a_run_stopped_by_a_dead_worker_resumes_from_its_checkpoint(host):
    part = SigningKey.generate()
    pub, plan = _attest(host)
    res = host.contribute([make_upload(pub, part, random_png(i), i % 10, plan=plan)[1] for i in range(16)])
    assert all(r["status"] == "accepted" for r in res)
    cfg = TrainConfig(epochs=60, batch=8, seed=0)  # 120 steps: long enough to be killed half way

    def start(pub: bytes) -> dict:
        cmd = seal_owner_command(OWNER, pub, START, "r1", os.urandom(16), {
            "model": "darknet:width=4", "split": 5, "config": cfg.to_dict(), "plan": plan.hex()})
        return host.start("r1", cmd, checkpoint_every=4)

    start(pub)
    deadline = time.time() + 120
    while host.status("r1").get("checkpoint", 0) < 8:
        assert host.status("r1")["state"] == "running" and time.time() < deadline, host.status("r1")
        time.sleep(0.02)
    old = host.enclave.pid
    os.kill(old, signal.SIGKILL)
    _replaced(host, old)
    st = host.status("r1")
    assert st["state"] == "failed" and "resume" in st["error"], st
    pub2, _ = _attest(host)
    with pytest.raises(Exception):  # a command sealed to the dead worker's key opens nowhere
        host.start("r1", seal_owner_command(OWNER, pub, START, "r1", os.urandom(16), {
            "model": "darknet:width=4", "split": 5, "config": cfg.to_dict(), "plan": plan.hex()}))
    st = start(pub2)
    assert st["resumed_from"] is not None and st["resumed_from"] >= 8
    while host.status("r1")["state"] == "running":
        assert time.time() < deadline + 240
        time.sleep(0.1)
    assert host.status("r1")["state"] == "done", host.status("r1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_serve_dry_run_writes_the_training_workers_manifest(tmp_path):
    gdir = tmp_path / "g"
    r = subprocess.run([sys.executable, "-m", "enclaveml", "train", "serve", "--tee", "gramine-sgx", "--store",
                        str(tmp_path / "store"), "--owner", OWNER_HEX, "--gramine-dir", str(gdir), "--threads", "2",
                        "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    argv = tomllib.loads(render((gdir / "worker.manifest.template").read_text()))["loader"]["argv"]
    assert argv[1:3] == ["-m", "enclaveml.train.enclave_worker"] and argv[argv.index("--tee") + 1] == "gramine-sgx"
    assert argv[argv.index("--channel-path") + 1] == str(gdir.resolve() / "worker.sock") and "--no-shm" in argv
    assert argv[argv.index("--owner") + 1] == OWNER_HEX  # owner and plan are measured (MRENCLAVE)
    assert json.loads(argv[argv.index("--plan") + 1])["owner"] == OWNER_HEX
    assert argv[argv.index("--torch-threads") + 1] == "2"
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("(cd ")][-1].endswith("&& gramine-sgx worker)")
    assert not (gdir / "worker.manifest").exists()
    r = subprocess.run([sys.executable, "-m", "enclaveml", "train", "serve", "--store", str(tmp_path / "s"),
                        "--owner", OWNER_HEX, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--tee gramine-sgx" in r.stderr and "Traceback" not in r.stderr


def test_train_serve_launches_the_signed_worker_over_the_socket_path(tmp_path):
    """`train serve --tee gramine-sgx`: manifest, sign, `gramine-sgx worker`, socket-path channel
    (before, it always started a plain subprocess by fd); the worker itself runs on sim."""
    env = {**fake_gramine_env(tmp_path / "bin"), "ENCLAVEML_HOME": str(tmp_path / "home")}
    gdir, port = tmp_path / "g", _free_port()
    log = open(tmp_path / "train.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "enclaveml", "train", "serve", "--tee", "gramine-sgx", "--store",
                             str(tmp_path / "store"), "--owner", OWNER_HEX, "--gramine-dir", str(gdir),
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "train.log").read_text()
            try:
                r = httpx.get(url + "/healthz", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        health = r.json()
        assert health["status"] == "ok" and health["tee"] == "gramine-sgx"
        cmdline = Path(f"/proc/{health['enclave_pid']}/cmdline").read_bytes().split(b"\0")
        assert b"enclaveml.train.enclave_worker" in cmdline and b"--channel-path" in cmdline and b"--no-shm" in cmdline
        ev = httpx.get(url + "/evidence", params={"nonce": os.urandom(16).hex()}, timeout=60).json()
        assert ev["evidence"]["backend"] == "sim" and len(bytes.fromhex(ev["public_key"])) == 32
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    assert (gdir / "worker.manifest.sgx").exists() and not (gdir / "worker.sock").exists()
    assert "MRENCLAVE " + bytes(range(32)).hex() in (tmp_path / "train.log").read_text()
