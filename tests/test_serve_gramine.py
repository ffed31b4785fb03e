"""`enclaveml serve --tee gramine-sgx` without SGX: the dry run's manifest and commands, the one-line
error without the Gramine tools, and the launch path with stand-in Gramine tools that start the
worker as a plain process over the socket-path channel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx

from enclaveml.tee import gramine


from manifest_helpers import covered as _covered, fake_gramine_env, pkg_dir as _pkg_dir, render as _render


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enclaveml", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _no_gramine_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent  # keep python; drop anything that could hold Gramine
    return {**os.environ, "PATH": str(bin_dir), "ENCLAVEML_HOME": str(tmp_path / "home")}


def test_dry_run_writes_the_manifest_sized_from_the_assessment(tmp_path):
    assessment = {"model": "m", "recommended": 2, "points": [
        {"index": 1, "cost": {"weight_bytes": 1 << 30, "activation_bytes": 1 << 30}},
        {"index": 2, "cost": {"weight_bytes": 3 << 30, "activation_bytes": 0}},
    ]}
    (tmp_path / "assessment.json").write_text(json.dumps(assessment))
    gdir = tmp_path / "g"
    r = _cli(["serve", "--tee", "gramine-sgx", "--store", str(tmp_path / "store"), "--gramine-dir", str(gdir),
              "--cost", str(tmp_path / "assessment.json"), "--enclave-threads", "3", "--backnet-copy-mib", "0",
              "--signing-key", str(tmp_path / "key.pem"), "--dry-run"], env=_no_gramine_env(tmp_path))
    assert r.returncode == 0, r.stderr
    m = tomllib.loads(_render((gdir / "worker.manifest.template").read_text()))
    # the recommended point (2): 2 GiB runtime + 2 x 3 GiB + stacks -> 16G; threads = base + 3
    assert m["sgx"]["enclave_size"] == "16G" and m["sgx"]["max_threads"] == gramine.BASE_THREADS + 3
    assert m["sgx"]["debug"] is False and m["sgx"]["remote_attestation"] == "dcap"
    trusted = m["sgx"]["trusted_files"]
    python = Path(os.path.realpath(sys.executable))
    for needed in (python, _pkg_dir("enclaveml") / "serve" / "worker.py", _pkg_dir("torch") / "__init__.py"):
        assert _covered(needed, trusted), needed
    assert m["libos"]["entrypoint"] == str(python)
    sock = str(gdir.resolve() / "worker.sock")
    argv = m["loader"]["argv"]
    assert argv[1:3] == ["-m", "enclaveml.serve.worker"] and argv[argv.index("--tee") + 1] == "gramine-sgx"
    assert argv[argv.index("--channel-path") + 1] == sock and "--no-shm" in argv
    assert argv[argv.index("--threads") + 1] == "3"
    assert argv[argv.index("--backnet-copy-max-bytes") + 1] == "0"  # no second BackNet copy in a small EPC
    assert m["sgx"]["allowed_files"] == []
    # the exact commands that would run, in order, and no launch
    lines = r.stdout.splitlines()
    cmds = [ln for ln in lines if ln.startswith("(cd ")]
    assert len(cmds) == 3
    assert "gramine-manifest -Darch_libdir=/lib/x86_64-linux-gnu" in cmds[0] and "worker.manifest.template" in cmds[0]
    assert "gramine-sgx-sign --manifest" in cmds[1] and f"--key {tmp_path / 'key.pem'}" in cmds[1]
    assert cmds[2].endswith("&& gramine-sgx worker)")
    assert not (gdir / "worker.manifest").exists() and not Path(sock).exists()


def test_dry_run_without_a_cost_report_uses_the_defaults(tmp_path):
    r = _cli(["serve", "--tee", "gramine-sgx", "--store", str(tmp_path / "store"), "--dry-run"],
             env=_no_gramine_env(tmp_path))
    assert r.returncode == 0, r.stderr
    m = tomllib.loads(_render((tmp_path / "store" / "gramine" / "worker.manifest.template").read_text()))
    assert m["sgx"]["enclave_size"] == "4G" and m["sgx"]["max_threads"] == 16
    argv = m["loader"]["argv"]
    assert argv[argv.index("--backnet-copy-max-bytes") + 1] == str(16 << 20)  # placement.NCHW_COPY_MAX_BYTES


def test_without_the_gramine_tools_it_fails_with_one_line(tmp_path):
    r = _cli(["serve", "--tee", "gramine-sgx", "--store", str(tmp_path / "store")], env=_no_gramine_env(tmp_path))
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "gramine-manifest" in err[0] and "Traceback" not in r.stderr, r.stderr


def test_bad_cost_report_and_misplaced_options_fail_with_one_line(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"points": [], "recommended": None}))
    r = _cli(["serve", "--tee", "gramine-sgx", "--store", str(tmp_path / "s"), "--cost", str(tmp_path / "a.json"),
              "--dry-run"], env=_no_gramine_env(tmp_path))
    assert r.returncode == 2 and "recommended point" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["serve", "--tee", "sim", "--dry-run"], env=_no_gramine_env(tmp_path))
    assert r.returncode == 2 and "--tee gramine-sgx" in r.stderr
    r = _cli(["serve", "--backnet-copy-mib", "-1"], env=_no_gramine_env(tmp_path))
    assert r.returncode == 2 and "--backnet-copy-mib must be a finite number >= 0" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["serve", "--backnet-copy-mib", "nan"], env=_no_gramine_env(tmp_path))
    assert r.returncode == 2 and "--backnet-copy-mib must be a finite" in r.stderr and "Traceback" not in r.stderr


def test_serve_launches_the_signed_worker_over_the_socket_path(tmp_path):
    """The whole launch path (manifest, sign, `gramine-sgx worker`, socket-path channel) with
    stand-in tools; the worker itself is a plain process on the sim backend."""
    from enclaveml.serve.launcher import ServerProcess

    env = {**fake_gramine_env(tmp_path / "bin"), "ENCLAVEML_HOME": str(tmp_path / "home")}
    gdir = tmp_path / "g"
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", tee="gramine-sgx", env=env,
                       extra_args=["--gramine-dir", str(gdir), "--enclave-threads", "1"]) as srv:
        health = httpx.get(srv.url + "/healthz", timeout=60).json()
        assert health["status"] == "ok" and health["tee"] == "gramine-sgx"
        worker = srv.enclave_pid()
        assert worker != srv.pid
        cmdline = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
        assert b"--channel-path" in cmdline and b"--no-shm" in cmdline
    assert (gdir / "worker.manifest.sgx").exists() and not (gdir / "worker.sock").exists()
    assert "MRENCLAVE " + bytes(range(32)).hex() in (tmp_path / "server.log").read_text()
