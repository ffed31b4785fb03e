"""Ed25519 signing keys (owners, CalTrain participants) and the public keys that verify them.

Trust side: owner and participants sign; the enclave and anyone else verify. Ed25519 (RFC 8032):
deterministic signatures (no per-signature randomness to get wrong), 32-byte public keys, 64-byte
signatures. `sign` signs the bytes it is given; the recipes in this package prefix a
domain-separation label so that a signature made for one purpose never verifies for another.
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import TamperedMessage, UserInputError
from . import _hazmat as hz

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class VerifyKey:
    """An Ed25519 public key: who signed a bundle, a key release or a training instance."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Ed25519PublicKey):
        self._key = key
        self._raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def from_bytes(cls, b: bytes) -> "VerifyKey":
        if not isinstance(b, (bytes, bytearray)) or len(b) != PUBLIC_KEY_BYTES:
            raise UserInputError("an Ed25519 public key is 32 bytes")
        try:
            return cls(Ed25519PublicKey.from_public_bytes(bytes(b)))
        except ValueError:
            raise UserInputError("not a valid Ed25519 public key") from None

    def to_bytes(self) -> bytes:
        return self._raw

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if `signature` is this key's over `data`, else raise `TamperedMessage`."""
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
            raise TamperedMessage("signature is malformed (an Ed25519 signature is 64 bytes)")
        try:
            self._key.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            raise TamperedMessage(f"signature does not verify under key {self.fingerprint()[:16]}") from None

    def fingerprint(self) -> str:
        """Hex SHA-256 of the raw 32-byte key: a short, printable identity."""
        return hz.sha256(self._raw).hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.fingerprint()[:16]})"


class SigningKey:
    """An Ed25519 private key. Stored as PEM PKCS#8 (`to_pem`), mode 0600, on its owner's machine
    only: key files are read and written at the edge (`enclaveml.keyfiles`), never in crypto/."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def public_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    def to_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @classmethod
    def from_pem(cls, pem: bytes) -> "SigningKey":
        try:
            key = serialization.load_pem_private_key(bytes(pem), password=None)
        except (ValueError, TypeError):
            raise UserInputError("not an unencrypted PEM PKCS#8 private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise UserInputError("the private key is not an Ed25519 key")
        return cls(key)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public_key().fingerprint()[:16]})"
