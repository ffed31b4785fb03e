"""Verifier for Intel SGX and TDX DCAP quotes with `dcap-qvl` (client/owner side).

dcap-qvl (Phala Network's Rust QVL) checks the quote's ECDSA-P256 signature by the attestation key,
the QE report that certifies that key, the PCK certificate chain up to Intel's SGX Root CA (pinned
inside dcap-qvl), the CRLs, and the TCB info and QE identity signatures, then matches the
platform's TCB against the TCB info to give a status such as UpToDate or SWHardeningNeeded. It
needs the collateral and the time: we pass both explicitly so verification is a pure function.

What dcap-qvl refuses it refuses: a TDX quote whose TCB lies below every level in its TCB info
fails with "No matching TCB level found" and never reaches a status a policy could accept.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ...errors import EvidenceRejected
from .. import rules
from ..collateral import parse_collateral
from ..evidence import Claims, Evidence
from ..policy import Policy
from . import Verifier, register_verifier

TEE_TYPE = {0x00000000: "sgx", 0x00000081: "tdx"}


def _flatten(report: dict[str, Any]) -> dict[str, Any]:
    """dcap-qvl nests the TD 1.0 body inside TD 1.5 ones; give one flat dict."""
    out: dict[str, Any] = {}
    for k, v in report.items():
        if isinstance(v, dict):
            out.update(_flatten(v))
        else:
            out[k] = v
    return out


def quote_type(raw: bytes) -> str:
    """"sgx" or "tdx" from the quote header (parsed by dcap-qvl); EvidenceRejected if neither."""
    import dcap_qvl

    try:
        q = dcap_qvl.parse_quote(bytes(raw))
    except ValueError as e:
        raise EvidenceRejected(f"not a DCAP quote: {e}") from None
    t = TEE_TYPE.get(q.header.tee_type)
    if t is None:
        raise EvidenceRejected(f"DCAP quote has unknown TEE type {q.header.tee_type:#x}")
    return t


@register_verifier("sgx", "tdx")
class DcapVerifier(Verifier):
    def verify(self, evidence: Evidence, now: datetime) -> Claims:
        import dcap_qvl

        raw = bytes(evidence.quote)
        actual = quote_type(raw)
        if actual != evidence.backend:
            raise EvidenceRejected(f"evidence says {evidence.backend} but the quote is a {actual} quote")
        if evidence.collateral is None:
            raise EvidenceRejected(f"{actual} quote has no collateral (pin a collateral file or fetch it)")
        col = parse_collateral(evidence.collateral)
        q = dcap_qvl.parse_quote(raw)
        try:
            verified = dcap_qvl.verify(raw, col, int(now.timestamp()))
        except ValueError as e:
            raise EvidenceRejected(f"dcap-qvl refused the {actual} quote: {' '.join(str(e).split())}") from None
        doc = json.loads(verified.to_json())
        (kind, body), = doc["report"].items()
        r = _flatten(body)
        report_data = bytes.fromhex(r["report_data"])
        details: dict[str, Any] = {
            "quote_version": q.header.version,
            "report_kind": kind,
            "fmspc": q.fmspc(),
            "qe_status": doc.get("qe_status", {}).get("status"),
            "platform_status": doc.get("platform_status", {}).get("status"),
            "collateral_checked_at": now.isoformat(),
        }
        if actual == "sgx":
            attributes = bytes.fromhex(r["attributes"])
            details.update(
                mr_signer=r["mr_signer"],
                isv_prod_id=r["isv_prod_id"],
                isv_svn=r["isv_svn"],
                attributes=r["attributes"],
                debug=bool(attributes[0] & 0x02),  # SGX ATTRIBUTES.DEBUG is bit 1 of the flags
            )
            measurement = r["mr_enclave"]
        else:
            td_attributes = bytes.fromhex(r["td_attributes"])
            details.update(
                {k: r[k] for k in ("mr_seam", "tee_tcb_svn", "td_attributes", "xfam", "mr_config_id", "mr_owner",
                                   "mr_owner_config", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3") if k in r},
                debug=bool(td_attributes[0] & 0x01),  # TDX TD_ATTRIBUTES.DEBUG is bit 0
            )
            measurement = r["mr_td"]
        return Claims(
            backend=actual,
            measurement=measurement,
            report_data=report_data,
            tcb_status=verified.status,
            advisories=list(verified.advisory_ids),
            timestamp=None,
            details=details,
        )

    def complete(self, evidence: Evidence, policy: Policy) -> Evidence:
        """Fetch collateral from the policy's PCCS when the evidence carries none (network I/O)."""
        if evidence.collateral is not None or not policy.pccs_url:
            return evidence
        from ..collateral import fetch_collateral

        url = None if policy.pccs_url == "intel" else policy.pccs_url
        return Evidence(evidence.backend, evidence.quote, fetch_collateral(evidence.quote, url))

    def check_policy(self, claims: Claims, policy: Policy, now: datetime) -> None:
        from ...errors import PolicyViolation

        rules.tcb_status(claims, policy)
        rules.debug(claims, policy, claims.details["debug"])
        if claims.backend == "sgx":
            if policy.sgx_mrsigners and not rules.hex_in(claims.details["mr_signer"], policy.sgx_mrsigners):
                raise PolicyViolation(
                    f"policy rule sgx_mrsigners: MRSIGNER {claims.details['mr_signer']} is not in [{', '.join(policy.sgx_mrsigners)}]"
                )
            if policy.min_isv_svn is not None and claims.details["isv_svn"] < policy.min_isv_svn:
                raise PolicyViolation(f"policy rule min_isv_svn: ISVSVN {claims.details['isv_svn']} is below {policy.min_isv_svn}")
        else:
            rules.min_svn_bytes("min_tee_tcb_svn", bytes.fromhex(claims.details["tee_tcb_svn"]), policy.min_tee_tcb_svn)
