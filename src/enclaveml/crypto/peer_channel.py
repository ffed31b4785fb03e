"""Enclave-to-enclave keys and counter-nonce AEAD for data-parallel CalTrain (pure functions, no I/O).

Trust side: enclave. Two training enclaves that have verified each other's evidence agree on a
pairwise key by X25519 (each put its ephemeral public key in its report data) and HKDF over the
session id; messages are AES-256-GCM with a *deterministic* nonce built from (purpose, sender,
receiver, step) and an AAD naming the same fields, so every message has one place in the run:
a host that replays an older step, swaps two senders or moves a message from one purpose to
another makes the tag fail. A key is used for one session only (fresh X25519 keys per session),
so a deterministic nonce is never reused under one key as long as (purpose, sender, receiver,
step) are unique per message, which `PeerBox` enforces by construction.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import TamperedMessage, UserInputError
from . import _hazmat as hz

KEY_BYTES = 32
_INFO = b"enclaveml/v1 caltrain-dp-pair\x00"
_AAD = b"enclaveml/v1 caltrain-dp\x00"
_NONCE = struct.Struct(">BHBQ")  # purpose, sender, receiver, step: 12 bytes
BROADCAST = 0xFF
MAX_RANKS = 255


class PeerKeyPair:
    """An ephemeral X25519 key pair of one enclave for one session (never leaves the enclave)."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self._sk = private or X25519PrivateKey.generate()

    def public_bytes(self) -> bytes:
        return self._sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def pair_key(self, peer_public: bytes, session: bytes, low: int, high: int) -> bytes:
        """The key both ends of the pair (ranks `low` < `high`) derive: HKDF(X25519, salt=session)."""
        if len(peer_public) != 32:
            raise TamperedMessage("a peer's X25519 key is 32 bytes")
        try:
            shared = self._sk.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        except ValueError:
            raise TamperedMessage("a peer's X25519 key is invalid") from None
        info = _INFO + struct.pack(">HH", low, high)
        return hz.hkdf_expand(hz.hkdf_extract(bytes(session), shared), info, KEY_BYTES)


def random_key() -> bytes:
    return hz.random_bytes(KEY_BYTES)


class PeerBox:
    """AES-256-GCM under one session key, nonce and AAD from (purpose, sender, receiver, step)."""

    def __init__(self, key: bytes, session: bytes):
        if len(key) != KEY_BYTES:
            raise UserInputError("a peer key is 32 bytes")
        self._key, self.session = bytes(key), bytes(session)

    def _nonce_aad(self, purpose: int, sender: int, receiver: int, step: int, context: bytes) -> tuple[bytes, bytes]:
        if not (0 <= purpose < 256 and 0 <= sender <= MAX_RANKS and 0 <= receiver <= BROADCAST and step >= 0):
            raise UserInputError("peer message fields out of range")
        nonce = _NONCE.pack(purpose, sender, receiver, step)
        return nonce, _AAD + self.session + nonce + bytes(context)

    def seal(self, purpose: int, sender: int, receiver: int, step: int, data: bytes, context: bytes = b"") -> bytes:
        nonce, aad = self._nonce_aad(purpose, sender, receiver, step, context)
        return hz.aes_gcm_seal(self._key, nonce, bytes(data), aad)

    def open(self, purpose: int, sender: int, receiver: int, step: int, token: bytes, context: bytes = b"",
             what: str = "peer message") -> bytes:
        """The plaintext, or TamperedMessage: wrong key, edited bytes, or another step/sender/purpose."""
        nonce, aad = self._nonce_aad(purpose, sender, receiver, step, context)
        try:
            return hz.aes_gcm_open(self._key, nonce, bytes(token), aad)
        except hz.AuthenticationFailed:
            raise TamperedMessage(f"{what} from enclave {sender} for step {step} does not open: tampered, "
                                  "replayed from another step or session, or sent by another enclave") from None
