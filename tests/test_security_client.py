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
