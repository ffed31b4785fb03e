"""The CalTrain host's routes, in process: FastAPI's TestClient over the real `TrainingHost` and a
real sim training enclave worker. Routes only decode a `protocol.caltrain` message, run one
`TrainingHost` call in a worker thread and encode the answer: malformed bodies are 400s (not
500s), and a slow enclave call never stalls the other routes."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from enclaveml import errors as E
from enclaveml.crypto import SigningKey
from enclaveml.protocol import caltrain as msg
from enclaveml.protocol.attest import EvidenceAnswer
from enclaveml.train.client import HostClient
from enclaveml.train.host import TrainingHost, create_app
from enclaveml.train.instances import make_upload
from image_helpers import random_png


class _GatedHost(TrainingHost):
    """A real TrainingHost whose `contribute` first waits for a gate (to hold one request in flight)."""

    gate: "threading.Event | None" = None

    def contribute(self, uploads):
        if self.gate is not None:
            self.gate.wait(30)
        return super().contribute(uploads)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    base = tmp_path_factory.mktemp("train-routes")
    owner, part = SigningKey.generate(), SigningKey.generate()
    made: list[_GatedHost] = []

    def factory():
        made.append(_GatedHost(base / "store", owner=owner.public_key().to_bytes().hex()))
        return made[0]

    with TestClient(create_app(factory), raise_server_exceptions=False) as http:
        client = HostClient("http://testserver")
        client.http.close()
        client.http = http  # the typed client, over the in-process app
        yield SimpleNamespace(http=http, client=client, host=made[0], owner=owner, part=part)


def test_info_and_evidence_are_typed_messages(host):
    plan, plan_hash = host.client.plan()
    ans = EvidenceAnswer.from_dict(host.http.get("/evidence", params={"nonce": os.urandom(16).hex()}).json())
    assert ans.plan_hash == plan_hash and len(ans.public_key) == 32
    assert host.http.get("/evidence", params={"nonce": "zz"}).json()["error"] == "UserInputError"


def test_malformed_bodies_are_400_and_change_nothing(host):
    before = host.http.get("/info").json()["instances"]
    for body in (b"not json", b"[1]", b'{"uploads": "x"}', b'{"uploads": ["!!"]}'):
        r = host.http.post("/contribute", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "UserInputError", (body, r.text)
    r = host.http.post("/contribute", json=msg.ContributeRequest((b"x",) * (msg.MAX_UPLOADS_PER_REQUEST + 1)).to_json())
    assert r.status_code == 400 and "at most" in r.json()["message"]
    r = host.http.post("/train/start", json={"run_id": "r", "command": "AA==", "checkpoint_every": "often"})
    assert r.status_code == 400 and r.json()["error"] == "UserInputError"
    r = host.http.post("/train/start", json=msg.RunCommand("r", b"not a sealed command", 5).to_json())
    assert r.status_code == 400 and r.json()["error"] in ("TamperedMessage", "DataError")
    with pytest.raises(E.UserInputError, match="has not finished"):
        host.client.release("r", b"x")
    assert host.http.get("/info").json()["instances"] == before
    assert host.http.get("/metrics").json()["error_UserInputError"] >= 6


def test_contribute_through_the_typed_client(host):
    ans = EvidenceAnswer.from_dict(host.http.get("/evidence", params={"nonce": os.urandom(16).hex()}).json())
    ups = [make_upload(ans.public_key, host.part, random_png(i), i % 10, plan=ans.plan_hash)[1] for i in range(3)]
    res = host.client.contribute(ups + [b"garbage"])
    assert [r.status for r in res] == ["accepted"] * 3 + ["rejected"]
    assert res[0].participant == host.part.public_key().fingerprint() and res[3].error and res[3].reason
    assert [r.status for r in host.client.contribute(ups[:1])] == ["exists"]


def test_a_slow_enclave_call_does_not_block_the_event_loop(host):
    """One /contribute is held inside `TrainingHost.contribute`; /metrics and /info still answer."""
    ans = EvidenceAnswer.from_dict(host.http.get("/evidence", params={"nonce": os.urandom(16).hex()}).json())
    up = make_upload(ans.public_key, host.part, random_png(99), 1, plan=ans.plan_hash)[1]
    host.host.gate = gate = threading.Event()
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", host.client.contribute([up])))
    t.start()
    try:
        time.sleep(0.5)  # the request is now waiting at the gate
        t0 = time.monotonic()
        assert host.http.get("/metrics").status_code == 200
        assert host.http.get("/info").status_code == 200
        assert time.monotonic() - t0 < 5 and "r" not in out
    finally:
        gate.set()
        host.host.gate = None
        t.join(30)
    assert [r.status for r in out["r"]] == ["accepted"]
