"""`enclaveml attest ...` on the real test vectors and on sim evidence (a fresh app: only our commands)."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import ATTESTATION
from typer.testing import CliRunner

from enclaveml.errors import EvidenceRejected, PolicyViolation, UserInputError
from enclaveml.tee import commands
from enclaveml.tee.sim import expected_sim_measurement, sim_platform_public_key


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def _root() -> None:
        pass

    commands.register(a)
    return a


def run(app, *args: str):
    return CliRunner().invoke(app, ["attest", *map(str, args)])


needs_vectors = pytest.mark.skipif(not ATTESTATION.is_dir(), reason="attestation test vectors not beside this checkout")


def test_measure_and_policy_pin_the_local_sim(app, tmp_path):
    r = run(app, "measure", "--tee", "sim", "--config", '{"model": "m"}')
    assert r.exit_code == 0 and r.output.strip() == expected_sim_measurement({"model": "m"})
    out = tmp_path / "policy.toml"
    r = run(app, "policy", "--tee", "sim", "--config", '{"model": "m"}', "--out", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert expected_sim_measurement({"model": "m"}) in text and sim_platform_public_key().hex() in text
    r = run(app, "measure", "--tee", "tsm")
    assert isinstance(r.exception, UserInputError)


def test_sim_evidence_round_trip_through_the_cli(app, tmp_path):
    pol, ev = tmp_path / "p.toml", tmp_path / "ev.json"
    assert run(app, "policy", "--out", pol).exit_code == 0
    rd = "ab" * 64
    assert run(app, "evidence", "--report-data", rd, "--out", ev).exit_code == 0
    r = run(app, "verify", ev, "--policy", pol, "--report-data", rd, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["verified"] and doc["claims"]["backend"] == "sim" and doc["claims"]["report_data"] == rd
    # the raw sim quote works too, type detected
    raw = tmp_path / "quote.bin"
    import base64

    raw.write_bytes(base64.b64decode(json.loads(ev.read_text())["quote"]))
    assert run(app, "verify", raw, "--policy", pol).exit_code == 0
    r = run(app, "verify", ev, "--policy", pol, "--report-data", "cd" * 64, "--json")
    assert r.exit_code == 2 and json.loads(r.output)["error"] == "EvidenceRejected"
    other = tmp_path / "other.toml"
    assert run(app, "policy", "--config", '{"x": 1}', "--out", other).exit_code == 0
    r = run(app, "verify", ev, "--policy", other)
    assert isinstance(r.exception, PolicyViolation) and "policy rule measurements" in str(r.exception)


@needs_vectors
def test_verify_sgx_by_hand(app):
    q, c = ATTESTATION / "sgx" / "sgx_quote", ATTESTATION / "sgx" / "sgx_quote_collateral.json"
    r = run(app, "verify", q, "--collateral", c, "--now", "2025-07-04T00:00:00Z")
    assert r.exit_code == 0, r.output
    assert "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb" in r.output
    assert "ConfigurationAndSWHardeningNeeded" in r.output
    r = run(app, "verify", q, "--collateral", c, "--now", "2025-07-04T00:00:00Z", "--json")
    assert json.loads(r.output)["claims"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    r = run(app, "verify", q, "--collateral", c, "--now", "2030-01-01T00:00:00Z")
    assert isinstance(r.exception, EvidenceRejected)
    r = run(app, "verify", q, "--collateral", c)  # the wall clock: long after this collateral expired
    assert isinstance(r.exception, EvidenceRejected) and "pin the clock with --now" in str(r.exception)


@needs_vectors
def test_verify_refusals_name_the_rule(app, tmp_path):
    pol = tmp_path / "sgx.toml"
    pol.write_text('allowed_backends = ["sgx"]\n[measurements]\nsgx = ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]\n')
    r = run(app, "verify", ATTESTATION / "sgx" / "sgx_quote", "--collateral", ATTESTATION / "sgx" / "sgx_quote_collateral.json",
            "--policy", pol, "--now", "2025-07-04T00:00:00Z", "--json")
    assert r.exit_code == 2
    doc = json.loads(r.output)
    assert doc["error"] == "PolicyViolation" and doc["reason"].startswith(
        "policy rule accepted_tcb_statuses: TCB status ConfigurationAndSWHardeningNeeded is not in [UpToDate]")
    r = run(app, "verify", ATTESTATION / "tdx" / "tdx_quote_outdated", "--collateral",
            ATTESTATION / "tdx" / "tdx_quote_outdated_collateral.json", "--now", "2026-03-04T00:00:00Z", "--json")
    assert r.exit_code == 2 and "No matching TCB level found" in json.loads(r.output)["reason"]


@needs_vectors
def test_verify_tdx_and_snp_by_hand(app):
    r = run(app, "verify", ATTESTATION / "tdx" / "tdx_quote", "--collateral", ATTESTATION / "tdx" / "tdx_quote_collateral.json",
            "--now", "2025-07-04T00:00:00Z", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["claims"]["tcb_status"] == "UpToDate"
    snp = ATTESTATION / "sev-snp"
    r = run(app, "verify", snp / "attestation.bin", "--collateral", snp / "vcek.testcer", "--collateral", snp / "milan.testcer",
            "--now", "2026-01-01T00:00:00Z", "--json", "--report-data", "0102030405" + "00" * 59)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["claims"]["measurement"].startswith("b07af962")


def test_bad_inputs_are_user_errors(app, tmp_path):
    f = tmp_path / "junk.bin"
    f.write_bytes(b"\x00" * 100)
    assert isinstance(run(app, "verify", f).exception, UserInputError)
    assert isinstance(run(app, "verify", tmp_path / "missing").exception, UserInputError)
    assert isinstance(run(app, "verify", f, "--type", "sim", "--now", "yesterday").exception, UserInputError)


def test_policy_names_the_hpke_suite(app, tmp_path):
    from enclaveml.tee import load_policy

    out = tmp_path / "policy.toml"
    r = run(app, "policy", "--tee", "sim", "--suite", "mlkem768-x25519", "--out", out)
    assert r.exit_code == 0, r.output
    assert load_policy(out).suite_for("any") == "mlkem768-x25519"
    assert isinstance(run(app, "policy", "--tee", "sim", "--suite", "rsa").exception, UserInputError)
