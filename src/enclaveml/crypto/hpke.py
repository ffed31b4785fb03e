"""Requests encrypted to an attested enclave key, and responses bound to those requests.

Trust side: client (`seal_request`, `RequestContext.open_response`) and enclave (`HpkeKeyPair`,
`open_request`, `ResponseSealer`). Pure functions, no I/O; the host only moves the bytes.

Wire formats (all lengths in bytes; see docs/crypto.md):

    request  = enc (32) || HPKE ciphertext (len(plaintext) + 16)
    response = response_nonce (16) || AES-128-GCM ciphertext (len(plaintext) + 16)

The request is HPKE base mode (RFC 9180) with the pinned suite, sealed once (sequence 0) with the
caller's AAD and `info`. The response follows Oblivious HTTP (RFC 9458 section 4.4): both sides
export `secret = Export("enclaveml/v1 response", 16)` from the request's HPKE context; the enclave
picks a random `response_nonce`, and `key`, `nonce` come from HKDF with `salt = enc ||
response_nonce`. Only the holder of that request's context can open the response, so a response
cannot be swapped onto another request, and a fresh random response key is used every time.

This is the original suite ("x25519-pyhpke", untagged on the wire; still opened for old
clients, and used by CalTrain's uploads and replies); `crypto/suites.py` adds native X25519 (the
default of new requests) and the ML-KEM-768 + X25519 hybrid, tagged on the wire, with the same
response objects (`key_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pyhpke import KEMKey, KEMKeyInterface, PyHPKEError

from ..errors import TamperedMessage, UserInputError
from . import _hazmat as hz

DEFAULT_INFO = b"enclaveml/v1 request"
RESPONSE_LABEL = b"enclaveml/v1 response"
#: max(Nn, Nk) of the suite, as RFC 9458 sizes the response secret and nonce.
RESPONSE_NONCE_BYTES = max(hz.N_K, hz.N_N)

_REQUEST_FAILED = "request failed authentication (wrong enclave key, tampered or truncated)"
_RESPONSE_FAILED = "response failed authentication (tampered, truncated or not for this request)"


class HpkeKeyPair:
    """The enclave's X25519 key pair; the private half never leaves the enclave."""

    __slots__ = ("_sk", "_pk", "_pyca")

    def __init__(self, private_key: KEMKeyInterface, public_key: KEMKeyInterface):
        self._sk = private_key
        self._pk = public_key
        #: The same private key as a `cryptography` object, for the native suites (crypto/suites.py).
        self._pyca = X25519PrivateKey.from_private_bytes(private_key.to_private_bytes())

    @classmethod
    def generate(cls) -> "HpkeKeyPair":
        return cls._from_x25519(X25519PrivateKey.generate())

    @classmethod
    def _from_x25519(cls, sk: X25519PrivateKey) -> "HpkeKeyPair":
        return cls(KEMKey.from_pyca_cryptography_key(sk), KEMKey.from_pyca_cryptography_key(sk.public_key()))

    @classmethod
    def derive(cls, ikm: bytes) -> "HpkeKeyPair":
        """DeriveKeyPair (RFC 9180 section 7.1.3): deterministic; for test vectors and sealed state."""
        kp = hz.SUITE.kem.derive_key_pair(ikm)
        return cls(kp.private_key, kp.public_key)

    @classmethod
    def from_private_bytes(cls, sk: bytes) -> "HpkeKeyPair":
        """Restore a key pair from its 32 raw private bytes (e.g. unsealed enclave state)."""
        if len(sk) != 32:
            raise UserInputError("an X25519 private key is 32 bytes")
        return cls._from_x25519(X25519PrivateKey.from_private_bytes(bytes(sk)))

    def private_bytes(self) -> bytes:
        """Raw private key: only for sealing enclave state; never send it anywhere."""
        return self._sk.to_private_bytes()

    def public_bytes(self) -> bytes:
        """The 32-byte public key that evidence binds and clients encrypt to."""
        return self._pk.to_public_bytes()

    def __repr__(self) -> str:
        return f"HpkeKeyPair(public={self.public_bytes().hex()[:16]}...)"


def _public_key(recipient_public: bytes) -> KEMKeyInterface:
    if not isinstance(recipient_public, (bytes, bytearray)) or len(recipient_public) != hz.N_ENC:
        raise UserInputError("the enclave public key must be 32 bytes (X25519)")
    return hz.SUITE.kem.deserialize_public_key(bytes(recipient_public))


def _response_keys(secret: bytes, enc: bytes, response_nonce: bytes, nk: int = hz.N_K) -> tuple[bytes, bytes]:
    """RFC 9458 section 4.4: salt = enc || response_nonce; key (nk bytes), nonce from HKDF."""
    prk = hz.hkdf_extract(enc + response_nonce, secret)
    return hz.hkdf_expand(prk, b"key", nk), hz.hkdf_expand(prk, b"nonce", hz.N_N)


@dataclass(frozen=True, repr=False)
class RequestContext:
    """What the client keeps after sending a request: the means to open that request's response."""

    enc: bytes
    _secret: bytes = field(repr=False)
    #: Response AEAD key size: 16 (AES-128-GCM), or 32 (AES-256-GCM) for the hybrid suite.
    key_bytes: int = hz.N_K

    def open_response(self, resp: bytes, aad: bytes = b"") -> bytes:
        """Decrypt the enclave's response to *this* request; `TamperedMessage` on any failure."""
        resp = bytes(resp)
        nn = max(self.key_bytes, hz.N_N)
        if len(resp) < nn + hz.N_T:
            raise TamperedMessage(_RESPONSE_FAILED)
        response_nonce, ct = resp[:nn], resp[nn:]
        key, nonce = _response_keys(self._secret, self.enc, response_nonce, self.key_bytes)
        try:
            return hz.aes_gcm_open(key, nonce, ct, aad)
        except hz.AuthenticationFailed:
            raise TamperedMessage(_RESPONSE_FAILED) from None

    def __repr__(self) -> str:
        return f"RequestContext(enc={self.enc.hex()[:16]}...)"


@dataclass(frozen=True, repr=False)
class ResponseSealer:
    """What the enclave keeps after opening a request: the means to answer that request only."""

    enc: bytes
    _secret: bytes = field(repr=False)
    key_bytes: int = hz.N_K

    def seal_response(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt a response with a fresh random nonce (safe to call more than once)."""
        response_nonce = hz.random_bytes(max(self.key_bytes, hz.N_N))
        key, nonce = _response_keys(self._secret, self.enc, response_nonce, self.key_bytes)
        return response_nonce + hz.aes_gcm_seal(key, nonce, bytes(plaintext), aad)

    def __repr__(self) -> str:
        return f"ResponseSealer(enc={self.enc.hex()[:16]}...)"


def seal_request(recipient_public: bytes, plaintext: bytes, aad: bytes = b"",
                 info: bytes = DEFAULT_INFO) -> tuple[bytes, RequestContext]:
    """Client side: encrypt `plaintext` to the attested enclave key.

    Returns `(enc || ciphertext, context)`; keep the context to open the response.
    """
    pk = _public_key(recipient_public)
    try:
        enc, ctx = hz.SUITE.create_sender_context(pk, info=info)
        ct = ctx.seal(bytes(plaintext), aad=aad)
    except (PyHPKEError, ValueError):  # e.g. a low-order public key: no usable shared secret
        raise UserInputError("the enclave public key is not a usable X25519 key") from None
    return enc + ct, RequestContext(enc, ctx.export(RESPONSE_LABEL, hz.N_K))


def open_request(kp: HpkeKeyPair, msg: bytes, aad: bytes = b"",
                 info: bytes = DEFAULT_INFO) -> tuple[bytes, ResponseSealer]:
    """Enclave side: decrypt a request; `TamperedMessage` for every kind of failure.

    Failures are not told apart (wrong key, flipped bit, short message, bad `enc`), so the host
    learns nothing from which one happened.
    """
    msg = bytes(msg)
    if len(msg) < hz.N_ENC + hz.N_T:
        raise TamperedMessage(_REQUEST_FAILED)
    enc, ct = msg[: hz.N_ENC], msg[hz.N_ENC:]
    try:
        ctx = hz.SUITE.create_recipient_context(enc, kp._sk, info=info)
        pt = ctx.open(ct, aad=aad)
    except (PyHPKEError, ValueError):
        raise TamperedMessage(_REQUEST_FAILED) from None
    return pt, ResponseSealer(enc, ctx.export(RESPONSE_LABEL, hz.N_K))
