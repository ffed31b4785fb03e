"""HPKE suites a request may name: the classic one (pyhpke, OHTTP export), native X25519, and the
post-quantum ML-KEM-768 + X25519 hybrid. Pure functions, no I/O.

Trust side: client and owner (`seal_with`), enclave (`EnclaveKeys`, `open_any`).

Suites (name, id in the clear; docs/crypto.md "Suites" pins every choice):

    "x25519-pyhpke"    untagged   DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM, pyhpke,
                                  caller's info and AAD, response key exported (the original format;
                                  still opened, for old clients)
    "x25519"           id 1       the same RFC 9180 suite, single-shot in `cryptography` (native;
                                  the default, `DEFAULT`)
    "mlkem768-x25519"  id 2       KEM MLKEM768-X25519 / HKDF-SHA256 / AES-256-GCM, in `cryptography`

A tagged message is `TAG (7) || id (1) || enc || ct`. Native single-shot HPKE has no AAD and no
exporter, so both are replaced:

    info      = "enclaveml/v3 request\\0" || id || SHA-256(u32 len(info) || info || aad)
    plaintext = response_key (16; 32 for the hybrid suite) || caller's plaintext

and the response is the OHTTP construction with `secret = response_key` (so `RequestContext` and
`ResponseSealer` serve every suite). The id is bound twice: in `info` (any other id, or no tag,
derives other keys: a rewritten id fails authentication, it never selects a weaker suite) and by
the KEM itself (an X25519 `enc` does not decapsulate under the hybrid key, nor the reverse).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hpke as _hpke
from cryptography.hazmat.primitives.asymmetric import mlkem as _mlkem
from cryptography.hazmat.primitives.asymmetric import x25519 as _x25519

from ..errors import PolicyViolation, TamperedMessage, UserInputError
from . import _hazmat as hz
from .hpke import (DEFAULT_INFO, HpkeKeyPair, RequestContext, ResponseSealer, open_request, seal_request)

LEGACY = "x25519-pyhpke"
X25519 = "x25519"
MLKEM768_X25519 = "mlkem768-x25519"
#: Every suite, weakest first; the enclave accepts all of them unless configured otherwise.
SUITES = (LEGACY, X25519, MLKEM768_X25519)
#: The suite of new requests, owner commands and key releases when the policy names none: the
#: native one (the same RFC 9180 suite as LEGACY, less CPU). LEGACY stays accepted for old clients.
DEFAULT = X25519
#: Suites whose key is post-quantum (the hybrid: secure while either half is).
POST_QUANTUM = frozenset({MLKEM768_X25519})
TAG = b"\x00EMLv3\x00"
_IDS = {X25519: 1, MLKEM768_X25519: 2}
_BY_ID = {v: k for k, v in _IDS.items()}
INFO_LABEL = b"enclaveml/v3 request\x00"

_NATIVE = {
    X25519: _hpke.Suite(_hpke.KEM.X25519, _hpke.KDF.HKDF_SHA256, _hpke.AEAD.AES_128_GCM),
    MLKEM768_X25519: _hpke.Suite(_hpke.KEM.MLKEM768_X25519, _hpke.KDF.HKDF_SHA256, _hpke.AEAD.AES_256_GCM),
}
_ENC = {X25519: 32, MLKEM768_X25519: _hpke.KEM.MLKEM768_X25519.enc_length()}
#: Response key carried in the sealed plaintext: the request AEAD's key size.
RESPONSE_KEY_BYTES = {X25519: 16, MLKEM768_X25519: 32}
MLKEM768_PUBLIC_BYTES = 1184
PQ_PUBLIC_BYTES = MLKEM768_PUBLIC_BYTES + 32
_U32 = struct.Struct(">I")
_FAILED = "request failed authentication (wrong enclave key, tampered or truncated)"


def check_suite(name: str) -> str:
    if name not in SUITES:
        raise UserInputError(f"unknown HPKE suite {str(name)[:40]!r} (known: {', '.join(SUITES)})")
    return name


def _info(suite: str, info: bytes, aad: bytes) -> bytes:
    bound = hashlib.sha256(_U32.pack(len(info)) + bytes(info) + bytes(aad)).digest()
    return INFO_LABEL + bytes([_IDS[suite]]) + bound


class PqKeyPair:
    """The enclave's ML-KEM-768 + X25519 hybrid key pair (its own X25519 half, not the classic key)."""

    __slots__ = ("_mlkem", "_x", "_sk", "_pub")

    def __init__(self, mlkem_sk: "_mlkem.MLKEM768PrivateKey", x_sk: "_x25519.X25519PrivateKey"):
        self._mlkem, self._x = mlkem_sk, x_sk
        self._sk = _hpke.MLKEM768X25519PrivateKey(mlkem_sk, x_sk)
        self._pub = mlkem_sk.public_key().public_bytes_raw() + x_sk.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> "PqKeyPair":
        return cls(_mlkem.MLKEM768PrivateKey.generate(), _x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> "PqKeyPair":
        """From `private_bytes()`: the ML-KEM seed (64) || the X25519 private key (32)."""
        if len(raw) != 96:
            raise UserInputError("a hybrid private key is 96 bytes (ML-KEM-768 seed 64 || X25519 32)")
        return cls(_mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes(raw[:64])),
                   _x25519.X25519PrivateKey.from_private_bytes(bytes(raw[64:])))

    def private_bytes(self) -> bytes:
        """Only for sealing enclave state; never send it anywhere."""
        return self._mlkem.private_bytes_raw() + self._x.private_bytes_raw()

    def public_bytes(self) -> bytes:
        """ML-KEM-768 encapsulation key (1184) || X25519 public key (32): what evidence binds."""
        return self._pub

    def __repr__(self) -> str:
        return f"PqKeyPair(public={self._pub[-32:].hex()[:16]}...)"


def _pq_public(raw: bytes) -> "_hpke.MLKEM768X25519PublicKey":
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != PQ_PUBLIC_BYTES:
        raise UserInputError(f"a hybrid public key is {PQ_PUBLIC_BYTES} bytes (ML-KEM-768 || X25519)")
    return _parse_pq(bytes(raw))


# A client seals every request to the same attested key: parse it once (42 us for the hybrid key,
# 5 us for X25519), not per request. Public keys only; a refused key raises and is not cached.
@functools.lru_cache(maxsize=16)
def _parse_x25519(raw: bytes) -> "_x25519.X25519PublicKey":
    return _x25519.X25519PublicKey.from_public_bytes(raw)


@functools.lru_cache(maxsize=16)
def _parse_pq(raw: bytes) -> "_hpke.MLKEM768X25519PublicKey":
    try:
        return _hpke.MLKEM768X25519PublicKey(_mlkem.MLKEM768PublicKey.from_public_bytes(bytes(raw[:MLKEM768_PUBLIC_BYTES])),
                                             _x25519.X25519PublicKey.from_public_bytes(bytes(raw[MLKEM768_PUBLIC_BYTES:])))
    except ValueError:
        raise UserInputError("the hybrid public key is not a valid ML-KEM-768 + X25519 key") from None


@dataclass(frozen=True)
class EnclaveKeys:
    """The enclave's request keys: the classic X25519 pair (legacy and native X25519 suites) and,
    when it offers the hybrid suite, the hybrid pair; `accepted` lists the suites it opens."""

    classic: HpkeKeyPair
    pq: "PqKeyPair | None" = None
    accepted: frozenset = frozenset(SUITES)

    @classmethod
    def generate(cls, suites: "tuple[str, ...] | list[str]" = SUITES) -> "EnclaveKeys":
        accepted = frozenset(check_suite(s) for s in suites)
        return cls(HpkeKeyPair.generate(), PqKeyPair.generate() if MLKEM768_X25519 in accepted else None, accepted)


def seal_with(suite: str, recipient_public: bytes, plaintext: bytes, aad: bytes = b"",
              info: bytes = DEFAULT_INFO) -> tuple[bytes, RequestContext]:
    """Client side: `seal_request` in the named suite -> (message, context to open the response).
    `recipient_public` is the classic X25519 key, or for the hybrid suite the hybrid key."""
    check_suite(suite)
    if suite == LEGACY:
        return seal_request(recipient_public, plaintext, aad, info)
    if suite == X25519:
        if not isinstance(recipient_public, (bytes, bytearray)) or len(recipient_public) != 32:
            raise UserInputError("the enclave public key must be 32 bytes (X25519)")
        pk = _parse_x25519(bytes(recipient_public))
    else:
        pk = _pq_public(recipient_public)
    response_key = hz.random_bytes(RESPONSE_KEY_BYTES[suite])
    try:
        out = _NATIVE[suite].encrypt(response_key + bytes(plaintext), pk, info=_info(suite, info, aad))
    except ValueError:  # e.g. a low-order X25519 key: no usable shared secret
        raise UserInputError("the enclave public key is not usable for this suite") from None
    enc = out[:_ENC[suite]]
    return TAG + bytes([_IDS[suite]]) + out, RequestContext(enc, response_key, len(response_key))


def suite_of(msg: bytes) -> str:
    """The suite a message names in the clear (a claim, proven only when it opens)."""
    msg = memoryview(msg)
    if len(msg) > len(TAG) and msg[:len(TAG)] == TAG:
        suite = _BY_ID.get(msg[len(TAG)])
        if suite is None:
            raise TamperedMessage("request names an unknown HPKE suite")
        return suite
    return LEGACY


def open_any(keys: "EnclaveKeys | HpkeKeyPair", msg: bytes, aad: bytes = b"",
             info: bytes = DEFAULT_INFO) -> tuple[bytes, ResponseSealer]:
    """Enclave side: open a message of any accepted suite -> (plaintext, its response sealer).

    `TamperedMessage` for every authentication failure (whichever suite it claimed);
    `PolicyViolation` for a suite this enclave does not accept (said before anything is opened).
    """
    if isinstance(keys, HpkeKeyPair):
        keys = EnclaveKeys(keys, None, frozenset({LEGACY, X25519}))
    suite = suite_of(msg)
    if suite not in keys.accepted:
        raise PolicyViolation(f"this enclave does not accept HPKE suite {suite!r} "
                              f"(it accepts {', '.join(s for s in SUITES if s in keys.accepted)})")
    if suite == LEGACY:
        return open_request(keys.classic, msg, aad, info)
    body = bytes(memoryview(msg)[len(TAG) + 1:])
    nk = RESPONSE_KEY_BYTES[suite]
    sk = keys.classic._pyca if suite == X25519 else (keys.pq._sk if keys.pq else None)
    if sk is None or len(body) < _ENC[suite] + hz.N_T + nk:
        raise TamperedMessage(_FAILED)
    try:
        pt = _NATIVE[suite].decrypt(body, sk, info=_info(suite, info, aad))
    except Exception:  # InvalidTag, or a malformed enc: told apart to nobody
        raise TamperedMessage(_FAILED) from None
    if len(pt) < nk:
        raise TamperedMessage(_FAILED)
    return pt[nk:], ResponseSealer(body[:_ENC[suite]], pt[:nk], nk)
