"""The simulated TEE: evidence, report-data binding, sealing, hardening and its verifier with a policy."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclaveml import paths
from enclaveml.errors import EvidenceRejected, PolicyViolation, UserInputError
from enclaveml.tee import Evidence, Policy, bind_report_data, get_backend, verify_evidence
from enclaveml.tee import sim_evidence
from enclaveml.tee.sim import expected_sim_measurement, sim_platform_public_key, sim_policy

CONFIG = {"model": "darknet-cifar10", "split": 3}
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture()
def rd() -> bytes:
    return bind_report_data(b"\x11" * 32, b"nonce-0123456789")


@pytest.fixture()
def backend():
    return get_backend("sim", config=CONFIG, clock=lambda: T0)


def test_bind_report_data_is_sha256_of_key_and_nonce_then_zeros():
    out = bind_report_data(b"K" * 32, b"N" * 16)
    assert len(out) == 64
    assert out[:32] == hashlib.sha256(b"K" * 32 + b"N" * 16).digest()
    assert out[32:] == bytes(32)
    assert bind_report_data(b"K" * 32, b"M" * 16) != out


def test_evidence_dict_round_trip_is_json_safe(backend, rd):
    ev = backend.evidence(rd)
    d = json.loads(json.dumps(ev.to_dict()))
    assert Evidence.from_dict(d) == ev
    with pytest.raises(EvidenceRejected):
        Evidence.from_dict({"backend": "sim", "quote": "not base64!!"})
    with pytest.raises(EvidenceRejected):
        Evidence.from_dict({"backend": "nitro", "quote": "AAAA"})
    with pytest.raises(EvidenceRejected):
        Evidence.from_dict(["sim"])


def test_sim_evidence_verifies_and_says_what_it_is(backend, rd):
    ev = backend.evidence(rd)
    claims = verify_evidence(ev, sim_policy(CONFIG), rd, now=T0 + timedelta(seconds=5))
    assert claims.backend == "sim"
    assert claims.measurement == expected_sim_measurement(CONFIG) == backend.measurement()
    assert claims.report_data == rd
    assert claims.timestamp == T0
    assert claims.tcb_status == "Simulated"
    assert claims.details["platform_key"] == sim_platform_public_key().hex()
    assert claims.details["config"] == CONFIG
    assert json.dumps(claims.to_dict())


def test_every_flipped_byte_is_rejected(backend, rd):
    quote = backend.evidence(rd).quote
    policy = sim_policy(CONFIG)
    for i in range(len(quote)):
        bad = bytearray(quote)
        bad[i] ^= 0x01
        with pytest.raises(EvidenceRejected):
            verify_evidence(Evidence("sim", bytes(bad)), policy, rd, now=T0)


def test_resigned_with_another_key_is_refused_by_the_pinned_platform_key(backend, rd):
    doc = json.loads(backend.evidence(rd).quote)
    other = Ed25519PrivateKey.generate()
    doc["body"]["platform_key"] = other.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    sig = other.sign(sim_evidence.signed_message(doc["body"]))
    forged = Evidence("sim", sim_evidence.encode_quote(doc["body"], sig))
    with pytest.raises(PolicyViolation, match="policy rule sim_platform_keys"):
        verify_evidence(forged, sim_policy(CONFIG), rd, now=T0)
    # and the original key's signature cannot be kept while changing the key field
    doc2 = json.loads(backend.evidence(rd).quote)
    doc2["body"]["platform_key"] = doc["body"]["platform_key"]
    with pytest.raises(EvidenceRejected, match="signature"):
        verify_evidence(Evidence("sim", sim_evidence.encode_quote(doc2["body"], bytes.fromhex(doc2["signature"]))), sim_policy(CONFIG), rd, now=T0)


def test_wrong_report_data_is_rejected(backend, rd):
    ev = backend.evidence(rd)
    with pytest.raises(EvidenceRejected, match="report data"):
        verify_evidence(ev, sim_policy(CONFIG), bind_report_data(b"\x11" * 32, b"another nonce..."), now=T0)


def test_wrong_measurement_is_a_named_policy_violation(backend, rd):
    ev = backend.evidence(rd)
    with pytest.raises(PolicyViolation, match="policy rule measurements: sim measurement [0-9a-f]{64} is not in"):
        verify_evidence(ev, sim_policy({"model": "other"}), rd, now=T0)
    no_pin = sim_policy(CONFIG, measurements={})
    with pytest.raises(PolicyViolation, match="no measurement is pinned for sim"):
        verify_evidence(ev, no_pin, rd, now=T0)


def test_default_policy_refuses_sim(backend, rd):
    with pytest.raises(PolicyViolation, match="policy rule allowed_backends: evidence type sim is not in"):
        verify_evidence(backend.evidence(rd), Policy(measurements={"sim": [backend.measurement()]}), rd, now=T0)


def test_untrusted_platform_is_refused(tmp_path, rd):
    other = get_backend("sim", config=CONFIG, platform_dir=tmp_path / "elsewhere", clock=lambda: T0)
    with pytest.raises(PolicyViolation, match="policy rule sim_platform_keys"):
        verify_evidence(other.evidence(rd), sim_policy(CONFIG), rd, now=T0)


def test_stale_and_future_evidence_is_refused(backend, rd):
    ev = backend.evidence(rd)
    pol = sim_policy(CONFIG, max_age_s=300)
    verify_evidence(ev, pol, rd, now=T0 + timedelta(seconds=299))
    with pytest.raises(PolicyViolation, match="policy rule max_age_s: evidence is 301 s old"):
        verify_evidence(ev, pol, rd, now=T0 + timedelta(seconds=301))
    with pytest.raises(PolicyViolation, match="in the future"):
        verify_evidence(ev, pol, rd, now=T0 - timedelta(minutes=5))


def test_measurement_covers_code_and_config(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    (pkg / "notes.txt").write_text("not code")
    base = expected_sim_measurement({}, root=pkg)
    assert len(base) == 64 and base == expected_sim_measurement(None, root=pkg)
    (pkg / "notes.txt").write_text("still not code")
    assert expected_sim_measurement({}, root=pkg) == base
    assert expected_sim_measurement({"x": 1}, root=pkg) != base
    (pkg / "sub" / "b.py").write_text("B = 3\n")
    assert expected_sim_measurement({}, root=pkg) != base
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "c.py")
    assert expected_sim_measurement({}, root=pkg) != base


def test_platform_key_is_private_and_stable(tmp_path):
    d = paths.home() / "sim-platform"
    k1 = sim_platform_public_key()
    files = [p for p in d.iterdir() if not p.name.startswith(".")]
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert sim_platform_public_key() == k1
    assert sim_platform_public_key(tmp_path / "p2") != k1
    loose = next((tmp_path / "p2").iterdir())
    loose.chmod(0o644)
    with pytest.raises(UserInputError, match="readable by others"):
        sim_platform_public_key(tmp_path / "p2")


def test_sealing_key_binds_platform_code_and_label(tmp_path):
    a = get_backend("sim", config=CONFIG)
    k = a.sealing_key(b"model-keys")
    assert len(k) == 32 and k == get_backend("sim", config=CONFIG).sealing_key(b"model-keys")
    assert a.sealing_key(b"other") != k
    assert get_backend("sim", config={"model": "other"}).sealing_key(b"model-keys") != k
    assert get_backend("sim", config=CONFIG, platform_dir=tmp_path).sealing_key(b"model-keys") != k


def test_unknown_backend_is_user_error():
    with pytest.raises(UserInputError, match="unknown TEE backend"):
        get_backend("nitro")


def test_harden_in_a_child_process():
    code = (
        "import json, resource, ctypes, ctypes.util\n"
        "from enclaveml.tee import get_backend\n"
        "r = get_backend('sim').harden()\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "r['_dumpable_now'] = libc.prctl(3, 0, 0, 0, 0)\n"
        "r['_core'] = resource.getrlimit(resource.RLIMIT_CORE)\n"
        "print(json.dumps(r))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["backend"] == "sim"
    assert r["non_dumpable"] == "applied" and r["_dumpable_now"] == 0
    assert r["no_core_files"] == "applied" and r["_core"] == [0, 0]
    assert r["memory_locked"].split(":")[0].split(" ")[0] in {"applied", "skipped", "failed"}
