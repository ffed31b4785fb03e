"""Attestation evidence and verified claims: the records that cross the enclave/client boundary.

Both sides: the enclave (through a backend) produces `Evidence`; the client or owner turns it into
`Claims` with `verify_evidence`. Pure data, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..errors import EvidenceRejected

#: Evidence types a verifier exists for (`Evidence.backend`). Backends map onto them:
#: sim -> "sim", gramine-sgx -> "sgx", tsm -> "tdx" or "sev-snp".
EVIDENCE_TYPES = ("sim", "sgx", "tdx", "sev-snp")

REPORT_DATA_SIZE = 64


def bind_report_data(public_key: bytes, nonce: bytes) -> bytes:
    """SHA-256(public_key || nonce) followed by 32 zero bytes: the 64-byte report data.

    Why: every TEE signs 64 bytes of caller data (SGX REPORTDATA, TDX REPORTDATA, SNP
    REPORT_DATA). Hashing the enclave's fresh public key with the verifier's nonce binds the key
    to this attestation and makes the evidence fresh; the zero padding keeps the upper half free
    for a future second binding. The public key has a fixed length for each key type (X25519: 32
    bytes), so the concatenation is unambiguous.
    """
    if not isinstance(public_key, (bytes, bytearray)) or not isinstance(nonce, (bytes, bytearray)):
        raise TypeError("public_key and nonce must be bytes")
    return hashlib.sha256(bytes(public_key) + bytes(nonce)).digest() + bytes(32)


#: Label of the second binding: the enclave's hybrid (ML-KEM-768 + X25519) public key.
PQ_KEY_LABEL = b"enclaveml/v1 hybrid-key\x00"


def bind_report_data_pq(public_key: bytes, nonce: bytes, pq_public_key: bytes) -> bytes:
    """Report data that binds the hybrid request key too: the lower half as `bind_report_data`,
    the upper half SHA-256("enclaveml/v1 hybrid-key\0" || hybrid public key). Given only when the
    verifier asks for it (`/v1/evidence?keys=pq`), so older verifiers still see zeros there."""
    return bind_report_data(public_key, nonce)[:32] + hashlib.sha256(PQ_KEY_LABEL + bytes(pq_public_key)).digest()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise EvidenceRejected(f"evidence field {what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EvidenceRejected(f"evidence field {what} is not valid base64: {e}") from None


@dataclass(frozen=True)
class Evidence:
    """What an enclave hands out to prove what it is: a quote/report and optional collateral.

    `backend` is the evidence type ("sim", "sgx", "tdx", "sev-snp"); `quote` the raw signed
    bytes (an SGX/TDX DCAP quote, an SNP report, or the sim's signed JSON); `collateral` what a
    verifier needs besides the quote (dcap-qvl collateral JSON for SGX/TDX, the VCEK/ASK/ARK
    certificates for SNP), or None when the verifier has it already or fetches it.
    """

    backend: str
    quote: bytes
    collateral: bytes | None = None

    def __post_init__(self) -> None:
        if self.backend not in EVIDENCE_TYPES:
            raise EvidenceRejected(f"unknown evidence type {self.backend!r} (known: {', '.join(EVIDENCE_TYPES)})")
        if not isinstance(self.quote, (bytes, bytearray)) or not self.quote:
            raise EvidenceRejected("evidence has no quote bytes")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (bytes as standard base64)."""
        return {"backend": self.backend, "quote": _b64(bytes(self.quote)), "collateral": _b64(self.collateral)}

    @classmethod
    def from_dict(cls, d: Any) -> "Evidence":
        """Parse `to_dict` output; anything malformed is `EvidenceRejected` (it came from outside)."""
        if not isinstance(d, dict) or "backend" not in d or "quote" not in d:
            raise EvidenceRejected("evidence must be an object with 'backend' and 'quote'")
        if not isinstance(d["backend"], str):
            raise EvidenceRejected("evidence field backend is not a string")
        quote = _unb64(d["quote"], "quote")
        return cls(backend=d["backend"], quote=quote or b"", collateral=_unb64(d.get("collateral"), "collateral"))


@dataclass(frozen=True)
class Claims:
    """What verified evidence says, after its signatures and chain checked out.

    `measurement` is the code identity as hex (sim: code+config hash; SGX: MRENCLAVE; TDX: MRTD;
    SNP: MEASUREMENT). `tcb_status` is the platform's TCB status where the verifier evaluates one
    against signed collateral (SGX/TDX: "UpToDate", "SWHardeningNeeded", ...); "Simulated" for sim
    and "NotEvaluated" for SNP (whose minimum TCB is a policy rule instead). `timestamp` is when
    the evidence was made where the evidence says so (sim); None for hardware quotes, whose
    freshness comes from the nonce in the report data.
    """

    backend: str
    measurement: str
    report_data: bytes
    tcb_status: str
    advisories: list[str] = field(default_factory=list)
    timestamp: datetime | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (report data as hex) for `attest verify --json` and logs."""
        return {
            "backend": self.backend,
            "measurement": self.measurement,
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisories": list(self.advisories),
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "details": self.details,
        }
