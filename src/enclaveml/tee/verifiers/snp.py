"""Verifier for AMD SEV-SNP attestation reports: VCEK -> ASK -> ARK with `cryptography` (client/owner side).

Checks, in order:
1. the report parses (1184 bytes, version 2..5, signature algorithm ECDSA P-384/SHA-384);
2. the certificates (collateral: the VCEK or VLEK, the ASK/ASVK and the ARK, PEM or DER) form a
   chain: the ARK is self-signed and its public key is one AMD root we pin (`TRUSTED_ARKS`), the
   ASK is signed by the ARK, the VCEK by the ASK, each with RSASSA-PSS/SHA-384 (MGF1-SHA-384,
   salt 48 bytes, as AMD's KDS issues them); every certificate is within its validity at `now`;
3. for a VCEK, its hwID extension equals the report's CHIP_ID and its TCB extensions (blSPL,
   teeSPL, snpSPL, ucodeSPL) equal the report's REPORTED_TCB, since a VCEK is derived per chip
   and per TCB;
4. the VCEK's ECDSA P-384 signature over bytes 0..0x29F (R and S little-endian at 0x2A0/0x2E8).
Not checked: AMD's CRL for the ASK (not in the test vectors; fetch it from KDS in deployments).
SNP has no Intel-style TCB status: claims say "NotEvaluated" and the policy's min_snp_tcb rule
sets the floor instead.
"""

from __future__ import annotations

import hashlib
import warnings
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ...errors import EvidenceRejected, PolicyViolation
from .. import rules
from ..evidence import Claims, Evidence
from ..policy import Policy
from ..snp_report import parse_report, tcb_fields
from . import Verifier, register_verifier

#: SHA-256 of the SubjectPublicKeyInfo (DER) of each AMD Root Key we trust, by product. Milan's is
#: from AMD KDS https://kdsintf.amd.com/vcek/v1/Milan/cert_chain (as kept in go-sev-guest's test
#: data). Add Genoa/Turin here from the same KDS endpoint before verifying reports from them.
TRUSTED_ARKS = {
    "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9": "Milan",
}

_AMD = "1.3.6.1.4.1.3704.1."
OID_PRODUCT = _AMD + "2"
OID_HWID = _AMD + "4"
OID_TCB = {"bootloader": _AMD + "3.1", "tee": _AMD + "3.2", "snp": _AMD + "3.3", "microcode": _AMD + "3.8"}


def _load_certs(data: bytes) -> list[x509.Certificate]:
    with warnings.catch_warnings():  # AMD's VCEKs carry serials that `cryptography` warns about
        warnings.simplefilter("ignore")
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                return x509.load_pem_x509_certificates(data)
            return [x509.load_der_x509_certificate(data)]
        except ValueError as e:
            raise EvidenceRejected(f"SEV-SNP collateral is not X.509 certificates: {e}") from None


def snp_collateral(*blobs: bytes) -> bytes:
    """Concatenate certificates (each PEM bundle or one DER cert) into the PEM collateral we carry."""
    out = b""
    for blob in blobs:
        for c in _load_certs(bytes(blob)):
            out += c.public_bytes(serialization.Encoding.PEM)
    return out


def _spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    key = issuer.public_key()
    if cert.issuer != issuer.subject or not isinstance(key, rsa.RSAPublicKey):
        raise EvidenceRejected(f"SEV-SNP {what} is not issued by {issuer.subject.rfc4514_string()}")
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:  # an unknown signature OID in host-supplied collateral
        raise EvidenceRejected(f"SEV-SNP {what} uses an unsupported signature algorithm") from None
    if not isinstance(algorithm, hashes.SHA384):
        raise EvidenceRejected(f"SEV-SNP {what} is not signed with SHA-384")
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, pss, hashes.SHA384())
    except InvalidSignature:
        raise EvidenceRejected(f"SEV-SNP {what} signature (RSA-PSS SHA-384) is invalid") from None


def _ext_int(cert: x509.Certificate, oid: str) -> int | None:
    try:
        v = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    except x509.ExtensionNotFound:
        return None
    if len(v) < 3 or v[0] != 0x02 or v[1] != len(v) - 2:  # DER INTEGER
        raise EvidenceRejected(f"SEV-SNP certificate extension {oid} is not an INTEGER")
    return int.from_bytes(v[2:], "big", signed=True)


def _ext_bytes(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    except x509.ExtensionNotFound:
        return None


def verify_chain(certs: list[x509.Certificate], now: datetime) -> tuple[x509.Certificate, str]:
    """Find ARK (self-signed, pinned), ASK (by the ARK) and the leaf (by the ASK); return (leaf, product)."""
    arks = [c for c in certs if c.issuer == c.subject]
    if len(arks) != 1:
        raise EvidenceRejected(f"SEV-SNP collateral must hold exactly one self-signed ARK, found {len(arks)}")
    ark = arks[0]
    product = TRUSTED_ARKS.get(_spki_sha256(ark))
    if product is None:
        raise EvidenceRejected(f"SEV-SNP ARK {ark.subject.rfc4514_string()} is not a pinned AMD root key")
    _check_signed_by(ark, ark, "ARK")
    asks = [c for c in certs if c is not ark and c.issuer == ark.subject]
    if len(asks) != 1:
        raise EvidenceRejected("SEV-SNP collateral must hold exactly one ASK/ASVK issued by the ARK")
    ask = asks[0]
    _check_signed_by(ask, ark, "ASK")
    leaves = [c for c in certs if c.issuer == ask.subject and c is not ask]
    if len(leaves) != 1:
        raise EvidenceRejected(f"SEV-SNP collateral has no VCEK/VLEK issued by {ask.subject.rfc4514_string()}")
    leaf = leaves[0]
    _check_signed_by(leaf, ask, "VCEK")
    for c in (ark, ask, leaf):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise EvidenceRejected(
                f"SEV-SNP certificate {c.subject.rfc4514_string()} is not valid at {now.isoformat()} "
                f"({c.not_valid_before_utc.isoformat()} .. {c.not_valid_after_utc.isoformat()})"
            )
    return leaf, product


@register_verifier("sev-snp")
class SnpVerifier(Verifier):
    def verify(self, evidence: Evidence, now: datetime) -> Claims:
        report = parse_report(evidence.quote)
        if report.signing_key not in ("VCEK", "VLEK"):
            raise EvidenceRejected(f"SEV-SNP report is signed by key type {report.signing_key}, want VCEK or VLEK")
        if evidence.collateral is None:
            raise EvidenceRejected("SEV-SNP report has no collateral (the VCEK, ASK and ARK certificates)")
        leaf, product = verify_chain(_load_certs(bytes(evidence.collateral)), now)
        if report.signing_key == "VCEK":
            hwid = _ext_bytes(leaf, OID_HWID)
            if hwid is None or hwid != report.chip_id:
                raise EvidenceRejected("SEV-SNP VCEK hwID does not match the report's CHIP_ID")
            tcb = tcb_fields(report.reported_tcb)
            for name, oid in OID_TCB.items():
                if _ext_int(leaf, oid) != tcb[name]:
                    raise EvidenceRejected(
                        f"SEV-SNP VCEK {name} SPL {_ext_int(leaf, oid)} does not match the report's REPORTED_TCB {tcb[name]}"
                    )
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise EvidenceRejected("SEV-SNP VCEK key is not ECDSA P-384")
        try:
            key.verify(encode_dss_signature(report.sig_r, report.sig_s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise EvidenceRejected("SEV-SNP report signature (ECDSA P-384 SHA-384 by the VCEK) is invalid") from None
        product_ext = _ext_bytes(leaf, OID_PRODUCT)
        details = report.details()
        details.update(product=product, vcek_product=product_ext[2:].decode("ascii", "replace") if product_ext else None)
        return Claims(
            backend="sev-snp",
            measurement=report.measurement.hex(),
            report_data=report.report_data,
            tcb_status="NotEvaluated",
            advisories=[],
            timestamp=None,
            details=details,
        )

    def check_policy(self, claims: Claims, policy: Policy, now: datetime) -> None:
        rules.debug(claims, policy, claims.details["debug"])
        reported = claims.details["reported_tcb"]
        for name, minimum in sorted(policy.min_snp_tcb.items()):
            if reported[name] < minimum:
                raise PolicyViolation(f"policy rule min_snp_tcb: reported {name} SPL {reported[name]} is below {minimum}")
