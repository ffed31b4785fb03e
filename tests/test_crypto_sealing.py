"""AES-256-GCM tokens for data at rest: round trip, tampering, wrong key, AAD binding."""

from __future__ import annotations

import pytest

from enclaveml.crypto import generate_key, open_sealed, seal
from enclaveml.errors import TamperedMessage, UserInputError


def test_round_trip_and_format():
    key = generate_key()
    assert len(key) == 32 and key != generate_key()
    token = seal(key, b"frontnet weights", aad=b"part=frontnet")
    assert token[0] == 1 and len(token) == 1 + 12 + len(b"frontnet weights") + 16
    assert open_sealed(key, token, aad=b"part=frontnet") == b"frontnet weights"
    assert seal(key, b"same") != seal(key, b"same")  # random nonces
    assert open_sealed(key, seal(key, b"")) == b""


def test_every_byte_flip_fails():
    key = generate_key()
    token = seal(key, b"0123456789", aad=b"x")
    for i in range(len(token)):
        for mask in (0x01, 0x80):
            bad = bytearray(token)
            bad[i] ^= mask
            with pytest.raises(TamperedMessage):
                open_sealed(key, bytes(bad), aad=b"x")


def test_wrong_key_aad_truncation_fail():
    key = generate_key()
    token = seal(key, b"classmap", aad=b"bundle-a")
    with pytest.raises(TamperedMessage):
        open_sealed(generate_key(), token, aad=b"bundle-a")
    with pytest.raises(TamperedMessage):
        open_sealed(key, token, aad=b"bundle-b")
    with pytest.raises(TamperedMessage):
        open_sealed(key, token)
    for n in range(len(token)):
        with pytest.raises(TamperedMessage):
            open_sealed(key, token[:n], aad=b"bundle-a")


def test_bad_key_size():
    with pytest.raises(UserInputError):
        seal(b"k" * 16, b"x")
    with pytest.raises(UserInputError):
        open_sealed(b"k" * 31, b"x" * 40)
