"""`enclaveml serve --replicas 2` on a real local Ray: one deploy reaches both replicas, inference
through the SDK uses both, a request sealed to one replica does not open at the other, and a
replica whose server is SIGKILLed is restarted by Ray and serves the restored deployment.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("ray.serve")

from enclaveml import errors as E  # noqa: E402
from enclaveml.client import EnclaveClient  # noqa: E402
from enclaveml.crypto import SigningKey, frame_fresh  # noqa: E402
from enclaveml.models import zoo  # noqa: E402
from enclaveml.models.bundle import make_bundle  # noqa: E402
from enclaveml.protocol import infer as protocol  # noqa: E402
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package  # noqa: E402

K = 3


def _front(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=30).json()


def _wait(url: str, pred, timeout_s: float, what: str) -> dict:
    deadline, body = time.time() + timeout_s, None
    while time.time() < deadline:
        body = _front(url)
        if pred(body):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s: {body}")


@pytest.mark.slow
def test_two_replicas_deploy_infer_replay_and_restart(tmp_path: Path, cifar10_dir: Path):
    torch.set_num_threads(1)
    home, pkg = tmp_path / "home", snapshot_package(tmp_path / "pkg")
    model, entry = zoo.load("darknet", pretrained=False), zoo.entry("darknet")
    owner = SigningKey.generate()
    _, key = make_bundle(model, K, tmp_path / "bundle", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    images = [p.read_bytes() for p in sorted((cifar10_dir / "test" / "ship").glob("*.jpg"))[:2]]
    with torch.no_grad():
        want = model(torch.stack([entry.preprocessing(b) for b in images])).argmax(1).tolist()
    policy = local_sim_policy(home, pkg)
    ref = f"{owner.public_key().to_bytes().hex()}/m"

    args = ["--replicas", "2", "--replica-cpus", "0.5", "--enclave-threads", "1"]
    with ServerProcess(tmp_path / "store", tmp_path / "front.log", extra_args=args, env=server_env(home, pkg),
                       timeout_s=240) as front:
        body = _front(front.url)
        rows = body["replicas"]
        assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), body
        assert len({r["enclave_key"] for r in rows}) == 2  # a key per replica
        assert len({r["url"] for r in rows}) == 2

        with EnclaveClient(front.url, policy) as c:
            out = c.deploy(tmp_path / "bundle", key, owner, model_id="m")
            assert out["model"] == ref and len(out["replicas"]) == 2
            for _ in range(4):  # round-robin: both replicas serve
                assert [r["top"][0]["index"] for r in c.infer(images, model="m")] == want
            policy = c.policy  # now pins "m"
        body = _wait(front.url, lambda b: all(r["requests"] == 2 and r["models"] == [ref] for r in b["replicas"]),
                     10, "both replicas served 2 requests each")
        m = httpx.get(front.url + "/metrics", params={"format": "json"}, timeout=30).json()
        assert sum(x["value"] for x in m["counters"] if x["name"] == "inferences_total") == 4
        assert httpx.get(front.url + "/v1/models", timeout=30).status_code == 421

        # Replay across replicas: a request sealed to replica A, sent by the host to replica B.
        a, b = (EnclaveClient(r["url"], policy) for r in body["replicas"])
        att_a = a.attest()
        target = a.target("m")
        framed = frame_fresh(protocol.encode_payload(images[:1], 5, False))
        msg, _, _ = protocol.seal_infer(att_a.public_key, target, framed)
        r = httpx.post(f"{b.url}/v1/models/{target.ref}/infer", content=msg, timeout=60)
        assert r.status_code == 400 and r.json()["error"] == "TamperedMessage"
        assert httpx.post(f"{a.url}/v1/models/{target.ref}/infer", content=msg, timeout=60).status_code == 200
        a.close(), b.close()

        # SIGKILL one replica's host server: Ray restarts the replica; its server restores "m".
        before = {r["id"] for r in body["replicas"]}
        victim = body["replicas"][0]
        os.kill(victim["server_pid"], signal.SIGKILL)
        body = _wait(front.url, lambda b: len(b["replicas"]) == 2 and victim["id"] not in {r["id"] for r in b["replicas"]}
                     and all(r["status"] == "ok" and r["models"] == [ref] for r in b["replicas"]),
                     120, "a restarted replica with the restored deployment")
        (restarted,) = {r["id"] for r in body["replicas"]} - before
        with EnclaveClient(front.url, policy) as c2:  # no redeploy: the owner is not involved
            for _ in range(2):
                assert [r["top"][0]["index"] for r in c2.infer(images, model="m")] == want
        _wait(front.url, lambda b: any(r["id"] == restarted and r["requests"] == 1 for r in b["replicas"]),
              10, "the restarted replica served a request")
