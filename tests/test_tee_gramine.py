"""The gramine-sgx backend without SGX: the generated manifest, sizing, SIGSTRUCT parsing, and the
/dev/attestation file protocol against a temp directory."""

from __future__ import annotations

import hashlib
import os
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ATTESTATION

from enclaveml.errors import UserInputError
from enclaveml.tee import bind_report_data, get_backend, verify_claims_only
from enclaveml.tee import gramine


from manifest_helpers import covered as _covered, pkg_dir as _pkg_dir, render as _render


def test_manifest_is_well_formed_and_lists_what_the_worker_needs(tmp_path):
    text = gramine.generate_manifest(enclave_size="8G", max_threads=12, allowed_files=["file:/srv/store/"], state_dir=tmp_path)
    tomllib.loads(text)  # the template itself is TOML (all Jinja expressions sit inside strings)
    m = tomllib.loads(_render(text))
    sgx = m["sgx"]
    assert sgx["debug"] is False and sgx["remote_attestation"] == "dcap"
    assert sgx["enclave_size"] == "8G" and sgx["max_threads"] == 12
    assert sgx["allowed_files"] == ["file:/srv/store/"]
    trusted = sgx["trusted_files"]
    python = Path(os.path.realpath(sys.executable))
    assert m["libos"]["entrypoint"] == str(python)
    for needed in (python, _pkg_dir("enclaveml") / "tee" / "gramine.py", _pkg_dir("torch") / "__init__.py",
                   Path(os.__file__).resolve(), _pkg_dir("cryptography"), _pkg_dir("numpy")):
        assert _covered(needed, trusted), f"{needed} is not a trusted file"
    assert "file:/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so" in trusted
    # the worker's command line and environment are fixed in the (measured) manifest
    assert m["loader"]["argv"][1:4] == ["-m", "enclaveml.serve.worker", "--tee"]
    assert "insecure__use_cmdline_argv" not in m["loader"] and "insecure__use_host_env" not in m["loader"]
    env = m["loader"]["env"]
    assert str(_pkg_dir("enclaveml").parent) in env["PYTHONPATH"].split(":")
    mounts = {x["path"]: x for x in m["fs"]["mounts"]}
    assert mounts[gramine.SEALED_DIR]["type"] == "encrypted" and mounts[gramine.SEALED_DIR]["key_name"] == "_sgx_mrenclave"
    assert all(str(p) in mounts for p in [python])


def test_manifest_refuses_bad_sizes():
    with pytest.raises(UserInputError, match="power of two"):
        gramine.generate_manifest(enclave_size="3G")
    with pytest.raises(UserInputError):
        gramine.generate_manifest(enclave_size="lots")


def test_sizing_from_a_cost_report():
    assert gramine.enclave_size_for(0, 1) == "4G"  # 2 GiB runtime + stacks -> next power of two
    assert gramine.enclave_size_for(3 << 30, 1) == "16G"
    assert gramine.enclave_size_for(100 << 20, 2, runtime_bytes=256 << 20) == "512M"
    cost = {"frontnet_param_bytes": 20 << 20, "peak_activation_bytes": 30 << 20, "threads": 4}
    assert gramine.sizing_from_cost(cost) == (50 << 20, 4)
    m = tomllib.loads(_render(gramine.manifest_for_cost(cost)))
    assert m["sgx"]["enclave_size"] == "4G" and m["sgx"]["max_threads"] == gramine.BASE_THREADS + 4
    with pytest.raises(UserInputError, match="cost report"):
        gramine.sizing_from_cost({"flops": 1})


def test_tools_absent_is_a_clear_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gramine.missing_tools() == list(gramine.TOOLS)
    with pytest.raises(UserInputError, match=r"needs the Gramine tools .*\(see docs/tee.md"):
        gramine.build_and_launch(tmp_path / "build")


def test_sigstruct_fields():
    sig = bytearray(1808)
    sig[128:512] = bytes(range(256)) + bytes(128)
    sig[960:992] = bytes.fromhex("33" * 32)
    sig[1024:1028] = (7).to_bytes(2, "little") + (3).to_bytes(2, "little")
    info = gramine.read_sigstruct(bytes(sig))
    assert info["mrenclave"] == "33" * 32 and info["mrsigner"] == hashlib.sha256(bytes(sig[128:512])).hexdigest()
    assert info["isv_prod_id"] == 7 and info["isv_svn"] == 3 and info["debug"] is False
    with pytest.raises(UserInputError):
        gramine.read_sigstruct(b"short")


@pytest.fixture()
def attestation_dir(tmp_path):
    """A temp directory standing in for Gramine's /dev/attestation, holding the real SGX quote."""
    d = tmp_path / "attestation"
    (d / "keys").mkdir(parents=True)
    (d / "attestation_type").write_text("dcap")
    (d / "quote").write_bytes((ATTESTATION / "sgx" / "sgx_quote").read_bytes())
    (d / "keys" / "_sgx_mrenclave").write_bytes(bytes(range(16)))
    (d / "my_target_info").write_bytes(bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb") + bytes(480))
    return d


@pytest.mark.skipif(not ATTESTATION.is_dir(), reason="attestation test vectors not beside this checkout")
def test_gramine_backend_file_protocol(attestation_dir):
    be = get_backend("gramine-sgx", attestation_dir=attestation_dir)
    rd = bind_report_data(b"\x07" * 32, b"nonce")
    ev = be.evidence(rd)
    assert (attestation_dir / "user_report_data").read_bytes() == rd  # what Gramine would put in REPORTDATA
    assert ev.backend == "sgx" and ev.quote == (ATTESTATION / "sgx" / "sgx_quote").read_bytes()
    ev = type(ev)("sgx", ev.quote, (ATTESTATION / "sgx" / "sgx_quote_collateral.json").read_bytes())
    from datetime import datetime, timezone

    assert verify_claims_only(ev, datetime(2025, 7, 4, tzinfo=timezone.utc)).measurement == be.measurement()
    k = be.sealing_key(b"model")
    assert len(k) == 32 and k != be.sealing_key(b"other") and k == be.sealing_key(b"model")
    (attestation_dir / "keys" / "_sgx_mrenclave").write_bytes(bytes(16))
    assert be.sealing_key(b"model") != k  # another enclave or CPU: another key
    assert be.harden()["attestation_type"] == "dcap"


def test_gramine_backend_outside_gramine_says_so(tmp_path):
    be = get_backend("gramine-sgx", attestation_dir=tmp_path / "none")
    with pytest.raises(UserInputError, match="inside Gramine"):
        be.evidence(bytes(64))
    (tmp_path / "epid").mkdir()
    (tmp_path / "epid" / "attestation_type").write_text("epid")
    with pytest.raises(UserInputError, match="want 'dcap'"):
        get_backend("gramine-sgx", attestation_dir=tmp_path / "epid").evidence(bytes(64))
