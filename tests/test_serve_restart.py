"""A dead enclave worker is restarted and its deployments come back from their sealed records;
so do they when the whole server restarts on the same store. Real processes, real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from enclaveml import errors as E
from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey, frame_fresh
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle
from enclaveml.protocol import ModelPin, ModelRef, Target
from enclaveml.protocol import infer as protocol
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package
from enclaveml.serve.store import SEALED_DEPLOYMENT

K = 3


def _wait_for_new_enclave(srv: ServerProcess, old_pid: int, timeout_s: float = 60.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        r = httpx.get(srv.url + "/healthz", timeout=30)
        body = r.json()
        if r.status_code == 200 and body["enclave_pid"] != old_pid and body["models"]:
            return body
        time.sleep(0.2)
    raise AssertionError(f"no restarted enclave with its models within {timeout_s} s: {body}")


def _counter(client: EnclaveClient, name: str, **labels: str) -> float:
    return sum(c["value"] for c in client.metrics()["counters"]
               if c["name"] == name and all(c["labels"].get(k) == v for k, v in labels.items()))


def test_killed_worker_is_restarted_and_server_restart_restores(tmp_path: Path, cifar10_dir: Path):
    torch.set_num_threads(1)
    home, pkg = tmp_path / "home", snapshot_package(tmp_path / "pkg")
    model, entry = zoo.load("darknet", pretrained=False), zoo.entry("darknet")
    owner = SigningKey.generate()
    _, key = make_bundle(model, K, tmp_path / "bundle", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    images = [p.read_bytes() for p in sorted((cifar10_dir / "test" / "ship").glob("*.jpg"))[:3]]
    policy = local_sim_policy(home, pkg)
    with torch.no_grad():
        want = model(torch.stack([entry.preprocessing(b) for b in images])).argmax(1).tolist()

    with ServerProcess(tmp_path / "store", tmp_path / "server.log", env=server_env(home, pkg)) as srv:
        with EnclaveClient(srv.url, policy) as c:
            c.deploy(tmp_path / "bundle", key, owner, model_id="m")
            policy = c.policy  # now pins the owner's model "m" (what a client's policy file would hold)
            assert [r["top"][0]["index"] for r in c.infer(images, model="m")] == want
            # A lone request the host recorded (answered, so the old enclave's replay guard holds it).
            ref = ModelRef(owner.public_key().to_bytes().hex(), "m")
            recorded, _, _ = protocol.seal_infer(c.attested().public_key, Target(ref, ModelPin(ref.owner)),
                                                 frame_fresh(protocol.encode_payload(images[0], 1)))
            url = f"{srv.url}/v1/models/{ref}/infer"
            assert httpx.post(url, content=recorded, timeout=60).status_code == 200
            old_pid = srv.enclave_pid()
            os.kill(old_pid, signal.SIGKILL)
            body = _wait_for_new_enclave(srv, old_pid)
            assert body["models"] == [f"{owner.public_key().to_bytes().hex()}/m"]
            # A host that restarts the enclave to empty its replay guard, then resends the recorded
            # request: the new enclave's key cannot open it, so it is refused, not answered again.
            r = httpx.post(url, content=recorded, timeout=60)
            assert r.status_code == 400 and r.json()["error"] == "TamperedMessage"
            # The new enclave has a new key: the client's old attestation fails closed once ...
            with pytest.raises(E.TamperedMessage):
                c.infer(images, model="m")
            # ... then it attests again and the restored deployment answers as before, no redeploy.
            assert [r["top"][0]["index"] for r in c.infer(images, model="m")] == want
            assert _counter(c, "enclave_restarts_total") == 1
            assert _counter(c, "deployments_total", outcome="restored") == 1

    # A new server on the same store and platform: the deployment is back without the owner.
    with ServerProcess(tmp_path / "store", tmp_path / "server2.log", env=server_env(home, pkg)) as srv:
        with EnclaveClient(srv.url, policy) as c:
            assert [r["top"][0]["index"] for r in c.infer(images, model="m")] == want
            # The default placement on a CPU host runs every pass in the enclave, a request of more
            # than SMALL_ROWS images too: one round trip, no BackNet or finish call on the host.
            assert [r["top"][0]["index"] for r in c.infer(images * 2, model="m")] == want * 2
            # A host that records such a request and resends it: answered once, refused the second
            # time before any pass runs (the replay guard comes before the whole-pass path).
            ref = ModelRef(owner.public_key().to_bytes().hex(), "m")
            big, _, _ = protocol.seal_infer(c.attested().public_key, Target(ref, ModelPin(ref.owner)),
                                            frame_fresh(protocol.encode_payload(images * 2, 1)))
            url = f"{srv.url}/v1/models/{ref}/infer"
            assert httpx.post(url, content=big, timeout=60).status_code == 200
            passes = httpx.get(srv.url + "/metrics", params={"format": "json", "stages": 1},
                               timeout=30).json()["stages"]["enclave"]["frontnet"]["n"]
            r = httpx.post(url, content=big, timeout=60)
            assert r.status_code == 409 and r.json()["error"] == "ReplayedMessage"
            assert httpx.get(srv.url + "/metrics", params={"format": "json", "stages": 1},
                             timeout=30).json()["stages"]["enclave"]["frontnet"]["n"] == passes
        if not torch.cuda.is_available():  # a CPU host: the restore handed the enclave its BackNet again
            assert httpx.get(srv.url + "/healthz", timeout=30).json()["backnet"] == {"small": "enclave", "large": "enclave"}
            st = httpx.get(srv.url + "/metrics", params={"format": "json", "stages": 1}, timeout=30).json()["stages"]
            assert st["enclave"]["backnet"]["n"] >= 2 and st["host"]["one_op_answers"]["n"] >= 2
            assert "finish_call" not in st["host"] and "backnet_forward" not in st["host"]

    # A host that edits the sealed record gets nothing restored (and says so in its log).
    sealed = tmp_path / "store" / owner.public_key().to_bytes().hex() / "m" / SEALED_DEPLOYMENT
    blob = bytearray(sealed.read_bytes())
    blob[-1] ^= 1
    sealed.write_bytes(bytes(blob))
    with ServerProcess(tmp_path / "store", tmp_path / "server3.log", env=server_env(home, pkg)) as srv:
        assert httpx.get(srv.url + "/healthz", timeout=30).json()["models"] == []
        with EnclaveClient(srv.url, policy) as c, pytest.raises(E.UnknownModel):
            c.infer(images[:1], model="m")
    log = (tmp_path / "server3.log").read_text()
    assert "deployment not restored" in log and "TamperedMessage" in log
