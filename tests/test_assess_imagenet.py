"""The ImageNet-level run: EfficientNet-Lite0 (trained) on real ImageNet photos, as a user's own model."""

import json
import os
import subprocess
import sys

import pytest

from enclaveml.data.folder import list_image_folder
from enclaveml.data.packaged import packaged_imagefolder



def run(*args):
    return subprocess.run([sys.executable, "-m", "enclaveml", "assess", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ), timeout=300)


def test_packaged_photos_are_a_labelled_image_folder():
    root = packaged_imagefolder("foolbox-imagenet")
    classes, samples = list_image_folder(root)
    assert len(samples) == 20 and all(c.isdigit() for c in classes)
    assert packaged_imagefolder("foolbox-imagenet") == root  # materialised once
    _, cifar = list_image_folder(packaged_imagefolder("foolbox-cifar10"))
    assert len(cifar) == 20


@pytest.mark.slow
def test_assess_efficientnet_lite0_through_the_user_interface(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    data = packaged_imagefolder("foolbox-imagenet")
    p = run("enclaveml.models.efficientnet:lite0", "--data", data, "--input-size", "3x224x224", "--resize",
            "--samples", 2, "--points", "1", "--decoder-steps", 3, "--decoder-train", 4, "--rmle-steps", 5,
            "--rmle-samples", 1, "--threads", 1, "--out", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((tmp_path / "assessment.json").read_text())
    assert rec["classes"] == 1000 and rec["input_shape"] == [3, 224, 224]
    assert rec["sample_accuracy"] is not None  # folder names are ImageNet class indices
    stem = rec["points"][0]
    assert stem["name"] == "stem" and stem["kl"]["channels"] == 32
    # the stem's channels are pictures of the photo: the oracle recognises some of them
    assert stem["kl"]["any_channel_beats_uniform"]
