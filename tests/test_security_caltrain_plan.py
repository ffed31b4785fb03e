"""Security review, CalTrain's training plan (F-40 to F-44): the enclave driven in-process by a hostile host.

The host relays every message, chooses what the enclave worker is launched with, and keeps the
sealed blobs on its disk. On hardware TEEs the launch arguments are not part of the measurement,
so two enclaves of the same code share their sealing keys: these tests build exactly that (one
backend, two plans) and check that nothing sealed, signed or started under one plan works under
another. Each test failed before the plan binding existed.
"""

from __future__ import annotations

import json

import pytest
import torch

from enclaveml.crypto import SigningKey, seal_owner_command
from enclaveml.errors import PolicyViolation, TamperedMessage, UserInputError
from enclaveml.tee import Evidence, bind_report_data, verify_claims_only
from enclaveml.tee.sim import SimBackend
from enclaveml.train.enclave import START, CalTrainEnclave, enclave_config
from enclaveml.train.instances import make_upload
from enclaveml.train.partitioned import TrainConfig
from enclaveml.train.plan import TrainingPlan, check_requirements
from enclaveml.train.spec import ModelSpec
from image_helpers import random_png

OWNER = SigningKey.generate()
SPEC = "darknet:width=4"
CFG = TrainConfig(epochs=1, batch=4, seed=1)
PLAN = TrainingPlan.build(OWNER.public_key(), model=SPEC, split=3, head=0, defence="none")


@pytest.fixture()
def backend(tmp_path_factory):
    torch.set_num_threads(1)
    return SimBackend(enclave_config(OWNER.public_key()), lock_memory=False,
                      platform_dir=tmp_path_factory.getbasetemp() / "plan-platform")


def _fill(enc: CalTrainEnclave, n: int = 6, plan: bytes | None = None) -> list[dict]:
    p = SigningKey.generate()
    plan = enc.plan_hash if plan is None else plan
    res = enc.ingest([make_upload(enc.hpke.public_bytes(), p, random_png(i), i % 10, plan=plan)[1] for i in range(n)])
    return res


def _start(enc: CalTrainEnclave, nonce: bytes = b"nonce-0000000001", run_id: str = "run-1", **args):
    body = {"model": SPEC, "split": 3, "plan": enc.plan_hash.hex(), "config": CFG.to_dict(), **args}
    body = {k: v for k, v in body.items() if v is not None}
    return seal_owner_command(OWNER, enc.hpke.public_bytes(), START, run_id, nonce, body)


def test_the_evidence_names_the_plan(backend):
    """F-40: the report data's upper half is the plan hash, so a host cannot describe one plan and run another."""
    enc = CalTrainEnclave(backend, plan=PLAN)
    nonce = b"n" * 32
    ev = enc.evidence(nonce)
    claims = verify_claims_only(Evidence.from_dict(ev["evidence"]))
    pub = bytes.fromhex(ev["public_key"])
    assert claims.report_data[:32] == bind_report_data(pub, nonce)[:32]
    assert claims.report_data[32:] == PLAN.hash() == enc.plan_hash


def test_the_host_no_longer_chooses_how_instances_are_decoded(backend):
    """F-40: the ingest op carried the host's data model (decode size, number of classes); the
    worker now ignores it, and an in-process caller's spec must decode as the plan does."""
    from enclaveml.data.preprocess import Preprocessing
    from enclaveml.train.enclave_worker import make_handler

    class Larger:  # what a host could have named: a data model decoding at 64x64 with 1000 classes
        text, num_classes = "imagenet-like", 1000

        def preprocessing(self):
            return Preprocessing(size=(64, 64))

    enc = CalTrainEnclave(backend, plan=PLAN)
    with pytest.raises(UserInputError):
        enc.ingest([], Larger())
    assert enc.ingest([], ModelSpec.parse("extraction")) == []  # same input and classes: an older caller
    up = make_upload(enc.hpke.public_bytes(), SigningKey.generate(), random_png(1), 500, plan=enc.plan_hash)[1]
    h, _, _ = make_handler(enc)({"op": "ingest", "n": 1, "model": "densenet"}, {}, {"u0": up})
    assert h["results"][0]["error"] == "DataError"  # label 500: the plan's 10 classes decide


def test_an_upload_bound_to_another_plan_is_refused(backend):
    """F-41: the participant signed for plan A; an enclave running plan B (k = 1) must not take it."""
    k1 = CalTrainEnclave(backend, plan=TrainingPlan.build(OWNER.public_key(), model=SPEC, split=1))
    res = _fill(k1, 3, plan=PLAN.hash())
    assert [r["status"] for r in res] == ["rejected"] * 3
    assert {r["error"] for r in res} == {"PolicyViolation"} and "plan" in res[0]["reason"]


def test_sealed_instances_do_not_move_between_plans(backend):
    """F-41: same code, same platform (hardware TEEs do not measure launch arguments): the host
    copies plan A's sealed instances into an enclave launched with plan B."""
    a = CalTrainEnclave(backend, plan=PLAN)
    sealed = [(r["tag"], r["sealed"]) for r in _fill(a)]
    b = CalTrainEnclave(backend, plan=TrainingPlan.build(OWNER.public_key(), model=SPEC, split=1))
    b.add_data(sealed)
    with pytest.raises(TamperedMessage):
        b.start(_start(b, split=1), None)
    a.add_data(sealed)
    info, _ = a.start(_start(a), None)  # under its own plan it trains
    assert info["n"] == 6 and info["plan"] == PLAN.hash().hex()


def test_a_checkpoint_does_not_move_between_plans(backend):
    a = CalTrainEnclave(backend, plan=PLAN)
    a.add_data([(r["tag"], r["sealed"]) for r in _fill(a)])
    a.start(_start(a), None)
    ck = a.checkpoint()
    open_plan = CalTrainEnclave(backend)  # the owner's open plan: same owner, same model, same split allowed
    open_plan.add_data([(r["tag"], r["sealed"]) for r in _fill(open_plan)])
    with pytest.raises(TamperedMessage):
        open_plan.start(_start(open_plan), ck)


@pytest.mark.parametrize("args", [{"split": 1}, {"model": "darknet:width=8"}, {"head": 1}, {"defence": "noise:scale=1"},
                                  {"classes": ["a"] * 10}, {"plan": "00" * 32}, {"plan": None}],
                         ids=["split", "model", "head", "defence", "classes", "other-plan", "no-plan"])
def test_the_enclave_refuses_a_start_outside_its_plan(backend, args):
    """F-42: the owner's start command must name the plan and ask for nothing it does not fix."""
    enc = CalTrainEnclave(backend, plan=PLAN)
    enc.add_data([(r["tag"], r["sealed"]) for r in _fill(enc)])
    with pytest.raises(PolicyViolation):
        enc.start(_start(enc, **args), None)
    info, _ = enc.start(_start(enc, nonce=b"nonce-0000000002"), None)  # the refused nonce was not consumed either
    assert (info["model"], info["split"], info["head"], info["defence"]) == (SPEC, 3, 0, {"name": "none", "settings": {}})


def test_an_open_plan_leaves_the_choice_to_the_owner_but_not_to_the_host(backend):
    enc = CalTrainEnclave(backend)  # `train serve --owner KEY`: model, split, head, defence left open
    assert enc.plan.open_fields() == ["model", "split", "head", "defence"]
    enc.add_data([(r["tag"], r["sealed"]) for r in _fill(enc)])
    info, _ = enc.start(_start(enc, split=2), None)
    assert info["split"] == 2


def test_a_plan_that_fixes_a_sealed_head_and_a_defence_trains_with_them(backend):
    """A plan may fix a sealed head and a defence: the run trains with exactly those (never with less
    protection than the participants agreed to), and the start command cannot drop them."""
    plan = TrainingPlan.build(OWNER.public_key(), model=SPEC, split=3, head=1, defence="noise:scale=1")
    enc = CalTrainEnclave(backend, plan=plan)
    enc.add_data([(r["tag"], r["sealed"]) for r in _fill(enc)])
    with pytest.raises(PolicyViolation):
        enc.start(_start(enc, head=0), None)
    info, _ = enc.start(_start(enc, nonce=b"nonce-0000000002"), None)
    assert info["head"] == 1 and info["defence"]["name"] == "noise" and info["defence"]["settings"]["scale"] == 1.0


def test_requirements_against_plans():
    """F-43: the participant's minimum protection, checked before any upload."""
    open_plan = TrainingPlan.build(OWNER.public_key())
    strong = TrainingPlan.build(OWNER.public_key(), model=SPEC, split=5, head=1, defence="mix:group=4")
    ok = {"owner": OWNER.public_key().to_bytes().hex(), "min_split": 5, "min_head": 1, "defences": ["mix", "noise"]}
    check_requirements(strong, ok)
    for plan, req, rule in [(PLAN, {"min_split": 5}, "min_split"), (open_plan, {"min_split": 1}, "min_split"),
                            (PLAN, {"min_head": 1}, "min_head"), (PLAN, {"defences": ["mix"]}, "defences"),
                            (strong, {"defences": ["noise"]}, "defences"),
                            (strong, {"owner": "ab" * 32}, "owner"), (strong, {"plans": [PLAN.hash().hex()]}, "plans")]:
        with pytest.raises(PolicyViolation, match=rule):
            check_requirements(plan, req)


def test_a_plan_document_is_parsed_strictly():
    doc = PLAN.to_dict()
    assert TrainingPlan.from_dict(doc) == PLAN and TrainingPlan.from_dict(doc).hash() == PLAN.hash()
    bad = [{**doc, "split": 0}, {**doc, "split": 99}, {**doc, "split": True}, {**doc, "extra": 1},
           {k: v for k, v in doc.items() if k != "head"}, {**doc, "classes": doc["classes"][:9]},
           {**doc, "classes": ["x"] * 10}, {**doc, "input": [3, 64, 64]}, {**doc, "model": "darknet:width=04"},
           {**doc, "owner": "zz" * 32}, {**doc, "defence": {"name": "Noise", "settings": {}}},
           {**doc, "defence": {"name": "noise", "settings": {"scale": float("inf")}}}, {**doc, "version": 2},
           {**doc, "head": 9, "split": 9}]
    for d in bad:
        with pytest.raises(UserInputError):
            TrainingPlan.from_dict(d)


def test_the_caltrain_policy_table_round_trips_and_is_strict(tmp_path):
    from enclaveml.tee import load_policy, write_policy
    from enclaveml.tee.policy import Policy

    table = {"owner": "ab" * 32, "plans": [PLAN.hash().hex()], "min_split": 5, "min_head": 1, "defences": ["mix"]}
    p = write_policy(Policy(allowed_backends=["sim"], caltrain=table), tmp_path / "p.toml")
    assert load_policy(p).caltrain == table
    for bad in ({"min_split": "5"}, {"min_split": True}, {"plans": ["xyz"]}, {"owner": "ab"}, {"defences": ["Mix"]},
                {"defences": "mix"}, {"minsplit": 5}):
        with pytest.raises(UserInputError):
            Policy(caltrain=bad)


@pytest.fixture()
def cli():
    import typer
    from typer.testing import CliRunner

    from enclaveml.train.commands import register

    app = typer.Typer()
    register(app)
    return lambda *args: CliRunner().invoke(app, ["train", *map(str, args)])


def test_train_plan_and_policy_commands(cli, tmp_path):
    from enclaveml.tee import load_policy

    owner = OWNER.public_key().to_bytes().hex()
    r = cli("plan", "--owner", owner, "--model", SPEC, "--split", 3, "--head", 0, "--defence", "none",
            "--out", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["plan_hash"] == PLAN.hash().hex()
    assert cli("policy", "--plan", tmp_path / "plan.json", "--out", tmp_path / "a.toml").exit_code == 0
    assert load_policy(tmp_path / "a.toml").caltrain == {"owner": owner, "plans": [PLAN.hash().hex()]}
    # requirements alone: any plan of the owner that meets them
    assert cli("policy", "--owner", owner, "--min-split", 5, "--require-defence", "mix",
               "--out", tmp_path / "b.toml").exit_code == 0
    assert load_policy(tmp_path / "b.toml").caltrain == {"owner": owner, "min_split": 5, "defences": ["mix"]}
    # no plan, no requirement: the default plan of `train serve --owner`, pinned
    assert cli("policy", "--owner", owner, "--out", tmp_path / "c.toml").exit_code == 0
    assert load_policy(tmp_path / "c.toml").caltrain["plans"] == [TrainingPlan.build(owner).hash().hex()]
    # a pinned plan that can never meet the policy's own requirement is refused, and nothing written
    r = cli("policy", "--plan", tmp_path / "plan.json", "--min-split", 5, "--out", tmp_path / "d.toml")
    assert r.exit_code != 0 and not (tmp_path / "d.toml").exists()
    r = cli("plan", "--owner", owner, "--model", SPEC, "--split", 99, "--out", tmp_path / "e.json")
    assert r.exit_code != 0 and not (tmp_path / "e.json").exists()
