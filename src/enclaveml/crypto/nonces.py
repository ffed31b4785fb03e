"""Attestation nonces an enclave issues without storing them, each usable by one owner command.

Trust side: enclave. Why: an owner command (key release, delete) must carry a nonce the enclave
issued recently, and use it once. Storing every issued nonce lets anyone who can ask for evidence
(anonymous GET /v1/evidence) flood the table and evict an owner's pending nonce (security review
F-31). So the enclave stores nothing at issue time: it extends the caller's nonce with a time and
a MAC under a key that never leaves it,

    nonce = caller nonce (8..64 bytes) || issued (u64 big-endian, ms of the enclave's monotonic clock)
            || HMAC-SHA256(key, "enclaveml/v1 attestation-nonce\\0" || caller nonce || issued)[:16]

and the evidence binds that whole nonce, so the caller checks it starts with its own. At use, the
enclave checks the MAC and the age (`ttl_s`), and remembers the nonce only from then until it
expires, so a consumed nonce cannot be used again. Only owner commands that passed their
signature and owner checks reach `consume`; if even those exceed `max_used` within one TTL, new
ones are refused (never an eviction, which would reopen a replay).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading

from ..errors import DataError, ReplayedMessage

LABEL = b"enclaveml/v1 attestation-nonce\x00"
MAC_BYTES = 16
_TIME = struct.Struct(">Q")
SUFFIX_BYTES = _TIME.size + MAC_BYTES
MIN_CALLER_BYTES, MAX_CALLER_BYTES = 8, 64


class NonceIssuer:
    """Issue MAC'd nonces (stateless) and consume each once within `ttl_s`. Thread-safe; the
    clock (seconds, monotonic) is passed in, so the logic is testable without waiting."""

    def __init__(self, key: bytes, ttl_s: float = 600.0, max_used: int = 10_000):
        if len(key) < 32:
            raise ValueError("a nonce key is at least 32 bytes")
        self._key = bytes(key)
        self.ttl_s = float(ttl_s)
        self.max_used = int(max_used)
        self._used: dict[bytes, float] = {}  # consumed nonce -> when it expires
        self._lock = threading.Lock()

    def _mac(self, caller: bytes, issued: bytes) -> bytes:
        return hmac.new(self._key, LABEL + caller + issued, hashlib.sha256).digest()[:MAC_BYTES]

    def issue(self, caller_nonce: bytes, now: float) -> bytes:
        """The caller's nonce, extended with the issue time and this enclave's MAC."""
        caller = bytes(caller_nonce)
        if not MIN_CALLER_BYTES <= len(caller) <= MAX_CALLER_BYTES:
            raise DataError(f"attestation nonce must be {MIN_CALLER_BYTES} to {MAX_CALLER_BYTES} bytes")
        issued = _TIME.pack(max(0, int(now * 1000)))
        return caller + issued + self._mac(caller, issued)

    def consume(self, nonce: bytes, now: float) -> None:
        """Accept `nonce` once if this issuer made it less than `ttl_s` ago; else ReplayedMessage."""
        nonce = bytes(nonce)
        caller, issued, mac = nonce[:-SUFFIX_BYTES], nonce[-SUFFIX_BYTES:-MAC_BYTES], nonce[-MAC_BYTES:]
        if (not MIN_CALLER_BYTES <= len(caller) <= MAX_CALLER_BYTES
                or not hmac.compare_digest(mac, self._mac(caller, issued))):
            raise ReplayedMessage("owner command does not carry a nonce issued by this enclave")
        age = now - _TIME.unpack(issued)[0] / 1000.0
        if not -1.0 <= age <= self.ttl_s:
            raise ReplayedMessage("owner command carries an expired attestation nonce; attest again")
        with self._lock:
            for n, t in list(self._used.items()):
                if t < now:
                    del self._used[n]
            if nonce in self._used:
                raise ReplayedMessage("owner command's nonce was used before")
            if len(self._used) >= self.max_used:
                raise ReplayedMessage("too many owner commands in the last minutes; try again later")
            self._used[nonce] = now + self.ttl_s - age + 1.0
