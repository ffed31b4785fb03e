"""A flood of anonymous evidence-nonce requests does not evict an owner's pending nonce (F-31).

The attacker can GET /v1/evidence as often as it likes. The owner attests, the attacker asks for
more nonces than the enclave ever kept (MAX_NONCES), and the owner's key release, bound to its
nonce, still deploys; that nonce then cannot be used again, nor can one the enclave never issued
or one past its time. Real server and worker for the flood; the pure issuer for the clock.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from enclaveml import errors as E
from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey, seal_key_release
from enclaveml.crypto.nonces import NonceIssuer
from enclaveml.models import zoo
from enclaveml.models.bundle import bundle_files, make_bundle
from enclaveml.protocol import deploy, infer as protocol
from enclaveml.serve.enclave import MAX_NONCES
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package
from enclaveml.protocol.deploy import sign_upload


def _upload(url: str, owner: SigningKey, att, model_id: str, key: bytes, files: dict) -> httpx.Response:
    release = seal_key_release(owner, att.public_key, model_id, key, att.nonce)
    body = deploy.pack_parts({deploy.KEY_RELEASE: release, **files})
    return httpx.post(f"{url}/v1/models/{model_id}", content=sign_upload(owner, model_id, body, time.time()) + body,
                      timeout=120)


def test_evidence_flood_does_not_evict_the_owners_nonce(tmp_path):
    torch.set_num_threads(1)
    home, pkg = tmp_path / "home", snapshot_package(tmp_path / "pkg")
    owner = SigningKey.generate()
    model, entry = zoo.load("darknet", pretrained=False), zoo.entry("darknet")
    _, key = make_bundle(model, 3, tmp_path / "b", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    files = bundle_files(tmp_path / "b")
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", env=server_env(home, pkg)) as srv:
        with EnclaveClient(srv.url, local_sim_policy(home, pkg)) as c:
            att = c.attest()  # the owner's pending nonce
            later = c.attest()

            def flood(i: int) -> None:
                with httpx.Client(timeout=60) as h:
                    for _ in range((MAX_NONCES + 200) // 8):
                        assert h.get(srv.url + "/v1/evidence", params={"nonce": os.urandom(16).hex()}).status_code == 200

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(flood, range(8)))
            r = _upload(srv.url, owner, att, "m", key, files)
            assert r.status_code == 200, r.text
            r = _upload(srv.url, owner, att, "m", key, files)  # the same nonce again
            assert r.status_code == 409 and r.json()["error"] == "ReplayedMessage"
            forged = type(att)(att.public_key, att.nonce[:-1] + bytes([att.nonce[-1] ^ 1]), att.claims, att.at)
            r = _upload(srv.url, owner, forged, "m", key, files)  # a nonce the enclave never issued
            assert r.status_code == 409 and r.json()["error"] == "ReplayedMessage"
            assert _upload(srv.url, owner, later, "m", key, files).status_code == 200


def test_issued_nonces_expire_and_are_used_once():
    issuer = NonceIssuer(os.urandom(32), ttl_s=600.0, max_used=2)
    a, b, c = (issuer.issue(os.urandom(16), 1000.0) for _ in range(3))
    assert a[:16] != b[:16] and len(a) == 16 + 24
    issuer.consume(a, 1001.0)
    with pytest.raises(E.ReplayedMessage, match="used before"):
        issuer.consume(a, 1002.0)
    with pytest.raises(E.ReplayedMessage, match="expired"):
        issuer.consume(b, 1000.0 + 601.0)
    with pytest.raises(E.ReplayedMessage, match="not .* issued"):
        NonceIssuer(os.urandom(32)).consume(b, 1001.0)  # another enclave's key (e.g. before a restart)
    with pytest.raises(E.ReplayedMessage):
        issuer.consume(b"x" * 40, 1001.0)
    issuer.consume(b, 1003.0)
    with pytest.raises(E.ReplayedMessage, match="too many"):  # full: refuse, never evict
        issuer.consume(c, 1004.0)
    later = issuer.issue(os.urandom(16), 1700.0)  # a and b have expired by then: room again
    issuer.consume(later, 1700.5)
    with pytest.raises(E.DataError):
        issuer.issue(b"short", 1.0)
