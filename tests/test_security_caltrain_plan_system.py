"""Security review, CalTrain's training plan (F-40 to F-44), attacked with real processes.

A real `enclaveml train serve` (uvicorn + enclave worker process) on CIFAR-10 images; the host is
active: it rewrites its own answers (`hostile_proxy.HostileProxy`), restarts the server with other
flags on the same store, and relays the owner's and participants' messages as it likes. Each test
is one attack, written as the host would run it; each failed before the plan binding existed.
"""

from __future__ import annotations

import base64
import pytest

from enclaveml import keyfiles
from enclaveml.crypto import SigningKey, seal_owner_command
from enclaveml.errors import EvidenceRejected, PolicyViolation, TamperedMessage, UserInputError
from enclaveml.train import demo
from enclaveml.train.client import HostClient
from enclaveml.train.enclave import START
from enclaveml.train.owner import TracedModel, run
from enclaveml.train.participant import contribute
from enclaveml.train.partitioned import TrainConfig
from hostile_proxy import HostileProxy
from test_train_system import Server, _pin_policy

CFG = TrainConfig(epochs=1, batch=10, lr=0.05, seed=1)
PLANNED = ("--model", "darknet:width=4", "--split", "3")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cifar10_dir):
    b = tmp_path_factory.mktemp("caltrain-plan")
    demo.split_folder(cifar10_dir / "train", b / "data", 2, 2)  # 2 participants, 20 images each
    owner = keyfiles.load_or_create_signing_key(b / "owner.key").public_key().to_bytes().hex()
    return {"base": b, "data": b / "data", "owner": owner, "home": b / "home"}


def _instances(url: str) -> int:
    c = HostClient(url)
    try:
        return int(c.get_json("/info")["instances"])
    finally:
        c.close()


@pytest.fixture(scope="module")
def planned(base):
    """A server whose plan fixes the model and the split (k = 3)."""
    srv = Server(base["base"] / "planned-store", base["home"], base["owner"], PLANNED)
    pol = base["base"] / "planned.toml"
    _pin_policy(srv, pol)
    yield srv, pol
    srv.kill()


def test_a_host_that_lies_about_the_classes_cannot_relabel_a_participants_data(base, tmp_path):
    """F-40: /info's class list is the host's word. Reversed, an honest participant's airplanes
    would be signed and trained as trucks, and the trace would then blame the participant."""
    srv = Server(tmp_path / "store", base["home"], base["owner"])
    try:
        pol = tmp_path / "policy.toml"
        _pin_policy(srv, pol)

        def reverse(path: str, body: dict) -> dict:
            if path == "/info":
                body["classes"] = body["classes"][::-1]
                if isinstance(body.get("plan"), dict):  # a careful host keeps its story consistent
                    from enclaveml.train.plan import TrainingPlan

                    body["plan"]["classes"] = body["plan"]["classes"][::-1]
                    body["plan_hash"] = TrainingPlan.from_dict(body["plan"]).hash().hex()
            return body

        proxy = HostileProxy(srv.url, reverse)
        try:
            with pytest.raises((EvidenceRejected, PolicyViolation)):
                contribute(base["data"] / "participant1", proxy.url, pol, tmp_path / "p.key")
        finally:
            proxy.close()
        assert _instances(srv.url) == 0  # refused before a single instance was uploaded
    finally:
        srv.kill()


def _cli_policy(base, out, *flags: str) -> None:
    """`enclaveml train policy --owner OWNER FLAGS --out OUT` on the servers' sim platform."""
    import typer
    from typer.testing import CliRunner

    from enclaveml.train.commands import register

    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["train", "policy", "--owner", base["owner"], *flags, "--out", str(out)],
                           env={"ENCLAVEML_HOME": str(base["home"])})
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("first,restart", [((), ("--data-model", "extraction")),
                                           (PLANNED, ("--model", "darknet:width=4", "--split", "1"))],
                         ids=["other-data-model", "split-1"])
def test_a_server_restarted_under_another_plan_cannot_reuse_the_sealed_instances(base, tmp_path, first, restart):
    """F-41: the host kills `train serve` and restarts it on the same store with other flags (another
    data model, or the same model split at k = 1, whose IRs invert to the images). Neither the
    participants' policy nor the sealed instances may carry over."""
    store = tmp_path / "store"
    a = Server(store, base["home"], base["owner"], first)
    pol_a = tmp_path / "a.toml"
    _cli_policy(base, pol_a, *first)  # the participant pins the plan it agrees to
    rep = contribute(base["data"] / "participant1", a.url, pol_a, tmp_path / "p.key")
    assert rep.counts["accepted"] == 20
    a.kill()
    b = Server(store, base["home"], base["owner"], restart)
    try:
        assert _instances(b.url) == 20  # the host's disk carried over
        with pytest.raises(PolicyViolation):  # the participant's policy does not accept the new enclave
            contribute(base["data"] / "participant2", b.url, pol_a, tmp_path / "p2.key")
        pol_b = tmp_path / "b.toml"
        _pin_policy(b, pol_b)  # even the owner, pinning the new enclave, cannot train on the old data
        split = int(restart[-1]) if "--split" in restart else 3
        with pytest.raises((TamperedMessage, PolicyViolation)):
            run(b.url, pol_b, "darknet:width=4", split, CFG, base["base"] / "owner.key", tmp_path / "m",
                run_id="stolen", poll=0.1)
        assert not (tmp_path / "m" / "model.safetensors").exists()
    finally:
        b.kill()


def test_the_enclave_refuses_a_run_outside_its_plan(base, planned, tmp_path):
    """F-42: the plan fixes model and split; a start command for k = 1 (or for another plan) is
    refused by the enclave itself, not only by the owner's client."""
    srv, pol = planned
    contribute(base["data"] / "participant2", srv.url, pol, tmp_path / "p.key")
    owner_key = base["base"] / "owner.key"
    with pytest.raises((UserInputError, PolicyViolation)):  # the owner's client checks the plan first
        run(srv.url, pol, "darknet:width=4", 1, CFG, owner_key, tmp_path / "m", run_id="k1", poll=0.1)
    c = HostClient(srv.url)
    try:
        info = c.get_json("/info")
        pub, nonce = c.attest(pol)
        owner = keyfiles.load_signing_key(owner_key)
        for n, args in enumerate([{"model": "darknet:width=4", "split": 1, "plan": info["plan_hash"]},
                                  {"model": "darknet:width=8", "split": 3, "plan": info["plan_hash"]},
                                  {"model": "darknet:width=4", "split": 3, "plan": "00" * 32},
                                  {"model": "darknet:width=4", "split": 3}]):
            pub, nonce = c.attest(pol)
            cmd = seal_owner_command(owner, pub, START, f"raw{n}", nonce, {**args, "config": CFG.to_dict()})
            with pytest.raises(PolicyViolation):
                c.post_json("/train/start", {"run_id": f"raw{n}", "command": base64.b64encode(cmd).decode()})
    finally:
        c.close()
    # the run the plan allows: the release names the plan, and a participant's proof still verifies
    res = run(srv.url, pol, "darknet:width=4", 3, CFG, owner_key, tmp_path / "m", run_id="ok", poll=0.1)
    assert res["state"] == "done"
    tm = TracedModel(tmp_path / "m")
    assert tm.meta["plan_hash"] == info["plan_hash"] and tm.meta["plan"]["split"] == 3
    img = next((base["data"] / "participant2" / "cat").iterdir())
    pk = keyfiles.load_signing_key(tmp_path / "p.key").public_key().to_bytes().hex()
    assert tm.verify_instance(img.read_bytes(), pk)["verified"]


@pytest.mark.parametrize("flags,rule", [(("--min-split", "5"), "min_split"), (("--require-head", "1"), "min_head"),
                                        (("--require-defence", "noise"), "defences")])
def test_a_participants_minimum_protection_is_checked_before_upload(base, planned, tmp_path, flags, rule):
    """F-43: a participant states the least protection it accepts; a plan below it (k = 3 < 5, or
    no sealed head, or no defence) gets no instance, whatever the host says."""
    srv, _ = planned
    pol = tmp_path / "policy.toml"
    _cli_policy(base, pol, *flags)
    before = _instances(srv.url)
    with pytest.raises(PolicyViolation, match=rule):
        contribute(base["data"] / "participant1", srv.url, pol, tmp_path / "p.key")
    assert _instances(srv.url) == before


def test_a_policy_pinning_the_plan_accepts_it(base, planned, tmp_path):
    srv, _ = planned
    pol = tmp_path / "policy.toml"
    _cli_policy(base, pol, "--min-split", "3")
    rep = contribute(base["data"] / "participant1", srv.url, pol, tmp_path / "p3.key", limit=4)
    assert rep.counts["accepted"] == 4
