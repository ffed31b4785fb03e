"""The attestation policy file: TOML round trip, fail-closed validation, named rules."""

from __future__ import annotations

import pytest

from enclaveml.errors import UserInputError
from enclaveml.tee import Policy, load_policy, write_policy

M = "ab" * 32


def test_round_trip_through_toml(tmp_path):
    p = Policy(
        allowed_backends=["sgx", "tdx", "sim"],
        measurements={"sgx": [M], "tdx": ["cd" * 48]},
        sim_platform_keys=["ef" * 32],
        accepted_tcb_statuses=["UpToDate", "SWHardeningNeeded"],
        rejected_advisories=["INTEL-SA-00615"],
        max_age_s=60,
        sgx_mrsigners=["01" * 32],
        min_isv_svn=2,
        min_tee_tcb_svn="03" * 16,
        min_snp_tcb={"snp": 8, "microcode": 115},
        pccs_url="https://pccs.example.com/sgx/certification/v4/",
    )
    path = write_policy(p, tmp_path / "policy.toml")
    assert load_policy(path) == p
    assert load_policy(write_policy(Policy(), tmp_path / "default.toml")) == Policy()


def test_defaults_fail_closed():
    p = Policy()
    assert p.allowed_backends == ["sgx", "tdx", "sev-snp"]
    assert p.measurements == {} and p.accepted_tcb_statuses == ["UpToDate"]
    assert not p.allow_debug


def test_hex_is_normalised_to_lower_case():
    assert Policy(measurements={"sgx": [M.upper()]}).measurements["sgx"] == [M]


@pytest.mark.parametrize(
    "text, msg",
    [
        ('allowed_backend = ["sgx"]\n', "unknown policy field"),
        ('allowed_backends = ["nitro"]\n', "unknown type"),
        ('accepted_tcb_statuses = ["Fine"]\n', "unknown status"),
        ('[measurements]\nsgx = ["xyz"]\n', "not a hex string"),
        ('sim_platform_keys = ["abcd"]\n', "not 32 bytes"),
        ("max_age_s = -1\n", "positive integer"),
        ('[min_snp_tcb]\nfirmware = 1\n', "min_snp_tcb"),
        ('pccs_url = "http://plain.example"\n', "pccs_url"),
        ("allowed_backends = [\n", "not valid TOML"),
    ],
)
def test_bad_policy_files_are_user_errors(tmp_path, text, msg):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(UserInputError, match=msg):
        load_policy(f)


def test_missing_policy_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_policy(tmp_path / "nope.toml")


def test_the_documented_example_policy_loads(tmp_path):
    from conftest import ROOT

    doc = (ROOT / "docs" / "tee.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    f = tmp_path / "example.toml"
    f.write_text(block)
    p = load_policy(f)
    assert p.allowed_backends == ["sgx", "tdx"] and p.pccs_url == "intel" and p.min_isv_svn == 1
