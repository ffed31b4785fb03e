"""ImageNet level, all the way: the packaged EfficientNet-Lite0 (trained) and a ResNet-18 (random
weights, a graph model) are assessed, partitioned at the assessment's recommendation, served by a
real `enclaveml serve` (allowing their factories through their model cards), deployed, and asked
about the packaged ImageNet photos; the answers equal the whole models'.

The assessment here is a plumbing run (few points, a decoder trained for 2 steps); the figures in
docs/assessment.md come from full runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from enclaveml import keyfiles
from enclaveml.data.packaged import packaged_imagefolder
from enclaveml.data.preprocess import load_image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # make test-all; test_assess_imagenet.py covers Lite0 in make test
RESNET = "enclaveml.models.examples:resnet18"


def _cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "enclaveml", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=dict(os.environ), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _assess_and_partition(model: str, weights, points: str, base, name: str):
    out = base / f"assess-{name}"
    _cli("assess", model, "--weights", weights, "--data", packaged_imagefolder("foolbox-imagenet"), "--resize",
         "--samples", 2, "--points", points, "--tests", "decoder", "--decoder-steps", 2, "--decoder-train", 4,
         "--threads", 2, "--out", out, cwd=base)
    rec = json.loads((out / "assessment.json").read_text())
    assert rec["input_shape"] == [3, 224, 224] and rec["classes"] == 1000 and rec["recommended"] is not None
    _cli("partition", model, "--weights", weights, "--assessment", out / "assessment.json", "--out", base / name,
         "--owner-key", base / "owner.key", cwd=base)
    return rec


def test_imagenet_models_assessed_partitioned_served_and_answering_like_the_whole_model(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from safetensors.torch import save_file

    from enclaveml.client import EnclaveClient
    from enclaveml.crypto import SigningKey
    from enclaveml.models import efficientnet, examples
    from enclaveml.models.bundle import load_manifest, load_model_key
    from enclaveml.models.loading import load_model
    from enclaveml.serve.launcher import ServerProcess, server_env, snapshot_package
    from enclaveml.models.servable import enclave_config
    from enclaveml.tee import Policy
    from enclaveml.tee.sim import PLATFORM_DIR, expected_sim_measurement, sim_platform_public_key

    torch.set_num_threads(2)
    # the packaged .pth, exported in code as safetensors + a model card (input size, 0..255 pixels, factory)
    lite_w, lite_card = efficientnet.export(tmp_path / "lite0")
    # ResNet-18 with random weights and its own card
    torch.manual_seed(0)
    (tmp_path / "resnet").mkdir()
    res_w = tmp_path / "resnet" / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in examples.resnet18().state_dict().items()}, str(res_w))
    res_card = tmp_path / "resnet" / "model.json"
    res_card.write_text(json.dumps({"input_size": "3x224x224", "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "factory": RESNET}))

    lite_rec = _assess_and_partition(efficientnet.UNTRAINED, lite_w, "10", tmp_path, "lite0.bundle")
    res_rec = _assess_and_partition(RESNET, res_w, "14", tmp_path, "resnet18.bundle")
    assert load_manifest(tmp_path / "lite0.bundle").k == lite_rec["recommended"]
    assert load_manifest(tmp_path / "resnet18.bundle").k == res_rec["recommended"]
    assert "layer" in load_manifest(tmp_path / "resnet18.bundle").layers[res_rec["recommended"] - 1]

    home = tmp_path / "home"
    pkg = snapshot_package(tmp_path / "pkg")
    config = enclave_config([efficientnet.UNTRAINED, RESNET])
    srv = ServerProcess(tmp_path / "store", tmp_path / "server.log", env=server_env(home, pkg),
                        extra_args=["--card", lite_card, "--card", res_card]).start()
    policy = Policy(allowed_backends=["sim"],
                    measurements={"sim": [expected_sim_measurement(config, root=pkg / "enclaveml")]},
                    sim_platform_keys=[sim_platform_public_key(home / PLATFORM_DIR).hex()])
    owner = keyfiles.load_or_create_signing_key(tmp_path / "owner.key")
    photos = sorted(p for p in packaged_imagefolder("foolbox-imagenet").rglob("*") if p.is_file())[:6]
    images = [load_image_bytes(p) for p in photos]
    client = EnclaveClient(srv.url, policy)
    try:
        for name, model, weights in (("lite0", efficientnet.UNTRAINED, lite_w), ("resnet18", RESNET, res_w)):
            bundle = tmp_path / f"{name}.bundle"
            client.deploy(bundle, load_model_key(tmp_path / f"{name}.bundle.modelkey"), owner, model_id=name)
            results = client.infer(images, model=name, logits=True)
            whole, pre, _ = load_model(model, str(weights), resize=True)
            x = torch.stack([pre(img) for img in images])
            with torch.no_grad():
                ref = whole(x)
            got = torch.tensor([r["logits"] for r in results], dtype=torch.float32)
            assert torch.equal(got.argmax(1), ref.argmax(1)), name
            assert (got - ref).abs().max().item() < 1e-4, name
            if name == "lite0":  # trained: the photos' folders are their ImageNet class indices
                truth = [int(p.parent.name) for p in photos]
                assert sum(int(i) == t for i, t in zip(got.argmax(1), truth)) >= len(photos) // 2
    finally:
        client.close()
        srv.stop()
