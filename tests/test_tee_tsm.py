"""The tsm backend's configfs-tsm file protocol, against a temp directory standing in for
/sys/kernel/config/tsm/report, answering with the real TDX quote and SEV-SNP report."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import ATTESTATION

from enclaveml.errors import EvidenceRejected, UserInputError
from enclaveml.tee import bind_report_data, get_backend, verify_claims_only
from enclaveml.tee import tsm

pytestmark = pytest.mark.skipif(not ATTESTATION.is_dir(), reason="attestation test vectors not beside this checkout")
SNP = ATTESTATION / "sev-snp"


class FakeConfigfs:
    """The kernel side: mkdir creates the attribute files; writes to inblob bump generation."""

    def __init__(self, provider: str, outblob: bytes, auxblob: bytes | None = None, extra_writes: int = 0):
        self.provider, self.outblob, self.auxblob, self.extra = provider, outblob, auxblob, extra_writes
        self.entries: list[Path] = []
        self.inblobs: list[bytes] = []

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        (path / "provider").write_text(self.provider + "\n")
        (path / "outblob").write_bytes(self.outblob)
        (path / "generation").write_text(f"{1 + self.extra}\n")
        if self.auxblob is not None:
            (path / "auxblob").write_bytes(self.auxblob)
        self.entries.append(path)

    def rmdir(self, path: Path) -> None:
        self.inblobs.append((path / "inblob").read_bytes())
        shutil.rmtree(path)


@pytest.fixture()
def fake(monkeypatch):
    def install(*a, **kw) -> FakeConfigfs:
        f = FakeConfigfs(*a, **kw)
        monkeypatch.setattr(tsm, "_mkdir", f.mkdir)
        monkeypatch.setattr(tsm, "_rmdir", f.rmdir)
        return f

    return install


def test_tdx_through_configfs(tmp_path, fake):
    quote = (ATTESTATION / "tdx" / "tdx_quote").read_bytes()
    f = fake("tdx_guest", quote)
    be = get_backend("tsm", root=tmp_path, lock_memory=False)
    rd = bind_report_data(b"\x01" * 32, b"n")
    ev = be.evidence(rd)
    assert ev.backend == "tdx" and ev.quote == quote and ev.collateral is None
    assert f.inblobs == [rd] and f.entries[0].parent == tmp_path and not f.entries[0].exists()
    assert be.measurement() == "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    assert f.inblobs[-1] == bytes(64)


def test_snp_through_configfs_with_host_certificates(tmp_path, fake):
    report = (SNP / "attestation.bin").read_bytes()
    aux = tsm.build_cert_table({"VCEK": (SNP / "vcek.testcer").read_bytes()})
    assert tsm.parse_cert_table(aux) == {"VCEK": (SNP / "vcek.testcer").read_bytes()}
    fake("sev_guest", report, aux)
    be = get_backend("tsm", root=tmp_path, snp_chain=SNP / "milan.testcer", lock_memory=False)
    ev = be.evidence(bytes(64))
    assert ev.backend == "sev-snp" and ev.quote == report
    c = verify_claims_only(ev, datetime(2026, 1, 1, tzinfo=timezone.utc))  # the attached chain verifies
    assert c.measurement == be.measurement()
    # without the ASK/ARK the evidence cannot be verified
    fake("sev_guest", report, aux)
    ev2 = get_backend("tsm", root=tmp_path, lock_memory=False).evidence(bytes(64))
    with pytest.raises(EvidenceRejected):
        verify_claims_only(ev2, datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_raced_or_unknown_provider_or_missing_configfs(tmp_path, fake):
    fake("tdx_guest", b"q", extra_writes=1)
    with pytest.raises(UserInputError, match="raced"):
        get_backend("tsm", root=tmp_path).evidence(bytes(64))
    fake("arm_cca_guest", b"q")
    with pytest.raises(UserInputError, match="unknown provider"):
        get_backend("tsm", root=tmp_path).evidence(bytes(64))
    with pytest.raises(UserInputError, match="Linux 6.7"):
        get_backend("tsm", root=tmp_path / "absent").evidence(bytes(64))
    with pytest.raises(ValueError):
        get_backend("tsm", root=tmp_path).evidence(bytes(10))
