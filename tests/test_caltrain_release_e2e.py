"""Train -> deploy -> infer with no conversion: a CalTrain release is a bundle `enclaveml deploy` takes.

Real processes throughout: `enclaveml train serve` (host + training enclave worker), participants
uploading real CIFAR-10 images, the owner's `train run` whose release writes the bundle, then
`enclaveml serve` (host + serving enclave), `attest pin`, `deploy` and `infer` as CLI
subprocesses. The served predictions must equal the released model's own, run locally.

Two runs: a zoo spec on CIFAR-10's ten classes (issue 10), and a user's own graph model
(`enclaveml.models.examples:resnet_cifar`, residual blocks, its own `forward()`) on three class
names the owner declares in the plan, allowed in the training enclave's measured configuration
because the plan fixes it, and in the serving enclave's by `serve --allow-factory` (issue 11).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from enclaveml.keyfiles import load_or_create_signing_key
from enclaveml.data.preprocess import Preprocessing
from enclaveml.models.bundle import load_manifest
from enclaveml.serve.launcher import ServerProcess, server_env, snapshot_package
from enclaveml.tee import write_policy
from enclaveml.tee.sim import sim_policy
from enclaveml.train.client import HostClient
from enclaveml.train.enclave import enclave_config
from enclaveml.train.owner import released_model, run
from enclaveml.train.partitioned import TrainConfig
from enclaveml.train.plan import TrainingPlan

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "enclaveml.models.examples:resnet_cifar"
USER_MODEL = f"{FACTORY}:num_classes=3:width=4"
OWNER_CLASSES = ["airplane", "cat", "ship"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainServer:
    """`enclaveml train serve` in its own process group (stopped by that group's id)."""

    def __init__(self, base: Path, args: list[str]):
        self.home = base / "train-home"
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "ENCLAVEML_HOME": str(self.home), "PYTHONPATH": str(ROOT / "src"),
               "OMP_NUM_THREADS": "1"}
        self.log_path = base / "train-serve.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "enclaveml", "train", "serve", "--store",
                                      str(base / "train-store"), "--port", self.url.rsplit(":", 1)[1], *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        c = HostClient(self.url, timeout=5)
        try:
            for _ in range(300):
                try:
                    c.get("/info")
                    return
                except Exception:
                    if self.proc.poll() is not None:
                        raise RuntimeError(self.log_path.read_text())
                    time.sleep(0.2)
        finally:
            c.close()

    def measurement(self) -> str:
        from enclaveml.tee import Evidence, verify_claims_only

        c = HostClient(self.url)
        try:
            body = c.get("/evidence", nonce=os.urandom(32).hex()).json()
        finally:
            c.close()
        return verify_claims_only(Evidence.from_dict(body["evidence"])).measurement

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the host and its enclave worker: the group we started
        self.proc.wait(timeout=30)
        self.log.close()


def _copy_classes(src: Path, dst: Path, classes: list[str], per_class: int, offset: int) -> Path:
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for p in sorted((src / c).glob("*.jpg"))[offset:offset + per_class]:
            shutil.copy(p, dst / c / p.name)
    return dst


def _cli(*args: str, env: dict, timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, "-m", "enclaveml", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def _train_and_release(base: Path, cifar: Path, classes: list[str], serve_args: list[str], model: str | None,
                       expect_factories: tuple[str, ...]) -> dict:
    """Participants upload, the owner trains and releases; returns the release answer."""
    from enclaveml.train.participant import contribute

    owner_key = base / "owner.key"
    owner = load_or_create_signing_key(owner_key)
    srv = TrainServer(base, ["--owner", owner.public_key().to_bytes().hex(), *serve_args])
    try:
        from enclaveml.tee.sim import expected_sim_measurement

        m = srv.measurement()
        # the measured configuration names the owner and exactly the factories it may build
        assert m == expected_sim_measurement(enclave_config(owner.public_key(), expect_factories), root=ROOT / "src" / "enclaveml")
        policy = base / "train-policy.toml"
        write_policy(sim_policy(enclave_config(owner.public_key(), expect_factories),
                                platform_dir=srv.home / "sim-platform", measurements={"sim": [m]}), policy)
        for i in range(2):
            data = _copy_classes(cifar / "train", base / f"p{i}", classes, 6, 6 * i)
            rep = contribute(data, srv.url, policy, base / f"p{i}.key")
            assert rep.counts["accepted"] == 6 * len(classes)
        cfg = TrainConfig(epochs=2, batch=12, lr=0.05, seed=3)
        res = run(srv.url, policy, model, 3, cfg, owner_key, base / "released", run_id="release-e2e",
                  checkpoint_every=100, poll=0.1)
    finally:
        srv.stop()
    assert res["state"] == "done" and res["instances"] == 12 * len(classes)
    return res


def _serve_deploy_infer(base: Path, cifar: Path, res: dict, classes: list[str], allow: list[str]) -> None:
    bundle = Path(res["bundle"])
    manifest = load_manifest(bundle)
    assert manifest.name == "release-e2e" and manifest.k == 3 and manifest.num_classes == len(classes)
    assert sorted(p.name for p in bundle.iterdir()) == ["backnet.safetensors", "classmap.sealed", "frontnet.sealed",
                                                       "manifest.json", "manifest.sig"]
    assert Path(res["model_key"]) == bundle.with_name("bundle.modelkey")
    assert oct(Path(res["model_key"]).stat().st_mode & 0o777) == "0o600"

    home = base / "serve-home"
    pkg = snapshot_package(base / "pkg")
    env = {**server_env(home, pkg), "OMP_NUM_THREADS": "1"}
    extra = [a for f in allow for a in ("--allow-factory", f)]
    srv = ServerProcess(base / "serve-store", base / "serve.log", env=env, extra_args=extra).start()
    try:
        policy = base / "serve-policy.toml"
        _cli("attest", "policy", "--tee", "sim", *extra, "--out", str(policy), env=env)  # as serve measures it
        _cli("attest", "pin", str(bundle), "--policy", str(policy), env=env)
        out = _cli("deploy", str(bundle), "--url", srv.url, "--policy", str(policy),
                   "--owner-key", str(base / "owner.key"), env=env)
        assert "deployed release-e2e" in out and "k=3" in out
        images = [p for c in classes for p in sorted((cifar / "test" / c).glob("*.jpg"))[:3]]
        out = _cli("infer", *map(str, images), "--url", srv.url, "--policy", str(policy), "--model", "release-e2e",
                   "--top-k", str(len(classes)), "--json", env=env)
    finally:
        srv.stop()
    served = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(served) == len(images)

    model, meta = released_model(base / "released")  # the released model, run here, whole
    pre = Preprocessing.from_dict(meta["preprocessing"])
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([pre(p.read_bytes()) for p in images])), dim=1)
    for r, row in zip(served, probs):
        assert [t["label"] for t in r["top"]] == [classes[i] for i in row.argsort(descending=True).tolist()]
        assert abs(r["top"][0]["score"] - float(row.max())) < 1e-4


@pytest.mark.slow
@pytest.mark.extended  # the user-graph test below covers train -> release -> deploy -> infer
def test_zoo_release_deploys_and_serves_its_own_predictions(tmp_path, cifar10_dir):
    classes = sorted(p.name for p in (cifar10_dir / "train").iterdir())
    res = _train_and_release(tmp_path, cifar10_dir, classes, [], "darknet:width=4", ())
    assert json.loads((tmp_path / "released" / "model.json").read_text())["arch"] == \
        {"zoo": "darknet", "kwargs": {"width": 4}}
    _serve_deploy_infer(tmp_path, cifar10_dir, res, classes, [])


@pytest.mark.slow
def test_user_graph_model_on_owner_classes_trains_releases_and_serves(tmp_path, cifar10_dir):
    owner = load_or_create_signing_key(tmp_path / "owner.key")
    plan = TrainingPlan.build(owner.public_key(), "darknet", OWNER_CLASSES, USER_MODEL, 3)
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    res = _train_and_release(tmp_path, cifar10_dir, OWNER_CLASSES, ["--plan", str(tmp_path / "plan.json")], None,
                             (FACTORY,))
    meta = json.loads((tmp_path / "released" / "model.json").read_text())
    assert meta["arch"] == {"factory": FACTORY, "kwargs": {"num_classes": 3, "width": 4}}
    assert meta["classes"] == OWNER_CLASSES
    _serve_deploy_infer(tmp_path, cifar10_dir, res, OWNER_CLASSES, [FACTORY])
