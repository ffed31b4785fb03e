"""Authenticated encryption of data at rest under a 32-byte key (model parts, class maps, records).

Trust side: owner (seals a bundle) and enclave (opens it); the host stores only tokens. One call
each way, one exception for every failure (the Fernet habit):

    token = version (1 byte, 0x01) || nonce (12 random bytes) || AES-256-GCM(plaintext) || tag (16)

The version byte is authenticated (it is part of the GCM AAD, before the caller's `aad`), so a
token cannot be reinterpreted under a future format. Callers bind context through `aad` (e.g. the
bundle digest and part name), which is not stored in the token and must be given again to open it.
"""

from __future__ import annotations

from ..errors import TamperedMessage, UserInputError
from . import _hazmat as hz

TOKEN_VERSION = b"\x01"
OVERHEAD = 1 + hz.REST_NONCE_BYTES + hz.N_T
KEY_BYTES = hz.REST_KEY_BYTES


def generate_key() -> bytes:
    """A fresh random 256-bit key from the OS CSPRNG."""
    return hz.random_bytes(KEY_BYTES)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise UserInputError("a sealing key is 32 bytes")
    return bytes(key)


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate `plaintext` (and `aad`) under `key` with a random nonce."""
    key = _check_key(key)
    nonce = hz.random_bytes(hz.REST_NONCE_BYTES)
    return TOKEN_VERSION + nonce + hz.aes_gcm_seal(key, nonce, bytes(plaintext), TOKEN_VERSION + bytes(aad))


def open_sealed(key: bytes, token: bytes, aad: bytes = b"") -> bytes:
    """Inverse of `seal`; `TamperedMessage` if the key, token or aad do not match exactly."""
    key = _check_key(key)
    token = bytes(token)
    if len(token) < OVERHEAD or token[:1] != TOKEN_VERSION:
        raise TamperedMessage("sealed data failed authentication (truncated or unknown format)")
    nonce, ct = token[1 : 1 + hz.REST_NONCE_BYTES], token[1 + hz.REST_NONCE_BYTES:]
    try:
        return hz.aes_gcm_open(key, nonce, ct, TOKEN_VERSION + bytes(aad))
    except hz.AuthenticationFailed:
        raise TamperedMessage("sealed data failed authentication (wrong key, tampered, or bound to other data)") from None
