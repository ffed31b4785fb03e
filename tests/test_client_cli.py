"""The owner's and client's command line against a real server: partition, policy, deploy, infer,
undeploy, and one clear line + exit 2 when the evidence fails the policy. (The SDK under these
commands is tested in depth, bad inputs included, by test_serve_e2e.py; each CLI run costs an
interpreter start, so this file stays short.)"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx


from enclaveml.serve.launcher import ServerProcess, server_env, snapshot_package


def _cli(env, *args, ok=True):
    r = subprocess.run([sys.executable, "-m", "enclaveml", *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=180)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def test_deploy_infer_undeploy_from_the_command_line(tmp_path, cifar10_dir):
    home = tmp_path / "home"
    pkg = snapshot_package(tmp_path / "pkg")
    env = {**server_env(home, pkg), "OMP_NUM_THREADS": "1"}
    bundle = tmp_path / "bundle"
    _cli(env, "partition", "darknet", "--at", "4", "--untrained", "--out", bundle)
    assert (tmp_path / "bundle.modelkey").exists() and (home / "owner.key").exists()
    _cli(env, "attest", "policy", "--tee", "sim", "--model", bundle, "--out", tmp_path / "policy.toml")
    images = sorted((cifar10_dir / "test" / "ship").glob("*.jpg"))[:2]
    with ServerProcess(tmp_path / "store", tmp_path / "server.log", env=env) as srv:
        out = _cli(env, "deploy", bundle, "--url", srv.url, "--policy", tmp_path / "policy.toml").stdout
        assert "deployed darknet" in out and "k=4" in out
        res = _cli(env, "infer", *images, "--url", srv.url, "--policy", tmp_path / "policy.toml", "--json",
                   "--top-k", "2").stdout.splitlines()
        assert len(res) == 2
        for line, img in zip(res, images):
            r = json.loads(line)
            assert r["image"] == str(img) and r["model"] == "darknet" and len(r["top"]) == 2
        # Evidence failing the policy: one line, exit 2, nothing sent.
        bad = (tmp_path / "policy.toml").read_text().replace('"sim"]', '"sgx"]', 1)
        (tmp_path / "bad.toml").write_text(bad)
        r = _cli(env, "infer", images[0], "--url", srv.url, "--policy", tmp_path / "bad.toml", ok=False)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert "deleted darknet" in _cli(env, "undeploy", "darknet", "--url", srv.url, "--policy",
                                         tmp_path / "policy.toml").stdout
        assert not any(m.endswith("/darknet") for m in httpx.get(srv.url + "/healthz").json()["models"])


def test_cli_reports_an_unreachable_server(tmp_path):
    env = server_env(tmp_path / "home")
    (tmp_path / "p.toml").write_text('allowed_backends = ["sim"]\n')
    (tmp_path / "x.png").write_bytes(b"x")
    r = _cli(env, "infer", tmp_path / "x.png", "--url", "http://127.0.0.1:9", "--policy", tmp_path / "p.toml", ok=False)
    assert r.returncode == 2 and "cannot reach" in r.stderr
