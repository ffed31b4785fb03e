"""Owner -> enclave key release and owner commands: signatures, binding, tampering, authority."""

from __future__ import annotations

import pytest

from enclaveml.crypto import (HpkeKeyPair, SigningKey, generate_key, open_key_release, open_owner_command,
                              require_owner, seal_key_release, seal_owner_command)
from enclaveml.crypto.hpke import seal_request
from enclaveml.crypto.keyrelease import INFO, SIGNING_LABEL
from enclaveml.errors import TamperedMessage, Unauthorized


@pytest.fixture()
def parties():
    return SigningKey.generate(), HpkeKeyPair.generate(), generate_key(), b"n" * 32


def test_release_round_trip(parties):
    owner, kp, key, nonce = parties
    msg = seal_key_release(owner, kp.public_bytes(), "darknet-prod", key, nonce)
    assert key not in msg and key.hex().encode() not in msg
    rel = open_key_release(kp, msg, expected_nonce=nonce)
    assert rel.owner == owner.public_key()
    assert (rel.model_id, rel.model_key, rel.nonce) == ("darknet-prod", key, nonce)
    assert key.hex() not in repr(rel)


def test_every_byte_flip_fails(parties):
    owner, kp, key, nonce = parties
    msg = seal_key_release(owner, kp.public_bytes(), "m", key, nonce)
    for i in range(0, len(msg)):
        bad = bytearray(msg)
        bad[i] ^= 0x01
        with pytest.raises(TamperedMessage):
            open_key_release(kp, bytes(bad))


def test_wrong_enclave_or_nonce_fails(parties):
    owner, kp, key, nonce = parties
    msg = seal_key_release(owner, kp.public_bytes(), "m", key, nonce)
    with pytest.raises(TamperedMessage):
        open_key_release(HpkeKeyPair.generate(), msg)
    with pytest.raises(TamperedMessage, match="nonce"):
        open_key_release(kp, msg, expected_nonce=b"m" * 32)


def test_forged_signature_inside_valid_hpke_fails(parties):
    """The host can encrypt to the enclave too: a body signed by someone else must not pass as the owner's."""
    owner, kp, key, nonce = parties
    mallory = SigningKey.generate()
    good = seal_key_release(owner, kp.public_bytes(), "m", key, nonce)
    from enclaveml.crypto import open_any
    pt, _ = open_any(kp, good, info=INFO)  # the default (native) suite
    body = pt[96:]
    # owner's public key with mallory's signature over the same body
    forged, _ = seal_request(kp.public_bytes(), owner.public_key().to_bytes() + mallory.sign(SIGNING_LABEL + body) + body,
                             info=INFO)
    with pytest.raises(TamperedMessage, match="signature"):
        open_key_release(kp, forged)
    # a body signed without the domain label
    unlabeled, _ = seal_request(kp.public_bytes(), owner.public_key().to_bytes() + owner.sign(body) + body, info=INFO)
    with pytest.raises(TamperedMessage):
        open_key_release(kp, unlabeled)


def test_release_signed_for_other_enclave_is_refused(parties):
    owner, kp, key, nonce = parties
    other = HpkeKeyPair.generate()
    msg = seal_key_release(owner, other.public_bytes(), "m", key, nonce)
    from enclaveml.crypto import open_any
    pt, _ = open_any(other, msg, info=INFO)
    rewrapped, _ = seal_request(kp.public_bytes(), pt, info=INFO)  # other enclave forwards it
    with pytest.raises(TamperedMessage, match="another enclave"):
        open_key_release(kp, rewrapped)


def test_owner_commands_and_authority(parties):
    owner, kp, _, nonce = parties
    msg = seal_owner_command(owner, kp.public_bytes(), "delete", "m", nonce, {"reason": "retired"})
    cmd = open_owner_command(kp, msg, expected_nonce=nonce)
    assert (cmd.command, cmd.model_id, cmd.args) == ("delete", "m", {"reason": "retired"})
    require_owner(cmd, owner.public_key())
    with pytest.raises(Unauthorized):
        require_owner(cmd, SigningKey.generate().public_key())
    with pytest.raises(TamperedMessage):
        open_key_release(kp, msg)  # a delete command is not a key release


def _signed(owner, kp, body: bytes) -> bytes:
    msg, _ = seal_request(kp.public_bytes(), owner.public_key().to_bytes() + owner.sign(SIGNING_LABEL + body) + body,
                          info=INFO)
    return msg


@pytest.mark.parametrize("body", [
    b'{"v":1,"args":' + b"[" * 5000 + b"]" * 5000 + b"}",  # RecursionError in plain json.loads
    b'{"v":true,"command":"c","model_id":"m","nonce":"00","enclave":"00","args":{}}',  # true is not version 1
    b'{"v":1,"v":1,"command":"c","model_id":"m","nonce":"00","enclave":"00","args":{}}',  # repeated key
    b'{"v":1,"command":"c","model_id":"m","nonce":"00","enclave":"00","args":{"x":NaN}}',
    b'{"v":1,"command":"c","model_id":"m","nonce":"00","enclave":"00","args":{"x":1e999}}',
])
def test_hostile_signed_bodies_are_tampered(parties, body):
    """The signer is whoever the message names, so a signed body is still hostile input."""
    owner, kp, _, _ = parties
    with pytest.raises(TamperedMessage, match="malformed"):
        open_owner_command(kp, _signed(owner, kp, body))
