"""Ed25519 signing keys: sign/verify, tampering, key files with mode 0600."""

from __future__ import annotations

import stat

import pytest

from enclaveml import keyfiles
from enclaveml.crypto import SigningKey, VerifyKey
from enclaveml.errors import TamperedMessage, UserInputError


def test_sign_verify_round_trip():
    sk = SigningKey.generate()
    sig = sk.sign(b"bundle manifest")
    assert len(sig) == 64
    vk = sk.public_key()
    vk.verify(sig, b"bundle manifest")
    assert VerifyKey.from_bytes(vk.to_bytes()) == vk
    assert len(vk.to_bytes()) == 32
    assert len(vk.fingerprint()) == 64 and int(vk.fingerprint(), 16) >= 0


def test_every_signature_byte_flip_and_other_data_fail():
    sk = SigningKey.generate()
    sig = sk.sign(b"data")
    for i in range(len(sig)):
        bad = bytearray(sig)
        bad[i] ^= 0x01
        with pytest.raises(TamperedMessage):
            sk.public_key().verify(bytes(bad), b"data")
    with pytest.raises(TamperedMessage):
        sk.public_key().verify(sig, b"date")
    with pytest.raises(TamperedMessage):
        SigningKey.generate().public_key().verify(sig, b"data")
    with pytest.raises(TamperedMessage):
        sk.public_key().verify(sig[:63], b"data")


def test_save_load_mode_0600(tmp_path):
    sk = SigningKey.generate()
    path = tmp_path / "keys" / "owner.key"
    keyfiles.save_signing_key(sk, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = keyfiles.load_signing_key(path)
    assert again.public_key() == sk.public_key()
    again.public_key().verify(sk.sign(b"m"), b"m")
    # an existing world-readable file is tightened when overwritten
    path.chmod(0o644)
    keyfiles.save_signing_key(sk, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_or_create_is_stable(tmp_path):
    path = tmp_path / "owner.key"
    a = keyfiles.load_or_create_signing_key(path)
    b = keyfiles.load_or_create_signing_key(path)
    assert a.public_key() == b.public_key()


def test_bad_key_files_and_bytes(tmp_path):
    with pytest.raises(UserInputError):
        keyfiles.load_signing_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    with pytest.raises(UserInputError):
        keyfiles.load_signing_key(junk)
    with pytest.raises(UserInputError):
        VerifyKey.from_bytes(b"\x00" * 31)
