"""Reading evidence from files a user hands in (client/owner side): raw quotes or Evidence JSON.

`attest verify` accepts an enclaveml Evidence JSON (`Evidence.to_dict()`), or a raw SGX/TDX quote,
SEV-SNP report or sim quote whose type is given or detected from its bytes. Collateral files are
read as dcap-qvl JSON (SGX/TDX) or certificates (SEV-SNP: VCEK plus the ASK/ARK chain).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import EvidenceRejected, UserInputError
from .evidence import EVIDENCE_TYPES, Evidence
from .snp_report import REPORT_SIZE


def detect_type(raw: bytes) -> str:
    """Guess the evidence type of raw bytes: sim JSON, SEV-SNP report (by size/version), or DCAP quote."""
    if raw[:9] == b'{"body":{':
        return "sim"
    if len(raw) == REPORT_SIZE and 2 <= struct.unpack_from("<I", raw, 0)[0] <= 5:
        return "sev-snp"
    from .verifiers.dcap import quote_type

    try:
        return quote_type(raw)
    except EvidenceRejected:
        raise UserInputError("cannot tell the evidence type: give --type sgx|tdx|sev-snp|sim") from None


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {e.strerror}") from None


def load_collateral(kind: str, paths: list[str | Path]) -> bytes | None:
    if not paths:
        return None
    blobs = [_read(p) for p in paths]
    if kind == "sev-snp":
        from .verifiers.snp import snp_collateral

        return snp_collateral(*blobs)
    if len(blobs) != 1:
        raise UserInputError(f"{kind} evidence takes one collateral file (dcap-qvl JSON), got {len(blobs)}")
    return blobs[0]


def load_evidence(path: str | Path, kind: str | None = None, collateral: list[str | Path] | None = None) -> Evidence:
    """Evidence from a file; `collateral` files, when given, replace any collateral inside it."""
    raw = _read(path)
    if kind is not None and kind not in EVIDENCE_TYPES:
        raise UserInputError(f"unknown evidence type {kind!r} (known: {', '.join(EVIDENCE_TYPES)})")
    ev: Evidence | None = None
    if raw.lstrip()[:1] == b"{" and not raw.startswith(b'{"body":{'):  # an Evidence JSON document?
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "backend" in doc and "quote" in doc:
            ev = Evidence.from_dict(doc)
            if kind is not None and ev.backend != kind:
                raise UserInputError(f"{path} holds {ev.backend} evidence, not {kind}")
    if ev is None:
        ev = Evidence(kind or detect_type(raw), raw)
    extra = load_collateral(ev.backend, list(collateral or []))
    if extra is not None:
        ev = Evidence(ev.backend, ev.quote, extra)
    return ev
