"""Label audit (train/audit.py) and its signed delivery by the training enclave.

The pure part runs on synthetic fingerprints with a known answer: four contributors, one of
which flips 20% of its labels c -> c+1. The enclave part trains a tiny real run in process,
then asks the enclave for the audit with owner-signed commands, as `enclaveml train audit` does.
"""

from __future__ import annotations

import json

import pytest
import torch

from enclaveml.crypto import HpkeKeyPair, SigningKey, open_request, seal_owner_command
from enclaveml.errors import ReplayedMessage, TamperedMessage, Unauthorized
from enclaveml.train import audit as A


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: why one thread


def _synthetic(n_per=400, parts=4, flip=0.2, noise=2.0, seed=0, bad=(3,)):
    """Class-structured unit fingerprints; ~natural confusion from noise; flips by `bad` contributors."""
    g = torch.Generator().manual_seed(seed)
    nc, dim = 10, 32
    centres = torch.nn.functional.normalize(torch.randn(nc, dim, generator=g), dim=1)
    n = n_per * parts
    true = torch.randint(0, nc, (n,), generator=g)
    fps = torch.nn.functional.normalize(centres[true] + noise * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)
    part = torch.arange(n) % parts
    labels = true.clone()
    flipped = torch.zeros(n, dtype=torch.bool)
    for b in bad:
        idx = torch.nonzero(part == b, as_tuple=True)[0]
        sel = idx[torch.randperm(len(idx), generator=g)[: int(flip * len(idx))]]
        labels[sel] = (labels[sel] + 1) % nc
        flipped[sel] = True
    return fps, labels, part, flipped


def _pr(mask, truth):
    tp = int((mask & truth).sum())
    return tp / max(1, int(mask.sum())), tp / max(1, int(truth.sum()))


def test_heldout_probabilities_never_see_their_own_label():
    fps, labels, part, _ = _synthetic(n_per=100)
    p = A.heldout_probs(fps, labels, 10, folds=5, seed=0)
    assert p.shape == (len(labels), 10) and torch.allclose(p.sum(1), torch.ones(len(labels)), atol=1e-5)
    # a label that is pure noise (random per instance) cannot be predicted out of sample
    rnd = torch.randint(0, 10, (len(labels),), generator=torch.Generator().manual_seed(9))
    acc = float((A.heldout_probs(fps, rnd, 10).argmax(1) == rnd).float().mean())
    assert acc < 0.2  # in-sample fitting of 400 points in 33 dims would score far higher
    assert float((p.argmax(1) == labels).float().mean()) > 0.6


def test_audit_finds_the_flipped_labels_and_the_contributor():
    fps, labels, part, flipped = _synthetic()
    res = A.label_audit(fps, labels, part, 10)
    p, r = _pr(res.suspected, flipped)
    assert p >= 0.65 and r >= 0.9, (p, r)  # real fingerprints: docs/benchmarks.md
    assert res.flagged == {3}
    # confident learning's own filter (cleanlab) on the same held-out predictions is less precise
    cleanlab = pytest.importorskip("cleanlab.filter")
    cl = torch.from_numpy(cleanlab.find_label_issues(labels.numpy(), res.probs.numpy()))
    assert _pr(cl, flipped)[0] < p


def test_two_bad_contributors_do_not_hide_each_other_and_honest_data_reports_nobody():
    fps, labels, part, flipped = _synthetic(bad=(2, 3))
    res = A.label_audit(fps, labels, part, 10)
    assert res.flagged == {2, 3}
    p, r = _pr(res.suspected, flipped)
    assert p >= 0.7 and r >= 0.8, (p, r)
    fps, labels, part, _ = _synthetic(bad=())
    res = A.label_audit(fps, labels, part, 10)
    assert res.flagged == set() and not res.suspected.any()


def test_the_report_holds_counts_and_instance_ids_only():
    fps, labels, part, flipped = _synthetic()
    pids = [bytes([int(c)]) * 32 for c in part]
    hashes = [i.to_bytes(32, "big") for i in range(len(labels))]
    rep = A.audit_report(fps, labels, pids, hashes, 10, run_id="r")
    assert set(rep) == A.REPORT_KEYS
    assert rep["contributors"][0]["participant"] == (bytes([3]) * 32).hex()  # the flipper first
    known = {h.hex() for h in hashes}
    for row in rep["contributors"]:
        assert set(row) == A.ROW_KEYS
        assert set(row["suspected_instances"]) <= set(row["disputed_instances"]) <= known
        assert row["instances"] == 400 and row["suspected"] == len(row["suspected_instances"])
    text = json.dumps(rep)
    # no label, class suggestion or fingerprint value travels: only ints, rates, ids and the method
    for row in rep["contributors"]:
        for key, v in row.items():
            assert isinstance(v, (str, int, float, bool, list)), key
            if isinstance(v, list):
                assert all(isinstance(x, str) and len(x) == 64 for x in v), key
    assert "label" not in text.replace("label-audit", "")
    # the report is deterministic, so its digest (what the enclave signs) is too
    assert A.report_digest(rep) == A.report_digest(A.audit_report(fps, labels, pids, hashes, 10, run_id="r"))


# -- the enclave: a tiny real run, then the owner-signed audit ---------------------------------------

SPEC = "darknet:width=4"
OWNER = SigningKey.generate()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from image_helpers import random_png

    from enclaveml.tee.sim import SimBackend
    from enclaveml.train.enclave import START, CalTrainEnclave, enclave_config
    from enclaveml.train.instances import make_upload
    from enclaveml.train.partitioned import HostTrainer, TrainConfig
    from enclaveml.train.spec import ModelSpec

    torch.set_num_threads(1)
    platform = tmp_path_factory.getbasetemp() / "audit-platform"
    be = SimBackend(enclave_config(OWNER.public_key()), platform_dir=platform, lock_memory=False)
    enc = CalTrainEnclave(be)
    parts = [SigningKey.generate() for _ in range(3)]
    ups = [make_upload(enc.hpke.public_bytes(), parts[i % 3], random_png(1000 + i), i % 10, plan=enc.plan_hash)[1]
           for i in range(30)]
    res = enc.ingest(ups)
    enc.add_data([(r["tag"], r["sealed"]) for r in res])
    cfg = TrainConfig(epochs=1, batch=10, seed=3)
    cmd = seal_owner_command(OWNER, enc.hpke.public_bytes(), START, "run-a", b"audit-start-0001",
                             {"model": SPEC, "split": 3, "config": cfg.to_dict(), "plan": enc.plan_hash.hex()})
    info, back_state = enc.start(cmd, None)
    from safetensors.torch import load, save

    _, back = ModelSpec.parse(SPEC).build().split(3)
    back.load_state_dict(load(back_state))
    host = HostTrainer(back, cfg, info["total_steps"])
    for step in range(info["total_steps"]):
        ir = enc.forward(step)
        enc.backward(host.backward(enc.loss_grad(host.forward(ir))))
    out = enc.finish(save({k: v.contiguous() for k, v in host.module.state_dict().items()}))
    tokens = enc.records(0, out["records"])
    from enclaveml.tee.sim import sim_policy
    from enclaveml.train.enclave import enclave_config as cfg_of

    policy = sim_policy(cfg_of(OWNER.public_key()), platform_dir=platform)
    return {"enc": enc, "final": out["final"], "meta": out["meta_token"], "tokens": tokens, "policy": policy,
            "parts": parts}


def _audit_cmd(enc, signer, nonce, run_id="run-a"):
    reply = HpkeKeyPair.generate()
    cmd = seal_owner_command(signer, enc.hpke.public_bytes(), "caltrain-audit", run_id, nonce,
                             {"reply_to": reply.public_bytes().hex()})
    return cmd, reply


def _load(enc, tokens):
    for start in range(0, len(tokens), 7):  # in chunks, as the host sends them
        enc.audit_records(start, tokens[start:start + 7])


def test_the_enclave_signs_the_audit_for_the_owner(finished):
    from enclaveml.train.enclave import AUDIT_INFO
    from enclaveml.train.owner import verify_audit

    enc = finished["enc"]
    _load(enc, finished["tokens"])
    cmd, reply = _audit_cmd(enc, OWNER, b"audit-nonce-0001")
    sealed = enc.audit(cmd, finished["final"], finished["meta"])
    env = json.loads(open_request(reply, sealed, b"", info=AUDIT_INFO)[0])
    rep = verify_audit(env, finished["policy"], run_id="run-a")
    assert rep["instances"] == 30 and len(rep["contributors"]) == 3
    assert {r["participant"] for r in rep["contributors"]} == {p.public_key().fingerprint() for p in finished["parts"]}
    assert sum(r["instances"] for r in rep["contributors"]) == 30
    # any change to the report breaks the signature; another enclave's key breaks the evidence
    bad = json.loads(json.dumps(env))
    bad["report"]["contributors"][0]["suspected"] += 1
    with pytest.raises(TamperedMessage):
        verify_audit(bad, finished["policy"])
    other = SigningKey.generate()
    forged = {**env, "audit_key": other.public_key().to_bytes().hex(),
              "signature": other.sign(A.signed_bytes(env["report"])).hex()}
    from enclaveml.errors import EvidenceRejected, PolicyViolation

    with pytest.raises((EvidenceRejected, PolicyViolation, TamperedMessage)):
        verify_audit(forged, finished["policy"])
    # the nonce works once
    _load(enc, finished["tokens"])
    with pytest.raises(ReplayedMessage):
        enc.audit(cmd, finished["final"], finished["meta"])


def test_only_the_owner_may_audit_and_the_host_cannot_drop_records(finished):
    enc = finished["enc"]
    _load(enc, finished["tokens"])
    with pytest.raises(Unauthorized):
        enc.audit(_audit_cmd(enc, SigningKey.generate(), b"audit-nonce-0002")[0], finished["final"], finished["meta"])
    _load(enc, finished["tokens"][:-1])  # one record withheld
    with pytest.raises(TamperedMessage):
        enc.audit(_audit_cmd(enc, OWNER, b"audit-nonce-0003")[0], finished["final"], finished["meta"])
    toks = list(finished["tokens"])
    toks[0], toks[1] = toks[1], toks[0]  # reordered
    _load(enc, toks)
    with pytest.raises(TamperedMessage):
        enc.audit(_audit_cmd(enc, OWNER, b"audit-nonce-0004")[0], finished["final"], finished["meta"])
    _load(enc, finished["tokens"])
    with pytest.raises(Unauthorized):  # a command for another run
        enc.audit(_audit_cmd(enc, OWNER, b"audit-nonce-0005", run_id="run-b")[0], finished["final"], finished["meta"])
