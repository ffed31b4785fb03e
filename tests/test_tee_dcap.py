"""SGX and TDX DCAP quotes from real hardware (../shared/testvectors/attestation), verified with dcap-qvl.

The clock is pinned to the middle of each collateral's validity window, computed from the
collateral itself (never the wall clock: certificates and collateral expire).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from conftest import ATTESTATION

from enclaveml.errors import EvidenceRejected, PolicyViolation
from enclaveml.tee import Evidence, Policy, verify_claims_only, verify_evidence
from enclaveml.tee.collateral import collateral_from_pcs, collateral_validity
from enclaveml.tee.verifiers.dcap import quote_type

pytestmark = pytest.mark.skipif(not ATTESTATION.is_dir(), reason="attestation test vectors not beside this checkout")

SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
SGX_REPORT_DATA = b"Hello, world!".ljust(64, b"\0")
TDX_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
HEADER = 48
SGX_BODY, TD10_BODY = 384, 584
SIG_AND_KEY = 64 + 64  # ECDSA signature and attestation public key, after a 4-byte length field


def _read(rel: str) -> bytes:
    return (ATTESTATION / rel).read_bytes()


def _mid(collateral: bytes) -> datetime:
    start, end = collateral_validity(collateral)
    return start + (end - start) / 2


def _evidence(kind: str, quote: str, collateral: str) -> tuple[Evidence, datetime]:
    col = _read(collateral)
    return Evidence(kind, _read(quote), col), _mid(col)


@pytest.fixture(scope="module")
def sgx():
    return _evidence("sgx", "sgx/sgx_quote", "sgx/sgx_quote_collateral.json")


@pytest.fixture(scope="module")
def tdx():
    return _evidence("tdx", "tdx/tdx_quote", "tdx/tdx_quote_collateral.json")


def _policy(kind: str, measurement: str, **kw) -> Policy:
    return Policy(allowed_backends=[kind], measurements={kind: [measurement]}, **kw)


def test_collateral_window_is_read_from_the_collateral():
    start, end = collateral_validity(_read("sgx/sgx_quote_collateral.json"))
    assert start == datetime(2025, 6, 19, 10, 56, 11, tzinfo=timezone.utc)
    assert end == datetime(2025, 7, 19, 10, 1, 18, tzinfo=timezone.utc)


def test_sgx_quote_verifies_with_its_real_status(sgx):
    ev, now = sgx
    c = verify_claims_only(ev, now)
    assert c.backend == "sgx" and c.measurement == SGX_MRENCLAVE
    assert c.report_data == SGX_REPORT_DATA
    assert c.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert c.advisories == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert c.details["mr_signer"] == SGX_MRSIGNER and c.details["debug"] is False


def test_sgx_policy_up_to_date_only_refuses_and_says_why(sgx):
    ev, now = sgx
    with pytest.raises(PolicyViolation) as e:
        verify_evidence(ev, _policy("sgx", SGX_MRENCLAVE), SGX_REPORT_DATA, now)
    assert str(e.value).startswith(
        "policy rule accepted_tcb_statuses: TCB status ConfigurationAndSWHardeningNeeded is not in [UpToDate]"
    )
    ok = _policy("sgx", SGX_MRENCLAVE, accepted_tcb_statuses=["UpToDate", "SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"],
                 sgx_mrsigners=[SGX_MRSIGNER], min_isv_svn=0)
    assert verify_evidence(ev, ok, SGX_REPORT_DATA, now).measurement == SGX_MRENCLAVE


def test_sgx_other_rules_name_themselves(sgx):
    ev, now = sgx
    relaxed = dict(accepted_tcb_statuses=["ConfigurationAndSWHardeningNeeded"])
    with pytest.raises(PolicyViolation, match="policy rule rejected_advisories: the platform is affected by INTEL-SA-00615"):
        verify_evidence(ev, _policy("sgx", SGX_MRENCLAVE, rejected_advisories=["INTEL-SA-00615"], **relaxed), None, now)
    with pytest.raises(PolicyViolation, match="policy rule sgx_mrsigners"):
        verify_evidence(ev, _policy("sgx", SGX_MRENCLAVE, sgx_mrsigners=["00" * 32], **relaxed), None, now)
    with pytest.raises(PolicyViolation, match="policy rule min_isv_svn: ISVSVN 0 is below 1"):
        verify_evidence(ev, _policy("sgx", SGX_MRENCLAVE, min_isv_svn=1, **relaxed), None, now)
    with pytest.raises(PolicyViolation, match="policy rule allowed_backends"):
        verify_evidence(ev, _policy("tdx", TDX_MRTD), None, now)


def test_sgx_wrong_mrenclave_or_report_data_fails(sgx):
    ev, now = sgx
    relaxed = dict(accepted_tcb_statuses=["ConfigurationAndSWHardeningNeeded"])
    with pytest.raises(PolicyViolation, match=f"policy rule measurements: sgx measurement {SGX_MRENCLAVE} is not in"):
        verify_evidence(ev, _policy("sgx", "00" * 32, **relaxed), SGX_REPORT_DATA, now)
    with pytest.raises(EvidenceRejected, match="report data"):
        verify_evidence(ev, _policy("sgx", SGX_MRENCLAVE, **relaxed), b"Hello, world?".ljust(64, b"\0"), now)


def test_sgx_flipped_bit_112_gives_dcap_qvl_reason(sgx):
    ev, now = sgx
    bad = bytearray(ev.quote)
    bad[112] ^= 0x01
    with pytest.raises(EvidenceRejected, match="ISV enclave report signature is invalid"):
        verify_claims_only(Evidence("sgx", bytes(bad), ev.collateral), now)


@pytest.mark.parametrize("which, body", [("sgx", SGX_BODY), ("tdx", TD10_BODY)])
def test_every_flipped_byte_in_the_signed_region_fails(which, body, sgx, tdx):
    ev, now = sgx if which == "sgx" else tdx
    # header + report body (signed by the attestation key), then that signature and the key itself
    # (certified through the QE report); the 4-byte length field between them is not signed.
    signed = [*range(0, HEADER + body), *range(HEADER + body + 4, HEADER + body + 4 + SIG_AND_KEY)]
    for i in signed:
        bad = bytearray(ev.quote)
        bad[i] ^= 0x01
        with pytest.raises(EvidenceRejected):
            verify_claims_only(Evidence(which, bytes(bad), ev.collateral), now)


def test_clock_outside_the_collateral_window_fails(sgx):
    ev, _ = sgx
    start, end = collateral_validity(ev.collateral)
    with pytest.raises(EvidenceRejected):
        verify_claims_only(ev, end + timedelta(days=1))
    with pytest.raises(EvidenceRejected):
        verify_claims_only(ev, start - timedelta(days=1))


def test_tdx_quote_is_up_to_date_and_accepted_by_default_rules(tdx):
    ev, now = tdx
    c = verify_evidence(ev, _policy("tdx", TDX_MRTD, min_tee_tcb_svn="06010300000000000000000000000000"), None, now)
    assert c.backend == "tdx" and c.tcb_status == "UpToDate" and c.measurement == TDX_MRTD
    assert c.details["quote_version"] == 4 and c.details["debug"] is False
    assert len(c.report_data) == 64


def test_tdx_wrong_mrtd_report_data_or_svn_fails(tdx):
    ev, now = tdx
    with pytest.raises(PolicyViolation, match="policy rule measurements: tdx measurement"):
        verify_evidence(ev, _policy("tdx", "11" * 48), None, now)
    with pytest.raises(EvidenceRejected, match="report data"):
        verify_evidence(ev, _policy("tdx", TDX_MRTD), bytes(64), now)
    with pytest.raises(PolicyViolation, match="policy rule min_tee_tcb_svn"):
        verify_evidence(ev, _policy("tdx", TDX_MRTD, min_tee_tcb_svn="07010300000000000000000000000000"), None, now)


def test_tdx_outdated_quote_is_refused_with_dcap_qvl_reason_even_if_out_of_date_is_accepted():
    ev, now = _evidence("tdx", "tdx/tdx_quote_outdated", "tdx/tdx_quote_outdated_collateral.json")
    assert now.year == 2026  # its collateral is a later one than the other two quotes'
    lenient = Policy(allowed_backends=["tdx"], measurements={"tdx": ["00" * 48]},
                     accepted_tcb_statuses=["UpToDate", "OutOfDate", "OutOfDateConfigurationNeeded"])
    for policy in (lenient, Policy(allowed_backends=["tdx"], measurements={"tdx": ["00" * 48]})):
        with pytest.raises(EvidenceRejected, match="No matching TCB level found"):
            verify_evidence(ev, policy, None, now)


def test_type_mismatch_and_missing_collateral_are_rejected(sgx, tdx):
    (s, now), (t, _) = sgx, tdx
    assert quote_type(s.quote) == "sgx" and quote_type(t.quote) == "tdx"
    with pytest.raises(EvidenceRejected, match="evidence says tdx but the quote is a sgx quote"):
        verify_claims_only(Evidence("tdx", s.quote, s.collateral), now)
    with pytest.raises(EvidenceRejected, match="no collateral"):
        verify_claims_only(Evidence("sgx", s.quote), now)
    with pytest.raises(EvidenceRejected):
        verify_claims_only(Evidence("sgx", s.quote, t.collateral), now)
    with pytest.raises(EvidenceRejected, match="not dcap-qvl collateral"):
        verify_claims_only(Evidence("sgx", s.quote, b"{}"), now)
    with pytest.raises(EvidenceRejected, match="not a DCAP quote"):
        verify_claims_only(Evidence("sgx", b"\x03\x00" + bytes(100), s.collateral), now)


# --- the go-tdx-guest quotes, with collateral assembled from Intel PCS-shaped responses ---------

def _pck_issuer_chain(quote: bytes) -> str:
    import dcap_qvl
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    certs = x509.load_pem_x509_certificates(dcap_qvl.parse_quote(quote).cert_chain_pem_bytes())
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs[1:])  # Platform CA + Root CA


def test_gotdx_v5_quote_verifies_with_assembled_pcs_collateral():
    """The v5 sample (TD report 1.5) with the gotdx TCB info v5 response (2026-02-01..03-03).

    The gotdx QE identity response is from 2023 (expired by then), so the QE identity, the CRLs
    and the TCB signing chain come from the Intel collateral of tdx_quote_outdated (2026-02-18..
    03-20): every piece is Intel-signed and dcap-qvl checks each signature; only the assembly is ours.
    """
    quote = _read("tdx/gotdx_quote_v5_sample.dat")
    other = json.loads(_read("tdx/tdx_quote_outdated_collateral.json"))
    qe_response = '{"enclaveIdentity":' + other["qe_identity"] + ',"signature":"' + other["qe_identity_signature"] + '"}'
    col = collateral_from_pcs(
        pck_crl_issuer_chain=_pck_issuer_chain(quote),
        root_ca_crl_der=bytes.fromhex(other["root_ca_crl"]),
        pck_crl_der=bytes.fromhex(other["pck_crl"]),
        tcb_info_response=_read("tdx/gotdx_sample_tcbinfo_response_v5").decode(),
        tcb_info_issuer_chain=other["tcb_info_issuer_chain"],
        qe_identity_response=qe_response,
        qe_identity_issuer_chain=other["qe_identity_issuer_chain"],
    )
    now = _mid(col)
    ev = Evidence("tdx", quote, col)
    c = verify_claims_only(ev, now)
    assert c.tcb_status == "UpToDate" and c.details["quote_version"] == 5 and c.details["report_kind"] == "TD15"
    assert c.measurement.startswith("7348651a34b2d2d3462822e3a750ec6110125f36")
    for i in (10, HEADER + 136, HEADER + 560):  # header, MRTD, REPORTDATA
        bad = bytearray(quote)
        bad[i] ^= 0x01
        with pytest.raises(EvidenceRejected):
            verify_claims_only(Evidence("tdx", bytes(bad), col), now)


def test_gotdx_spr_e4_quote_cannot_be_verified_offline_and_says_so():
    """The production SPR E4 quote parses (TDX v4), but its 2023 TCB info was signed by the Intel
    TCB Signing certificate of that time, which the test vectors do not hold (the chains present
    are of the certificate issued 2025-05-06). dcap-qvl refuses; no pass is faked."""
    quote = _read("tdx/gotdx_tdx_prod_quote_SPR_E4.dat")
    assert quote_type(quote) == "tdx"
    sgx_col = json.loads(_read("sgx/sgx_quote_collateral.json"))
    col = collateral_from_pcs(
        pck_crl_issuer_chain=_pck_issuer_chain(quote),
        root_ca_crl_der=_read("tdx/gotdx_rootcrl.der"),
        pck_crl_der=_read("tdx/gotdx_pckcrl"),
        tcb_info_response=_read("tdx/gotdx_sample_tcbInfo_response").decode(),
        tcb_info_issuer_chain=sgx_col["tcb_info_issuer_chain"],
        qe_identity_response=_read("tdx/gotdx_sample_qeIdentity_response").decode(),
        qe_identity_issuer_chain=sgx_col["qe_identity_issuer_chain"],
    )
    with pytest.raises(EvidenceRejected, match="CertNotValidYet"):
        verify_claims_only(Evidence("tdx", quote, col), _mid(col))
