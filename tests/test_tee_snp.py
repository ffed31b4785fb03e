"""AMD SEV-SNP: the real Milan report and its VCEK -> ASK -> ARK chain (../shared/testvectors/attestation/sev-snp)."""

from __future__ import annotations

import datetime as dt

import pytest
from conftest import ATTESTATION
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from enclaveml.errors import EvidenceRejected, PolicyViolation
from enclaveml.tee import Evidence, Policy, verify_claims_only, verify_evidence
from enclaveml.tee.snp_report import SIGNED_SIZE, parse_report
from enclaveml.tee.verifiers.snp import snp_collateral

SNP = ATTESTATION / "sev-snp"
pytestmark = pytest.mark.skipif(not SNP.is_dir(), reason="attestation test vectors not beside this checkout")

MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
REPORT_DATA = bytes([1, 2, 3, 4, 5]).ljust(64, b"\0")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)  # inside the VCEK's 2022-09-24 .. 2029-09-24


@pytest.fixture(scope="module")
def report() -> bytes:
    return (SNP / "attestation.bin").read_bytes()


@pytest.fixture(scope="module")
def chain() -> bytes:
    return snp_collateral((SNP / "vcek.testcer").read_bytes(), (SNP / "milan.testcer").read_bytes())


def _policy(**kw) -> Policy:
    return Policy(allowed_backends=["sev-snp"], measurements={"sev-snp": [MEASUREMENT]}, **kw)


def test_report_layout(report):
    r = parse_report(report)
    assert r.version == 2 and r.signing_key == "VCEK" and r.vmpl == 0
    assert r.measurement.hex() == MEASUREMENT and r.report_data == REPORT_DATA
    assert r.policy == 0xB0000 and r.debug  # bit 19: this test guest allows debugging
    assert r.details()["reported_tcb"] == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}
    assert r.sig_r > 0 and r.sig_s > 0


def test_report_verifies_through_the_chain(report, chain):
    c = verify_claims_only(Evidence("sev-snp", report, chain), NOW)
    assert c.backend == "sev-snp" and c.measurement == MEASUREMENT and c.report_data == REPORT_DATA
    assert c.tcb_status == "NotEvaluated" and c.details["product"] == "Milan" and c.details["vcek_product"] == "Milan-B0"


def test_debug_guest_is_refused_unless_allowed(report, chain):
    ev = Evidence("sev-snp", report, chain)
    with pytest.raises(PolicyViolation, match="policy rule allow_debug"):
        verify_evidence(ev, _policy(), REPORT_DATA, NOW)
    assert verify_evidence(ev, _policy(allow_debug=True, min_snp_tcb={"snp": 5, "microcode": 68}), REPORT_DATA, NOW)
    with pytest.raises(PolicyViolation, match="policy rule min_snp_tcb: reported snp SPL 5 is below 6"):
        verify_evidence(ev, _policy(allow_debug=True, min_snp_tcb={"snp": 6}), REPORT_DATA, NOW)


def test_wrong_measurement_or_report_data_fails(report, chain):
    ev = Evidence("sev-snp", report, chain)
    with pytest.raises(PolicyViolation, match="policy rule measurements: sev-snp measurement"):
        verify_evidence(ev, Policy(measurements={"sev-snp": ["00" * 48]}, allow_debug=True), REPORT_DATA, NOW)
    with pytest.raises(EvidenceRejected, match="report data"):
        verify_evidence(ev, _policy(allow_debug=True), bytes(64), NOW)


def test_every_flipped_byte_in_the_signed_region_and_signature_fails(report, chain):
    for i in [*range(SIGNED_SIZE), *range(0x2A0, 0x2A0 + 144)]:
        bad = bytearray(report)
        bad[i] ^= 0x01
        with pytest.raises(EvidenceRejected):
            verify_claims_only(Evidence("sev-snp", bytes(bad), chain), NOW)


def test_tampered_or_wrong_certificates_fail(report, chain):
    vcek_der = (SNP / "vcek.testcer").read_bytes()
    milan = (SNP / "milan.testcer").read_bytes()
    bad = bytearray(vcek_der)
    bad[300] ^= 0x01  # inside the TBS certificate (the public key)
    for col in (
        snp_collateral(bytes(bad), milan),
        snp_collateral((SNP / "vcek.testcer").read_bytes(), (SNP / "milanvlek.testcer").read_bytes()),
        snp_collateral(vcek_der),
        snp_collateral(milan),
    ):
        with pytest.raises(EvidenceRejected):
            verify_claims_only(Evidence("sev-snp", report, col), NOW)
    with pytest.raises(EvidenceRejected, match="no collateral"):
        verify_claims_only(Evidence("sev-snp", report), NOW)
    with pytest.raises(EvidenceRejected, match="1184 bytes"):
        verify_claims_only(Evidence("sev-snp", report[:-1], chain), NOW)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_an_unpinned_root_is_refused(report):
    """A self-made ARK/ASK chain re-signing the real VCEK's key: the chain is consistent but the root is not AMD's."""
    vcek = x509.load_der_x509_certificate((SNP / "vcek.testcer").read_bytes())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    milan = x509.load_pem_x509_certificates((SNP / "milan.testcer").read_bytes())
    ask_cert, ark_cert = milan[0], milan[1]

    def mk(subject, issuer, pub, key):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
             .serial_number(x509.random_serial_number())
             .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2040, 1, 1)))
        return b.sign(key, hashes.SHA384(), rsa_padding=pss)

    fake_ark = mk(ark_cert.subject, ark_cert.subject, ark_key.public_key(), ark_key)
    fake_ask = mk(ask_cert.subject, ark_cert.subject, ark_key.public_key(), ark_key)
    fake_vcek = (x509.CertificateBuilder().subject_name(vcek.subject).issuer_name(ask_cert.subject)
                 .public_key(vcek.public_key()).serial_number(1)
                 .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2040, 1, 1)))
    for ext in vcek.extensions:
        fake_vcek = fake_vcek.add_extension(ext.value, ext.critical)
    fake_vcek = fake_vcek.sign(ark_key, hashes.SHA384(), rsa_padding=pss)
    col = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (fake_vcek, fake_ask, fake_ark))
    with pytest.raises(EvidenceRejected, match="not a pinned AMD root key"):
        verify_claims_only(Evidence("sev-snp", report, col), NOW)


def test_certificates_outside_their_validity_fail(report, chain):
    with pytest.raises(EvidenceRejected, match="not valid at"):
        verify_claims_only(Evidence("sev-snp", report, chain), dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))


def test_the_vlek_chain_hangs_off_the_same_pinned_ark():
    """milanvlek.testcer: the ASVK (which signs VLEKs) is signed by the same pinned ARK-Milan."""
    from enclaveml.tee.verifiers.snp import TRUSTED_ARKS, _check_signed_by, _load_certs, _spki_sha256

    asvk, ark = _load_certs((SNP / "milanvlek.testcer").read_bytes())
    assert "VLEK" in asvk.subject.rfc4514_string() and TRUSTED_ARKS[_spki_sha256(ark)] == "Milan"
    _check_signed_by(ark, ark, "ARK")
    _check_signed_by(asvk, ark, "ASVK")
    ask, _ = _load_certs((SNP / "milan.testcer").read_bytes())
    with pytest.raises(EvidenceRejected):
        _check_signed_by(asvk, ask, "ASVK")  # not issued by the VCEK-signing ASK
