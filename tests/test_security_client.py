"""Security review (engineer F): the client SDK facing a hostile server.

The HTTP transport is replaced by `httpx.MockTransport` (the network, not the crypto, is faked):
the "server" answers whatever a malicious host would. The client must fail with an
`enclaveml.errors` class (the CLI turns those into one line), never trust an unverified key, and
never leak a traceback type the caller does not expect.
"""

from __future__ import annotations

import httpx
import pytest

from enclaveml import errors as E
from enclaveml.client import EnclaveClient
from enclaveml.crypto import HpkeKeyPair
from enclaveml.tee import Policy

POLICY = Policy(allowed_backends=["sim"], measurements={"sim": ["00" * 32]}, sim_platform_keys=["11" * 32])


def _client(status: int, content: bytes, seen: list | None = None) -> EnclaveClient:
    def handler(req: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(req)
        return httpx.Response(status, content=content)

    return EnclaveClient("http://host.invalid", POLICY, http=httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("content", [b"[1,2]", b"{}", b'{"public_key": "00", "evidence": 5}',
                                     b'{"public_key": 5, "evidence": {}}', b'{"public_key": "zz", "evidence": {}}'])
def test_malformed_evidence_answers_are_evidence_rejected(content):
    with pytest.raises(E.EvidenceRejected):
        _client(200, content).attest()


def test_a_key_without_matching_evidence_is_never_used():
    kp = HpkeKeyPair.generate()
    body = ('{"public_key": "%s", "evidence": {"backend": "sim", "quote": "e30="}}' % kp.public_bytes().hex()).encode()
    seen: list = []
    c = _client(200, body, seen)
    with pytest.raises(E.TrustError):
        c.infer([b"\x89PNG secret image"], model="m")
    assert all(r.url.path == "/v1/evidence" for r in seen), "the client sent something before attestation passed"
    assert all(b"secret image" not in (r.content or b"") for r in seen)


@pytest.mark.parametrize("content", [b"not json", b"[" * 100_000])
def test_non_json_evidence_answer_is_evidence_rejected(content):
    with pytest.raises(E.EvidenceRejected):
        _client(200, content).attest()


@pytest.mark.parametrize("content", [b"[1,2]", b'"x"'])
def test_error_answers_that_are_not_objects_become_enclaveml_errors(content):
    with pytest.raises(E.EnclaveMLError):
        _client(500, content).attest()


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "BaseException", "RemoteError", "__class__"])
def test_server_cannot_make_the_client_raise_arbitrary_exception_classes(kind):
    body = ('{"error": "%s", "message": "boom"}' % kind).encode()
    with pytest.raises(E.EnclaveMLError) as ei:
        _client(400, body).attest()
    assert type(ei.value).__module__ == "enclaveml.errors"


def test_the_cached_target_follows_every_change_of_the_policys_pin():
    """The client builds a model's request target once; a pin that changes (a new policy, a pin
    added by `deploy`, or the policy's table edited in place) is used from the next request on."""
    from dataclasses import replace

    from enclaveml.protocol import ModelPin

    owner, other = "ab" * 32, "cd" * 32
    c = _client(200, b"")
    c.policy = POLICY.with_pin("m", ModelPin(owner, (), 3))
    t = c.target("m")
    assert c.target("m") is t and t.pin.min_k == 3
    c.policy = c.policy.with_pin("m", ModelPin(owner, ("ee" * 32,), 3))
    assert c.target("m").pin.bundle_ids == ("ee" * 32,)
    c.policy.models["m"]["min_k"] = 5  # edited in place
    assert c.target("m").pin.min_k == 5
    c.policy = replace(c.policy, models={"m": {"owner": other, "bundle_ids": [], "min_k": 1}})
    assert c.target("m").ref.owner == other
    c.policy = replace(c.policy, models={})
    with pytest.raises(E.PolicyViolation):
        c.target("m")
    with pytest.raises(E.UserInputError):
        c.infer_each([b"x"], model=["not", "a", "name"])  # type: ignore[arg-type]
