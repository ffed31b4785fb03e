"""Intel DCAP collateral for SGX/TDX quotes: load, assemble from PCS responses, fetch (client/owner side).

Collateral (PCK CRL and its issuer chain, root CA CRL, TCB info and QE identity with their
signatures and issuer chain) is what a verifier needs besides the quote to say whether the
platform's TCB is current. enclaveml passes it to `dcap-qvl` in that package's JSON form. It can
be pinned (a file kept with the policy: reproducible, offline) or fetched from a PCCS/Intel PCS
(`fetch_collateral`, network). Either way dcap-qvl checks every signature up to Intel's root CA,
which it pins, so a fetched collateral is not trusted for being fetched.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Any

from ..errors import EvidenceRejected, UserInputError

COLLATERAL_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


def parse_collateral(data: bytes) -> Any:
    """dcap-qvl collateral JSON -> dcap_qvl.QuoteCollateralV3; malformed is EvidenceRejected."""
    import dcap_qvl

    try:
        text = bytes(data).decode("utf-8")
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise EvidenceRejected(f"collateral is not dcap-qvl collateral JSON: {e}") from None


def _raw_inner_object(text: str, key: str) -> str:
    """The exact text of `{"key": {...}}`'s inner object: Intel signs those bytes, not a re-encoding."""
    start = text.find(f'"{key}"')
    start = text.find("{", start) if start >= 0 else -1
    if start < 0:
        raise UserInputError(f"PCS response has no {key!r} object")
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    raise UserInputError(f"PCS response's {key!r} object is not closed")


def collateral_from_pcs(
    *,
    pck_crl_issuer_chain: str,
    root_ca_crl_der: bytes,
    pck_crl_der: bytes,
    tcb_info_response: str,
    tcb_info_issuer_chain: str,
    qe_identity_response: str,
    qe_identity_issuer_chain: str,
) -> bytes:
    """Assemble dcap-qvl collateral JSON from Intel PCS responses (the bodies of /tcb, /qe/identity,
    the CRLs in DER, and the issuer chains the PCS returns in its *-Issuer-Chain headers)."""
    try:
        tcb_sig = json.loads(tcb_info_response)["signature"]
        qe_sig = json.loads(qe_identity_response)["signature"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"PCS response is not JSON with a signature: {e}") from None
    doc = {
        "pck_crl_issuer_chain": pck_crl_issuer_chain,
        "root_ca_crl": bytes(root_ca_crl_der).hex(),
        "pck_crl": bytes(pck_crl_der).hex(),
        "tcb_info_issuer_chain": tcb_info_issuer_chain,
        "tcb_info": _raw_inner_object(tcb_info_response, "tcbInfo"),
        "tcb_info_signature": tcb_sig,
        "qe_identity_issuer_chain": qe_identity_issuer_chain,
        "qe_identity": _raw_inner_object(qe_identity_response, "enclaveIdentity"),
        "qe_identity_signature": qe_sig,
    }
    return json.dumps(doc).encode("utf-8")


def collateral_validity(data: bytes) -> tuple[datetime, datetime]:
    """(latest issueDate, earliest nextUpdate) of the TCB info and QE identity: when it can be used.

    Tests pin the clock inside this window (certificates and collateral expire; the wall clock
    would make them rot).
    """
    try:
        doc = json.loads(bytes(data))
        parts = [json.loads(doc["tcb_info"]), json.loads(doc["qe_identity"])]
        parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(timezone.utc)  # noqa: E731
        return max(parse(p["issueDate"]) for p in parts), min(parse(p["nextUpdate"]) for p in parts)
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"collateral has no readable issueDate/nextUpdate: {e}") from None


def fetch_collateral(quote: bytes, pccs_url: str | None = None) -> bytes:
    """Fetch collateral for `quote` from a PCCS (default: Intel PCS) with dcap-qvl; network I/O."""
    import dcap_qvl

    url = pccs_url or dcap_qvl.INTEL_PCS_URL
    try:
        col = asyncio.run(dcap_qvl.get_collateral(url, bytes(quote)))
    except (ValueError, RuntimeError) as e:
        raise UserInputError(f"could not fetch collateral from {url}: {e}") from None
    return col.to_json().encode("utf-8")
