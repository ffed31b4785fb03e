"""The evidence answer: an enclave's key and the evidence that binds it to the asker's nonce.

Trust side: all (pure, no I/O). The enclave builds it, the host relays it (Infenclave's
GET /v1/evidence?nonce=HEX, CalTrain's GET /evidence?nonce=HEX), the client or participant reads
it and only then verifies the evidence against its policy (`tee.verify_evidence`):

    {"evidence": {...Evidence.to_dict()...}, "public_key": hex (32 bytes),
     "nonce": hex (the asker's nonce; Infenclave extends it, crypto/nonces.py),
     "plan_hash": hex (CalTrain only: the training plan the evidence names),
     "pq_public_key": hex (Infenclave, on ?keys=pq: the hybrid request key, crypto/suites.py)}

Everything here is the host's word until the evidence verifies; a malformed answer is an
`EvidenceRejected`, never a parser's own exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import EvidenceRejected

PUBLIC_KEY_BYTES = 32
#: The nonce a client sends: 8 to 64 bytes (16 to 128 hex digits).
MIN_NONCE_BYTES, MAX_NONCE_BYTES = 8, 64


@dataclass(frozen=True)
class EvidenceAnswer:
    """An enclave's HPKE public key, the nonce its evidence binds, and the evidence (as JSON)."""

    evidence: dict
    public_key: bytes
    nonce: bytes
    plan_hash: "bytes | None" = None
    #: The hybrid (ML-KEM-768 + X25519) request key, when asked for (`?keys=pq`; crypto/suites.py).
    pq_public_key: "bytes | None" = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"evidence": self.evidence, "public_key": self.public_key.hex(), "nonce": self.nonce.hex()}
        if self.plan_hash is not None:
            out["plan_hash"] = self.plan_hash.hex()
        if self.pq_public_key is not None:
            out["pq_public_key"] = self.pq_public_key.hex()
        return out

    @classmethod
    def from_dict(cls, d: Any) -> "EvidenceAnswer":
        try:
            if not isinstance(d, dict) or not isinstance(d["evidence"], dict):
                raise TypeError
            pk, nonce = bytes.fromhex(d["public_key"]), bytes.fromhex(d["nonce"])
            plan = d.get("plan_hash")
            plan_hash = bytes.fromhex(plan) if plan is not None else None
            pq = d.get("pq_public_key")
            pq_public_key = bytes.fromhex(pq) if pq is not None else None
        except (KeyError, TypeError, ValueError):
            raise EvidenceRejected("the server's evidence answer is malformed") from None
        if len(pk) != PUBLIC_KEY_BYTES:
            raise EvidenceRejected("the enclave public key is not 32 bytes")
        if pq_public_key is not None:
            from ..crypto.suites import PQ_PUBLIC_BYTES

            if len(pq_public_key) != PQ_PUBLIC_BYTES:
                raise EvidenceRejected(f"the enclave's hybrid public key is not {PQ_PUBLIC_BYTES} bytes")
        return cls(d["evidence"], pk, nonce, plan_hash, pq_public_key)


def check_nonce_hex(nonce: str) -> str:
    """A nonce as the host takes it from a query: 8 to 64 bytes of hex (DataError otherwise)."""
    from ..errors import DataError

    if not isinstance(nonce, str) or not 2 * MIN_NONCE_BYTES <= len(nonce) <= 2 * MAX_NONCE_BYTES:
        raise DataError("nonce must be 8 to 64 bytes of hex")
    return nonce
