"""The typed messages of `enclaveml.protocol`, without sockets: golden bytes (the wire formats
did not change when they moved out of serve/), round trips, and hostile input raising the one
error each side expects."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclaveml import errors as E
from enclaveml.crypto import SigningKey
from enclaveml.protocol import caltrain as C
from enclaveml.protocol import deploy as D
from enclaveml.protocol import infer as P
from enclaveml.protocol.attest import EvidenceAnswer, check_nonce_hex
from enclaveml.protocol.identity import ModelIdentity

KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
IDENT = ModelIdentity("ab" * 32, "m", "cd" * 8, 3, 0)

#: SHA-256 of each message as `serve/protocol.py` and `serve/upload.py` produced it before the move
#: (commit 4844c3f, same inputs): the formats are byte-for-byte the same.
GOLDEN = {
    "payload_batch": "a69ecea84ac73c21bc87f3ded9f11be2a3c0b50a79fa17fcfdb9664197a79497",
    "payload_one_unpadded": "9328d962fa904bc0a2dd9031f1c0ff5529f76805f42181e3cf5dee58ce984c2a",
    "parts": "e9ab388e731afc88c1862789e90edefb5843180fc240fc3a2b4464f4615c90a0",
    "upload": "e1518ad13c888bea29d3e14b852e69ef7f4bf51278599758ebaee89f61dd2a70",
    "result": "d8ac6ce7112a2737f3705c9c1b2eeed999f132e3203e4eb3c7e8d93e82860a6e",
    "error": "5fd8f6f2697026baf2eaa0ea868121b3af813fdcaf6fef1eb98f5f3ad169c05b",
}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_wire_bytes_are_unchanged_by_the_move():
    got = {
        "payload_batch": P.InferRequest((b"abc", b"de"), 3, True).encode(pad=True),
        "payload_one_unpadded": P.InferRequest((b"x",), 5, False).encode(pad=False),
        "parts": D.pack_parts({"key_release": b"K" * 3, "manifest.json": b"M" * 5}),
        "upload": D.sign_upload(KEY, "m", b"body", 1000.0),
        "result": P.encode_result(IDENT, [0.1, 0.7, 0.2], ["a", "b", "c"], 2, [1.0, 2.0, -3.5]),
        "error": P.encode_error_item(IDENT, ["a", "b", "c"], 2, False),
    }
    assert {k: _sha(v) for k, v in got.items()} == GOLDEN
    # the typed request is the function codec, and a one-image list is the one image
    assert P.InferRequest((b"x",), 5).encode(pad=False) == P.encode_payload(b"x", 5, pad=False)


def test_infer_request_round_trip_and_hostile_payloads():
    req = P.InferRequest((b"\xff\xd8one", b"", b"three"), top_k=7, logits=True)
    assert P.InferRequest.decode(req.encode()) == req
    assert P.InferRequest.decode(req.encode(pad=False)) == req
    raw = req.encode()
    with pytest.raises(E.DataError):
        P.InferRequest.decode(raw[:-1] + b"\x01")  # padding must be zeros
    with pytest.raises(E.TamperedMessage):
        P.InferRequest.decode(b"\x00")
    with pytest.raises(E.UserInputError):
        P.InferRequest((b"x",), top_k=0).encode()


def test_infer_result_is_typed_from_the_sealed_item():
    item = P.encode_result(IDENT, [0.1, 0.7, 0.2], ["a", "b", "c"], 2, [1.0, 2.0, -3.5])
    res = P.InferResult.decode(item)
    assert res.identity == IDENT and [p.label for p in res.top] == ["b", "c"] and res.logits == (1.0, 2.0, -3.5)
    assert res.to_dict() == P.decode_result(item)  # the dict the SDK returns
    with pytest.raises(E.TamperedMessage):
        P.InferResult.decode(P.encode_error_item(IDENT, ["a", "b", "c"], 2, False))
    with pytest.raises(E.TamperedMessage):
        P.InferResult.from_dict({**P.decode_result(item), "logits": ["x"]})


def test_upload_is_signed_header_then_parts():
    files = {"manifest.json": b"{}", "backnet.safetensors": b"B" * 10}
    up = D.encode_upload(KEY, "m", b"release", files, 1000.0)
    n = D.header_length(up[:D.PREFIX_BYTES])
    h = D.parse_upload_header(up[D.PREFIX_BYTES:D.PREFIX_BYTES + n])
    body = up[D.PREFIX_BYTES + n:]
    assert h.size == len(body) and h.sha256 == hashlib.sha256(body).digest() and h.owner == KEY.public_key()
    assert D.unpack_parts(body, {D.KEY_RELEASE, *files}) == {D.KEY_RELEASE: b"release", **files}


def test_deploy_answer_round_trip_and_malformed():
    a = D.DeployAnswer("ab" * 32 + "/m", "m", "ab" * 32, "cd" * 8, 3, 0, False)
    assert list(a.to_dict()) == ["model", "name", "owner", "bundle_id", "k", "head", "replaced"]
    assert D.DeployAnswer.from_dict(a.to_dict()) == a
    for bad in (None, [], {"model": "x"}, {**a.to_dict(), "k": "3"}):
        with pytest.raises(E.TamperedMessage):
            D.DeployAnswer.from_dict(bad)


def test_evidence_answer_round_trip_and_malformed():
    a = EvidenceAnswer({"backend": "sim", "quote": ""}, b"\x01" * 32, b"\x02" * 40, b"\x03" * 32)
    assert EvidenceAnswer.from_dict(a.to_dict()) == a
    assert "plan_hash" not in EvidenceAnswer(a.evidence, a.public_key, a.nonce).to_dict()
    for bad in (None, {}, {**a.to_dict(), "public_key": "zz"}, {**a.to_dict(), "public_key": "00" * 31},
                {**a.to_dict(), "evidence": "x"}, {**a.to_dict(), "plan_hash": 5}):
        with pytest.raises(E.EvidenceRejected):
            EvidenceAnswer.from_dict(bad)
    assert check_nonce_hex("00" * 8) == "00" * 8
    for bad in ("", "00" * 7, "00" * 65):
        with pytest.raises(E.DataError):
            check_nonce_hex(bad)


def test_caltrain_envelopes_match_the_old_json_and_refuse_bad_shapes():
    ups = (b"u1", b"u2")
    assert C.ContributeRequest(ups).to_json() == {"uploads": [base64.b64encode(u).decode() for u in ups]}
    assert C.ContributeRequest.from_json(C.ContributeRequest(ups).to_json()) == C.ContributeRequest(ups)
    cmd = C.RunCommand("run", b"cmd", 7)
    assert cmd.to_json() == {"run_id": "run", "command": base64.b64encode(b"cmd").decode(), "checkpoint_every": 7}
    assert C.RunCommand.from_json(cmd.to_json(), start=True) == cmd
    assert C.RunCommand.from_json({"run_id": "r", "command": "AA=="}, start=True).checkpoint_every == 50
    assert "checkpoint_every" not in C.RunCommand("r", b"x").to_json()
    for bad in (None, [], {"uploads": "x"}, {"uploads": ["!!"]}, {"uploads": ["AA=="] * (C.MAX_UPLOADS_PER_REQUEST + 1)}):
        with pytest.raises(E.UserInputError):
            C.ContributeRequest.from_json(bad)
    for bad in (None, {"command": "!"}, {"run_id": "r", "command": "AA==", "checkpoint_every": "x"}):
        with pytest.raises(E.UserInputError):
            C.RunCommand.from_json(bad, start=True)
    results = [C.ContributeResult("accepted", participant="p"), C.ContributeResult("rejected", error="DataError", reason="r")]
    body = C.encode_contribute_answer(results)
    assert body == {"results": [{"status": "accepted", "participant": "p"},
                                {"status": "rejected", "error": "DataError", "reason": "r"}]}
    assert C.decode_contribute_answer(body, 2) == results
    for bad, n in ((body, 3), ({"results": [1, 2]}, 2), ({}, 0), ({"results": [{"status": 5}]}, 1)):
        with pytest.raises(E.TamperedMessage):
            C.decode_contribute_answer(bad, n)
    assert C.decode_sealed_answer("release", C.encode_sealed_answer("release", b"\x00sealed")) == b"\x00sealed"
    for bad in ({}, {"release": "!!"}, {"audit": "AA=="}, None):
        with pytest.raises(E.TamperedMessage):
            C.decode_sealed_answer("release", bad)


def test_results_check_each_distinct_identity_once_and_every_different_one():
    """`decode_results` parses and checks an identity once per distinct set of fields (a response's
    items repeat it): an item whose fields differ, even only in a number's JSON type, is still
    checked, and a cache a caller keeps across responses changes no outcome."""
    import json

    from enclaveml.protocol.identity import ModelPin, ModelRef, Target

    labels = ["a", "b", "c"]
    size = P.result_size(IDENT, labels, 1, False)

    def item(**change):
        d = json.loads(P.encode_result(IDENT, [0.1, 0.7, 0.2], labels, 1).rstrip(b"\x00"))
        d.update(change)
        raw = json.dumps(d).encode()
        return raw + bytes(size - len(raw))

    target = Target(ModelRef(IDENT.owner, "m"), ModelPin(IDENT.owner, (), 3))
    cache: dict = {}
    good = item()
    for checked in (None, cache, cache):  # the second use of `cache` starts with its entry
        assert len(P.decode_results(good * 3, 3, expected=target, checked=checked)) == 3
    assert len(cache) == 1
    for bad, err in ((item(k=2), E.PolicyViolation), (item(owner="ef" * 32), E.PolicyViolation),
                     (item(k=3.0), E.TamperedMessage), (item(k=True), E.TamperedMessage),
                     (item(head=[0]), E.TamperedMessage), (item(model="other"), E.PolicyViolation)):
        for checked in (None, cache):
            with pytest.raises(err):
                P.decode_results(good + bad + good, 3, expected=target, checked=checked)
    assert len(cache) == 1  # nothing refused was remembered


def _result_by_json(identity, probs, labels, top_k, logits=None) -> bytes:
    """The result item as `encode_result` built it before its parts were cached: a dict through
    the JSON encoder, padded (the reference the cached encoder must match byte for byte)."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[: min(top_k, len(probs))]
    res = {**P._ident(identity), "top": [{"index": i, "label": labels[i], "score": float(probs[i])} for i in order]}
    if logits is not None:
        res["logits"] = [float(v) for v in logits]
    raw = P._json(res).encode()
    return raw + bytes(P.result_size(identity, labels, top_k, logits is not None) - len(raw))


def test_result_items_are_the_json_encoders_bytes():
    import random

    rng = random.Random(7)
    odd = ['q"uote', "back\\slash", "ünï\u2028cødé", "tab\tnl\n", "\x00ctl", "", "a" * 64, "😀"]
    for case in range(300):
        n = rng.randint(1, 12)
        labels = [rng.choice(odd + [f"c{i}"]) + str(i) for i in range(n)]
        ident = ModelIdentity("ab" * 32, rng.choice(["m", "darknet", "ñ-1"]), "cd" * 8, rng.randint(0, 30), rng.randint(0, 3))
        raw = [rng.choice([0.0, 1.0, 1e-300, 5e-324, 0.1, rng.random(), -rng.random() * 1e6]) for _ in range(n)]
        if case % 5 == 0:
            raw[rng.randrange(n)] = raw[0]  # ties: the lower index first
        total = sum(abs(v) for v in raw) or 1.0
        probs = [abs(v) / total for v in raw]
        top_k = rng.randint(0, n + 2)
        logits = raw if case % 2 else None
        assert P.encode_result(ident, probs, labels, top_k, logits) == _result_by_json(ident, probs, labels, top_k, logits)
    for bad in (float("nan"), float("inf"), -float("inf")):  # refused as the JSON encoder refuses them
        with pytest.raises(ValueError):
            P.encode_result(IDENT, [0.5, bad], ["a", "b"], 2)
        with pytest.raises(ValueError):
            P.encode_result(IDENT, [0.5, 0.5], ["a", "b"], 1, [1.0, bad])
        with pytest.raises(ValueError):
            _result_by_json(IDENT, [0.5, 0.5], ["a", "b"], 1, [1.0, bad])


def test_a_redeployed_model_never_answers_with_the_old_deployments_cached_parts():
    """The host redeploys the same name (a new bundle, or the same bundle relabelled): every answer
    names the deployment that computed it and its labels, never the parts cached for the old one."""
    old = ModelIdentity("ab" * 32, "m", "cd" * 8, 3, 0)
    new = ModelIdentity("ab" * 32, "m", "ef" * 8, 3, 0)
    probs = [0.7, 0.2, 0.1]
    first = P.decode_result(P.encode_result(old, probs, ["cat", "dog", "eel"], 3))
    assert first["bundle_id"] == "cd" * 8 and [t["label"] for t in first["top"]] == ["cat", "dog", "eel"]
    again = P.decode_result(P.encode_result(new, probs, ["cat", "dog", "eel"], 3))
    assert again["bundle_id"] == "ef" * 8
    relabelled = P.decode_result(P.encode_result(old, probs, ["ant", "bee", "cow"], 3))
    assert relabelled["bundle_id"] == "cd" * 8 and [t["label"] for t in relabelled["top"]] == ["ant", "bee", "cow"]
