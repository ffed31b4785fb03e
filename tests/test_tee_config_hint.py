"""A measurement refused because of the enclave configuration says so, with the fixing command (F-35).

`enclaveml serve --allow-factory F` runs a sim enclave whose measured configuration names F; a
client whose policy pins the plain measurement is refused. The refusal names the configuration
the evidence carries and the `enclaveml attest policy` command that makes the matching policy,
and running that very command gives a policy that accepts the enclave.
"""

from __future__ import annotations

import shlex

import pytest
import typer
from typer.testing import CliRunner

from enclaveml.errors import PolicyViolation
from enclaveml.models import servable
from enclaveml.tee import bind_report_data, commands, load_policy, verify_evidence
from enclaveml.tee.sim import SimBackend, sim_policy

FACTORY = "enclaveml.models.zoo.extraction:build"


def _evidence(tmp_path, config: dict, measurement: str | None = None):
    backend = SimBackend(config, platform_dir=tmp_path / "sim-platform", lock_memory=False)
    if measurement is not None:
        backend._measurement = measurement  # an enclave running other code
    rd = bind_report_data(b"\x01" * 32, b"nonce-0123456789")
    return backend.evidence(rd), rd


def test_configuration_mismatch_names_the_configuration_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCLAVEML_HOME", str(tmp_path))  # `attest policy` pins this platform
    ev, rd = _evidence(tmp_path, servable.enclave_config([FACTORY]))
    plain = sim_policy({}, tmp_path / "sim-platform")
    with pytest.raises(PolicyViolation) as ei:
        verify_evidence(ev, plain, rd)
    msg = str(ei.value)
    assert msg.startswith("policy rule measurements:")
    assert "because of the enclave configuration" in msg and FACTORY in msg
    command = msg.split("make the matching policy with: ", 1)[1]
    assert command.startswith(f"enclaveml attest policy --tee sim --allow-factory {FACTORY} ")

    # The command it shows, run as shown, writes a policy that accepts this enclave.
    argv = shlex.split(command.replace("POLICY.toml", str(tmp_path / "fixed.toml")))
    app = typer.Typer()
    app.callback()(lambda: None)
    commands.register(app)
    r = CliRunner().invoke(app, argv[1:])
    assert r.exit_code == 0, r.output
    assert verify_evidence(ev, load_policy(tmp_path / "fixed.toml"), rd).backend == "sim"


def test_other_code_is_told_apart_from_other_configuration(tmp_path):
    ev, rd = _evidence(tmp_path, {"custom": [1, 2]}, measurement="ab" * 32)
    with pytest.raises(PolicyViolation) as ei:
        verify_evidence(ev, sim_policy({}, tmp_path / "sim-platform"), rd)
    msg = str(ei.value)
    assert "other enclaveml code than this copy" in msg and '{"custom":[1,2]}' in msg
    assert "--config '{\"custom\":[1,2]}'" in msg


def test_a_matching_policy_needs_no_hint(tmp_path):
    ev, rd = _evidence(tmp_path, servable.enclave_config([FACTORY]))
    assert verify_evidence(ev, sim_policy(servable.enclave_config([FACTORY]), tmp_path / "sim-platform"), rd)
