"""One model specification, one class mapping, one split rule for bundles and CalTrain (issues 10, 11)."""

from __future__ import annotations

import sys

import pytest
import torch

from enclaveml.errors import PartitionError, PolicyViolation, UnknownModel, UserInputError
from enclaveml.models.bundle import build_arch, check_arch
from enclaveml.models.classmap import ClassMapping
from enclaveml.models.spec import ModelSpec
from enclaveml.models.split import check_split, permute_classifier, split_model
from enclaveml.models.zoo import darknet
from enclaveml.models.servable import check_servable_arch
from enclaveml.train import spec as train_spec
from enclaveml.train.plan import TrainingPlan

OWNER = "ab" * 32
FACTORY = "enclaveml.models.examples:resnet_cifar"


@pytest.mark.parametrize("text,arch", [
    ("darknet", {"zoo": "darknet"}),
    ("darknet:width=16", {"zoo": "darknet", "kwargs": {"width": 16}}),
    ("darknet:width=8:num_classes=3", {"zoo": "darknet", "kwargs": {"num_classes": 3, "width": 8}}),
    (FACTORY, {"factory": FACTORY}),
    (f"{FACTORY}:width=4", {"factory": FACTORY, "kwargs": {"width": 4}}),
    ("nets:build", {"factory": "nets:build"}),
])
def test_one_spec_two_spellings(text, arch):
    spec = ModelSpec.parse(text)
    assert spec.arch == arch and check_arch(arch) == arch
    assert ModelSpec.from_arch(arch) == spec
    assert ModelSpec.parse(spec.text) == spec
    assert train_spec.ModelSpec is ModelSpec  # CalTrain's spec is the same type


@pytest.mark.parametrize("text,err", [
    ("", UserInputError), ("darknet:width", UserInputError), ("darknet:width=x", UserInputError),
    ("nosuch", UnknownModel), ("darknet:width=1:width=2", UserInputError), ("a b:c", UserInputError),
    ("os:system:x=y", UserInputError), ("darknet:Width=3", UserInputError),
])
def test_bad_specs_are_refused(text, err):
    with pytest.raises(err):
        ModelSpec.parse(text)


def test_parsing_a_factory_imports_nothing():
    name = "enclaveml_never_imported_mod"
    spec = ModelSpec.parse(f"{name}:build")
    TrainingPlan.build(OWNER, "darknet", ["a", "b", "c"], spec.text, 2)  # a plan naming it: still no import
    assert name not in sys.modules and spec.is_factory


def test_zoo_options_build_in_bundles_and_serving():
    m = build_arch({"zoo": "darknet", "kwargs": {"width": 4}})
    assert m.layers.conv1[0].out_channels == 4
    check_servable_arch({"zoo": "darknet", "kwargs": {"width": 4}})
    for bad in ({"zoo": "darknet", "kwargs": {}}, {"zoo": "darknet", "kwargs": {"width": "4"}},
                {"zoo": "darknet", "kwargs": {"width": True}}, {"zoo": "darknet", "kwargs": {"width": -1}}):
        with pytest.raises(UserInputError):
            check_arch(bad)
    with pytest.raises(UserInputError, match="does not take"):
        build_arch({"zoo": "darknet", "kwargs": {"depth": 3}})


def test_class_mapping_from_a_seed_is_the_bundles_class():
    a = ClassMapping.random(10, generator=torch.Generator().manual_seed(5))
    b = ClassMapping.random(10, torch.Generator().manual_seed(5))  # the older CalTrain call
    assert a == b and a.permutation != tuple(range(10))
    assert ClassMapping.from_bytes(a.to_bytes()) == a
    x = torch.randn(4, 10)
    assert torch.equal(a.to_original(a.to_host(x)), x)
    assert ClassMapping(a.perm) == ClassMapping(a.permutation)
    for n in (2, 3):  # never the identity, even for two classes
        for seed in range(20):
            assert ClassMapping.random(n, generator=torch.Generator().manual_seed(seed)).permutation != tuple(range(n))


def test_one_split_rule_and_classifier_permutation():
    model = darknet.build(width=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    mapping = ClassMapping.random(10)
    permute_classifier(model, mapping)
    parts = split_model(model, 5)
    with torch.no_grad():
        host_order = parts.back(parts.front(x))
    assert torch.allclose(mapping.to_original(host_order), ref, atol=1e-6)
    permute_classifier(model, mapping, inverse=True)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    n = len(model)
    with pytest.raises(PartitionError, match="leaves no BackNet layer"):
        check_split(model, 5, n - 5)
    assert check_split(model, 5, 1).keys == ("fc.weight", "fc.bias") or check_split(model, 5, 1).layer == n - 1


def test_plan_declares_any_classes_and_a_factory_needs_an_allow_list():
    plan = TrainingPlan.build(OWNER, "darknet", ["airplane", "cat", "ship"], f"{FACTORY}:num_classes=3:width=4", 3)
    assert plan.factories() == (FACTORY,)
    with pytest.raises(PolicyViolation, match="not allowed"):
        plan.build_model(plan.model, ())
    m = plan.build_model(plan.model, (FACTORY,), 3, 0)
    assert m.num_classes == 3 and tuple(m.input_shape) == (3, 32, 32)
    with pytest.raises(UserInputError, match="3 classes"):
        plan.build_model(f"{FACTORY}:width=4", (FACTORY,))  # 10 outputs
    open_plan = TrainingPlan.build(OWNER, "darknet", ["a", "b", "c"])
    with pytest.raises(UserInputError, match="3 classes"):
        open_plan.resolve("darknet:width=4", 3)
    assert open_plan.resolve("darknet:width=4:num_classes=3", 3).model == "darknet:num_classes=3:width=4"
    with pytest.raises(UserInputError, match="2 to"):
        TrainingPlan.build(OWNER, "darknet", ["only"])


def test_training_enclave_refuses_a_plan_factory_its_configuration_does_not_allow():
    from enclaveml.tee import get_backend
    from enclaveml.train.enclave import CalTrainEnclave, enclave_config

    plan = TrainingPlan.build(OWNER, "darknet", ["a", "b", "c"], f"{FACTORY}:num_classes=3", 3)
    with pytest.raises(UserInputError, match="does not allow"):
        CalTrainEnclave(get_backend("sim", config=enclave_config(OWNER)), plan=plan)
    cfg = enclave_config(OWNER, [FACTORY])
    assert cfg["allowed_factories"] == [FACTORY] and "allowed_factories" not in enclave_config(OWNER)
    enc = CalTrainEnclave(get_backend("sim", config=cfg), plan=plan)
    assert enc.allowed_factories == {FACTORY}


def test_partition_names_models_with_the_same_spec(tmp_path):
    from enclaveml.models.commands import _load_model
    from enclaveml.models.loading import load_model

    m, pre, classes = load_model("darknet:width=4", pretrained=False)
    assert m.layers.conv1[0].out_channels == 4 and len(classes) == 10
    with pytest.raises(UserInputError, match="no trained weights"):
        load_model("darknet:width=4")
    m, arch, pre, names = _load_model("darknet:width=4:num_classes=3", None, True, None, None, None, None)
    assert arch == {"zoo": "darknet", "kwargs": {"num_classes": 3, "width": 4}} and m.num_classes == 3
    assert build_arch(arch).names == m.names


def _released_folder(tmp_path, plan, model_text, split, head=0):
    """A model folder as `train run` writes it from the enclave's release (without a server)."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = plan.build_model(model_text, ModelSpec.parse(model_text).target_allowed(), split, head)
    folder = tmp_path / "released"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    meta = {"run_id": "run/1", "model": model_text, "arch": ModelSpec.parse(model_text).arch, "split": split,
            "classes": list(plan.classes), "input": list(plan.input), "head": head, "plan": plan.to_dict(),
            "plan_hash": plan.hash().hex(), "preprocessing": plan.preprocessing().to_dict(), "instances": 0}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder, model.eval()


@pytest.mark.parametrize("model_text,head", [("darknet:width=4:num_classes=3", 0), ("darknet:width=4:num_classes=3", 2),
                                             (f"{FACTORY}:num_classes=3:width=4", 0)])
def test_release_bundle_is_a_partition_bundle(tmp_path, model_text, head):
    from enclaveml.crypto import SigningKey
    from enclaveml.models.bundle import load_model_key, open_enclave_parts, read_public_bundle
    from enclaveml.train.owner import write_bundle

    plan = TrainingPlan.build(OWNER, "darknet", ["airplane", "cat", "ship"])
    folder, model = _released_folder(tmp_path, plan, model_text, 3, head)
    owner = SigningKey.generate()
    made = write_bundle(folder, owner)
    assert made["name"] == "run-1" and made["bundle"] == str(folder / "bundle")
    key = load_model_key(made["model_key"])
    allowed = ModelSpec.parse(model_text).target_allowed()
    manifest, back = read_public_bundle(made["bundle"], owner.public_key(), allowed)
    parts = open_enclave_parts(made["bundle"], key, owner.public_key(), allowed)
    assert manifest.arch == ModelSpec.parse(model_text).arch and manifest.k == 3 and manifest.head == head
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = back(parts.front(x))
        if parts.head is not None:
            out = parts.head(out)
        assert torch.allclose(parts.mapping.to_original(out), model(x), atol=1e-5)
    assert parts.mapping.labels == ("airplane", "cat", "ship")
    with pytest.raises(UserInputError, match="already there"):  # never overwrites a bundle or its key
        write_bundle(folder, owner)


def test_an_enclave_builds_only_the_factories_its_measured_configuration_allows(tmp_path):
    """The attack: an owner's start command (or a forged open plan) names a factory the
    participants' pinned measurement never allowed. Refused before any import; allowed, it trains."""
    from image_helpers import random_png

    from enclaveml.crypto import SigningKey, seal_owner_command
    from enclaveml.tee.sim import SimBackend
    from enclaveml.train.enclave import START, CalTrainEnclave, enclave_config
    from enclaveml.train.instances import make_upload
    from enclaveml.train.partitioned import TrainConfig

    owner = SigningKey.generate()
    plan = TrainingPlan.build(owner.public_key(), "darknet", ["airplane", "cat", "ship"])  # model left open
    user_model = f"{FACTORY}:num_classes=3:width=4"

    def enclave(allowed):
        be = SimBackend(enclave_config(owner.public_key(), allowed), lock_memory=False, platform_dir=tmp_path / "pf")
        enc = CalTrainEnclave(be, plan=plan)
        p = SigningKey.generate()
        res = enc.ingest([make_upload(enc.hpke.public_bytes(), p, random_png(i), i % 3, plan=enc.plan_hash)[1]
                          for i in range(6)])
        enc.add_data([(r["tag"], r["sealed"]) for r in res])
        return enc

    def start(enc, model, nonce):
        body = {"model": model, "split": 3, "plan": enc.plan_hash.hex(),
                "config": TrainConfig(epochs=1, batch=3, seed=1).to_dict()}
        return enc.start(seal_owner_command(owner, enc.hpke.public_bytes(), START, "r", nonce, body), None)

    enc = enclave(())
    for model in (user_model, "enclaveml_not_a_module_xyz:build"):
        with pytest.raises(PolicyViolation, match="not allowed"):
            start(enc, model, b"nonce-000000000" + model[:1].encode())
    assert "enclaveml_not_a_module_xyz" not in sys.modules
    enc = enclave((FACTORY,))
    info, back_state = start(enc, user_model, b"nonce-0000000009")
    assert info["model"] == user_model and info["total_steps"] == 2
    ir = enc.forward(0)
    assert ir.shape[0] == 3 and back_state


def test_train_release_command_makes_the_bundle_from_a_model_folder(tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    from enclaveml.keyfiles import load_or_create_signing_key
    from enclaveml.models.bundle import load_manifest

    plan = TrainingPlan.build(OWNER, "darknet", ["airplane", "cat", "ship"])
    folder, _ = _released_folder(tmp_path, plan, "darknet:width=4:num_classes=3", 3)
    key = tmp_path / "owner.key"
    owner = load_or_create_signing_key(key)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "enclaveml", "train", "release", "--out", str(folder), "--key", str(key),
           "--bundle", str(tmp_path / "b"), "--name", "cats"]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["name"] == "cats" and load_manifest(tmp_path / "b", owner.public_key()).k == 3
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode != 0 and "already there" in again.stderr and again.stderr.strip().count("\n") == 0


def test_zoo_options_cannot_make_the_server_allocate_without_bound():
    """The attack: a signed upload names {"zoo": "darknet", "kwargs": {"width": 999999}} (2.2e15
    parameters) to make the host and the enclave, which holds other owners' keys, run out of memory."""
    import time

    t = time.monotonic()
    with pytest.raises(UserInputError, match="parameters"):
        build_arch({"zoo": "darknet", "kwargs": {"width": 999999}})
    assert time.monotonic() - t < 5  # sized on the meta device, nothing allocated
    assert build_arch({"zoo": "darknet", "kwargs": {"width": 64}}).num_classes == 10
