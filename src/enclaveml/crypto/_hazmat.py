"""Raw primitives behind the safe recipes: the pinned HPKE suite, HKDF, AES-GCM. Hazardous.

Trust side: all (pure functions, no I/O). Nothing outside `enclaveml.crypto` should import this
module: every function here is easy to misuse (nonce reuse, unauthenticated output, raw keys).
The pinned choices, and why:

- HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM: the suite of
  the RFC's first test vector (A.1) and of Oblivious HTTP deployments; X25519 public keys are
  32 bytes, which keeps evidence report data small. Implemented by `pyhpke`, whose `export` we
  use for the response key (RFC 9458 section 4.4).
- AES-256-GCM with 96-bit random nonces for data at rest (model parts, class maps, CalTrain
  instances): standard, hardware-accelerated, one key per model; random nonces are safe for far
  more messages than one key ever seals here (NIST SP 800-38D: at most 2**32 per key).
- HKDF-SHA256 (RFC 5869) for the response key, exactly as RFC 9458 derives it.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

#: The one HPKE suite enclaveml speaks.
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM)
#: Sizes of that suite (RFC 9180 section 7): encapsulated key, AEAD key, nonce and tag.
N_ENC = 32
N_K = 16
N_N = 12
N_T = 16

#: AES-256-GCM at rest: key and nonce sizes.
REST_KEY_BYTES = 32
REST_NONCE_BYTES = 12


class AuthenticationFailed(Exception):
    """Private signal: an AEAD tag did not verify. Public code turns it into TamperedMessage."""


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 section 2.2)."""
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-256 (RFC 5869 section 2.3)."""
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def aes_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-GCM (key size picks 128 or 256); returns ciphertext || 16-byte tag."""
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of `aes_gcm_seal`; raises `AuthenticationFailed` on any mismatch."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError):
        raise AuthenticationFailed() from None


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
