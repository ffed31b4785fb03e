"""HPKE suites end to end: a real server; an owner releases the model key in the post-quantum
hybrid suite; clients infer in each suite, old ones unchanged; a host that withholds or swaps the
hybrid key, or rewrites a request's suite id, gets a refusal, never a weaker suite."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import httpx
import pytest
import torch

from enclaveml import errors as E
from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey, frame_fresh
from enclaveml.crypto import suites as S
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle
from enclaveml.protocol import ModelPin, ModelRef, Target
from enclaveml.protocol import infer as protocol
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package

from hostile_proxy import HostileProxy

MODEL = "darknet"
PQ = {"suite": S.MLKEM768_X25519}


@pytest.fixture(scope="module")
def served(tmp_path_factory, cifar10_dir):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("suites")
    home = base / "home"
    pkg = snapshot_package(base / "pkg")
    entry = zoo.entry(MODEL)
    model = zoo.load(MODEL, pretrained=False)
    owner = SigningKey.generate()
    _, key = make_bundle(model, 3, base / "bundle", {"zoo": MODEL}, entry.preprocessing, list(entry.classes), owner)
    policy = local_sim_policy(home, pkg)
    srv = ServerProcess(base / "store", base / "server.log", env=server_env(home, pkg)).start()
    owner_client = EnclaveClient(srv.url, replace(policy, crypto=PQ))  # key release in the hybrid suite
    try:
        owner_client.deploy(base / "bundle", key, owner, model_id=MODEL)
        img = sorted((cifar10_dir / "test" / "cat").glob("*.jpg"))[0].read_bytes()
        with torch.no_grad():
            want = int(model(entry.preprocessing(img).unsqueeze(0))[0].argmax())
        yield SimpleNamespace(srv=srv, policy=replace(owner_client.policy, crypto={}), owner=owner, img=img, want=want)
    finally:
        owner_client.close()
        srv.stop()


@pytest.mark.parametrize("crypto", [{}, {"suite": S.LEGACY}, {"suite": S.X25519}, PQ,
                                    {"models": {MODEL: S.MLKEM768_X25519}}])
def test_every_suite_serves_the_same_answer(served, crypto):
    with EnclaveClient(served.srv.url, replace(served.policy, crypto=crypto)) as c:
        res = c.infer([served.img, served.img], model=MODEL, top_k=1)
        assert [r["top"][0]["index"] for r in res] == [served.want] * 2
        assert (c.attested().pq_public_key is not None) == (S.MLKEM768_X25519 in str(crypto))


@pytest.mark.parametrize("rewrite", ["drop", "swap"])
def test_host_withholding_or_swapping_the_hybrid_key_is_refused(served, rewrite):
    other = S.PqKeyPair.generate().public_bytes().hex()

    def hostile(path: str, body: dict) -> dict:
        if path == "/v1/evidence":
            if rewrite == "drop":
                body.pop("pq_public_key", None)
            else:
                body["pq_public_key"] = other
        return body

    proxy = HostileProxy(served.srv.url, hostile)
    try:
        with EnclaveClient(proxy.url, replace(served.policy, crypto=PQ)) as c:
            with pytest.raises(E.EvidenceRejected):
                c.infer([served.img], model=MODEL)
        with EnclaveClient(proxy.url, served.policy) as c:  # a classic client is not affected
            assert c.infer([served.img], model=MODEL, top_k=1)[0]["top"][0]["index"] == served.want
    finally:
        proxy.close()


def test_rewritten_suite_id_is_refused_and_a_replay_too(served):
    with EnclaveClient(served.srv.url, replace(served.policy, crypto=PQ)) as c:
        att = c.attested()
        c.infer([served.img], model=MODEL)  # the identity check is done
    ref = ModelRef(served.owner.public_key().to_bytes().hex(), MODEL)
    framed = frame_fresh(protocol.encode_payload(served.img, 1))
    body, ctx, aad = protocol.seal_infer(att.pq_public_key, Target(ref, ModelPin(ref.owner)), framed, S.MLKEM768_X25519)
    url = f"{served.srv.url}/v1/models/{ref}/infer"
    at = body.index(S.TAG) + len(S.TAG)
    for bad in (body[:at] + b"\x01" + body[at + 1:], body[:at - len(S.TAG)] + body[at + 1:]):
        r = httpx.post(url, content=bad, timeout=60)
        assert r.status_code == 400 and r.json()["error"] == "TamperedMessage"
    r = httpx.post(url, content=body, timeout=60)
    assert r.status_code == 200
    assert protocol.decode_result(ctx.open_response(r.content, aad))["top"][0]["index"] == served.want
    r = httpx.post(url, content=body, timeout=60)
    assert r.status_code == 409 and r.json()["error"] == "ReplayedMessage"


def test_stage_totals_come_from_host_and_enclave(served):
    with EnclaveClient(served.srv.url, served.policy) as c:
        c.infer([served.img], model=MODEL)  # one enclave round trip (serve/placement.py)
        c.infer([served.img] * 5, model=MODEL)  # over SMALL_ROWS: one round trip too on a CPU host
        assert c.clock.snapshot()["client_seal"]["n"] >= 1
    st = httpx.get(f"{served.srv.url}/metrics", params={"format": "json", "stages": 1}, timeout=30).json()["stages"]
    # the default placement (serve/placement.py): every pass in the enclave on a CPU host; with a
    # GPU the host's BackNet and the finish call
    placed = ((("host", "backnet_forward"), ("enclave", "op_finish_batch")) if torch.cuda.is_available()
              else (("host", "one_op_answers"), ("enclave", "backnet")))
    for side, stage in (("host", "front_call"), ("host", "http_infer"), *placed,
                        ("enclave", "hpke_seal"), ("enclave", "hpke_open"), ("enclave", "frontnet")):
        assert st[side][stage]["n"] >= 1 and st[side][stage]["wall_ns"] > 0, (side, stage)
