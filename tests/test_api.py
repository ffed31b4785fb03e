"""The Python API (`enclaveml.assess`, `partition`, `OwnerKey`, image inputs) and the k rule in the library.

In-process and fast: untrained zoo models and a tiny nn.Sequential; the served path runs in
tests/test_api_readme.py.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import enclaveml as eml
from enclaveml import keyfiles
from enclaveml.crypto import SigningKey
from enclaveml.errors import PartitionError, UserInputError
from enclaveml.models.bundle import load_manifest
from enclaveml.models.choose import CLI_ARGS, ShallowPartitionPoint, partition_point, recommended_point


def _record(model: str = "darknet", recommended: int | None = 5) -> dict:
    return {"model": model, "recommended": recommended, "ssim_threshold": 0.3, "points": [],
            "recommendation": {"index": recommended, "reason": "test", "overridden": False}}


# ---------------------------------------------------------------------------- the k rule (pure)

def test_rule_defaults_to_the_recommendation_and_refuses_shallower():
    assert partition_point(None, 5, assessed=True) == 5
    assert partition_point(7, 5, assessed=True) == 7  # deeper: allowed
    assert partition_point(5, 5, assessed=True) == 5
    with pytest.raises(ShallowPartitionPoint, match=r"k=2 is shallower than the assessment's recommended point 5.*force=True") as e:
        partition_point(2, 5, assessed=True)
    assert (e.value.k, e.value.recommended) == (2, 5) and isinstance(e.value, PartitionError)
    assert eml.ShallowPartitionPoint is ShallowPartitionPoint
    assert partition_point(2, 5, assessed=True, force=True) == 2
    assert partition_point(2, None, assessed=False) == 2  # no assessment: the owner's k


def test_rule_needs_a_k_or_a_recommendation():
    with pytest.raises(UserInputError, match=r"k=K, or an assessment"):
        partition_point(None, None, assessed=False)
    with pytest.raises(UserInputError, match="recommends no partition point"):
        partition_point(None, None, assessed=True)
    with pytest.raises(UserInputError, match="integer"):
        partition_point(True, 5, assessed=True)  # type: ignore[arg-type]


def test_rule_speaks_the_cli_flags_for_the_cli():
    with pytest.raises(UserInputError) as e:
        partition_point(2, 5, assessed=True, source="a.json", names=CLI_ARGS)
    assert str(e.value) == ("--at 2 is shallower than the assessment's recommended point 5 (its IR leaks by that "
                            "assessment); pass --force to override")
    with pytest.raises(UserInputError) as e:
        partition_point(None, None, assessed=False, names=CLI_ARGS)
    assert str(e.value) == "give the partition point with --at K, or an assessment with --assessment FILE"


def test_recommended_point_checks_the_record():
    assert recommended_point(_record(), "darknet", "a.json") == 5
    assert recommended_point(_record(recommended=None), None, "a.json") is None
    with pytest.raises(UserInputError, match="not 'darknet'"):
        recommended_point(_record("densenet"), "darknet", "a.json")
    with pytest.raises(UserInputError, match="layer index"):
        recommended_point({"recommended": "5"}, "darknet", "a.json")
    with pytest.raises(UserInputError, match="no 'recommended'"):
        recommended_point([], "darknet", "a.json")


# ---------------------------------------------------------------------------- enclaveml.partition

def test_partition_refuses_a_shallower_k_and_writes_nothing(tmp_path):
    a = eml.Assessment(_record("darknet", 5))
    owner = eml.OwnerKey.generate()
    with pytest.raises(ShallowPartitionPoint, match="force=True"):
        eml.partition("darknet", k=2, assessment=a, out=tmp_path / "b", owner_key=owner, pretrained=False)
    with pytest.raises(UserInputError, match="not 'darknet'"):
        eml.partition("darknet", assessment=eml.Assessment(_record("densenet")), out=tmp_path / "b",
                      owner_key=owner, pretrained=False)
    assert list(tmp_path.iterdir()) == []
    b = eml.partition("darknet", k=2, assessment=a, force=True, out=tmp_path / "b", owner_key=owner, pretrained=False)
    assert b.k == 2 and load_manifest(b.path, expected_owner=owner.public_key()).k == 2


def test_partition_defaults_to_the_recommendation_of_a_file_or_object(tmp_path):
    owner = eml.OwnerKey.generate()
    a = eml.Assessment(_record("darknet", 4))
    a.save(tmp_path / "a.json")
    m = eml.load_model("darknet", pretrained=False)  # an nn.Module that knows its recipe
    b = eml.partition(m, assessment=a, out=tmp_path / "b1", owner_key=owner)
    assert (b.k, b.name, b.owner) == (4, "darknet", owner.fingerprint)
    assert b.manifest.arch == {"zoo": "darknet"}
    assert stat.S_IMODE(b.model_key_path.stat().st_mode) == 0o600 and len(b.model_key()) == 32
    b2 = eml.partition("darknet", assessment=tmp_path / "a.json", k=6, out=tmp_path / "b2", owner_key=owner,
                       pretrained=False)
    assert b2.k == 6
    assert eml.Bundle.open(b2.path, expected_owner=owner).bundle_id == b2.bundle_id
    with pytest.raises(UserInputError, match="already exists"):
        eml.partition("darknet", k=6, out=tmp_path / "b2", owner_key=owner, pretrained=False)


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3))


def test_partition_of_a_module_needs_its_recipe(tmp_path):
    owner = eml.OwnerKey.generate()
    with pytest.raises(UserInputError, match="factory="):
        eml.partition(_tiny(), k=2, out=tmp_path / "b", owner_key=owner, input_shape=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []
    b = eml.partition(_tiny(), k=2, out=tmp_path / "b", owner_key=owner, input_shape=(3, 8, 8),
                      factory="mypkg.nets:build", classes=["a", "b", "c"])
    assert b.manifest.arch == {"factory": "mypkg.nets:build"} and b.layers == ["0", "1", "2", "3", "4"]
    with pytest.raises(UserInputError, match="3 classes"):
        eml.partition(_tiny(), k=2, out=tmp_path / "c", owner_key=owner, input_shape=(3, 8, 8),
                      factory="mypkg.nets:build", classes=["a", "b"])


# ---------------------------------------------------------------------------- enclaveml.assess

class _Images:
    """A map-style dataset of (image, label), as torchvision's would be: tensors, PIL, arrays."""

    classes = ["red", "green", "blue"]

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(3, 8, 8, generator=g)
        if i % 3 == 1:
            return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)), i % 3
        if i % 3 == 2:
            return (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8), i % 3
        return x, i % 3


def test_assess_a_sequential_on_a_dataset(tmp_path):
    a = eml.assess(_tiny(), _Images(), samples=4, tests=("kl",), input_shape=(3, 8, 8), decoder_train=8,
                   name="tiny", out=tmp_path / "out")
    assert isinstance(a, eml.Assessment) and a.model == "tiny"
    assert [p.index for p in a.points] == [1, 2, 3, 4]
    p = a.point(1)
    assert p.kl_leaks in (True, False) and p.ssim is None and p.flops > 0 and p.passes == (not p.failures)
    assert a.recommended == a.record["recommended"] and a.recommendation.reason
    assert a.record["samples"] == 4 and "_Images of 12 items" in a.record["data"]
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!doctype html>")
    back = eml.Assessment.load(tmp_path / "out" / "assessment.json")
    assert back.to_dict() == a.to_dict() and back.to_json() == a.to_json()
    assert back.report(tmp_path / "again.html").exists()  # no pictures, still a report
    with pytest.raises(UserInputError, match="not assessed"):
        a.point(9)


def test_assess_refuses_bad_input_before_running(tmp_path):
    with pytest.raises(UserInputError, match="samples"):
        eml.assess("darknet", tmp_path, samples=0)
    with pytest.raises(UserInputError, match="input_shape"):
        eml.assess(_tiny(), _Images(), tests=("kl",))
    with pytest.raises(UserInputError, match="nn.Sequential"):
        eml.assess(nn.Linear(3, 3), _Images(), tests=("kl",))
    with pytest.raises(UserInputError, match="not among the assessed points"):
        eml.assess(_tiny(), _Images(), tests=("kl",), input_shape=(3, 8, 8), points=[1, 2], point=3)


# ---------------------------------------------------------------------------- keys, images, import

def test_owner_key_file_is_private_and_never_overwritten(tmp_path):
    k = eml.OwnerKey.generate()
    p = k.save(tmp_path / "keys" / "owner.key")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        eml.OwnerKey.generate().save(p)
    back = eml.OwnerKey.load(p)
    assert isinstance(back, SigningKey) and back.fingerprint == k.fingerprint and len(back.public_hex) == 64
    assert keyfiles.load_signing_key(p).public_key() == k.public_key()  # the CLI reads the same file
    assert eml.OwnerKey.load_or_create(tmp_path / "new.key").fingerprint == eml.OwnerKey.load(tmp_path / "new.key").fingerprint


def test_images_are_sent_as_their_bytes_or_lossless_png(tmp_path):
    from enclaveml.api.images import to_image_bytes
    from enclaveml.api.inference import _is_batch

    px = (torch.rand(3, 5, 7) * 255).to(torch.uint8)
    decoded = lambda b: torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(decoded(to_image_bytes(px)), px)
    assert torch.equal(decoded(to_image_bytes(px.float() / 255)), px)
    assert torch.equal(decoded(to_image_bytes(px.permute(1, 2, 0).numpy())), px)
    assert torch.equal(decoded(to_image_bytes(Image.fromarray(px.permute(1, 2, 0).numpy()))), px)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not really")
    assert to_image_bytes(tmp_path / "x.jpg") == to_image_bytes(str(tmp_path / "x.jpg")) == b"\xff\xd8 not really"
    for bad in (torch.zeros(5, 7), torch.zeros(3, 5, 7, dtype=torch.int64), np.zeros((5, 7, 3)), 3.5):
        with pytest.raises(UserInputError):
            to_image_bytes(bad)
    assert _is_batch([b"x"]) and _is_batch(torch.zeros(2, 3, 4, 4)) and not _is_batch(b"x")
    assert not _is_batch(torch.zeros(3, 4, 4)) and not _is_batch("cat.jpg")


def test_assess_is_callable_whatever_was_imported_first():
    code = ("import enclaveml.assess.runner, enclaveml as eml; from enclaveml import assess; "
            "assert assess is eml.assess and callable(eml.assess); import enclaveml.assess.kl as kl; "
            "assert kl.__name__ == 'enclaveml.assess.kl'; import inspect; "
            "assert list(inspect.signature(eml.assess).parameters)[:3] == ['model', 'data', 'samples']; "
            "import pytest; pytest.raises(eml.UserInputError, eml.assess, 'darknet', '.', samples=0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_enclaveml_is_lazy():
    code = ("import sys, enclaveml; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'enclaveml.api.assessment' not in sys.modules; enclaveml.OwnerKey; "
            "assert 'torch' not in sys.modules; print(sorted(enclaveml.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("assess", "partition", "Client", "OwnerKey", "caltrain", "Assessment", "Bundle"):
        assert name in r.stdout


def test_a_dataset_is_staged_as_an_image_folder_with_stable_bytes(tmp_path):
    from enclaveml.api.caltrain import dataset_folder
    from enclaveml.data.folder import list_image_folder

    ds = _Images()
    root = dataset_folder(ds, tmp_path / "a")
    classes, samples = list_image_folder(root)
    assert classes == sorted(ds.classes) and len(samples) == len(ds)
    again = dataset_folder(ds, tmp_path / "b")
    assert [(tmp_path / "a" / p.relative_to(again)).read_bytes() == p.read_bytes()
            for p in sorted(again.rglob("*.png"))] == [True] * len(ds)
    with pytest.raises(UserInputError, match=".classes"):
        dataset_folder([(torch.zeros(3, 4, 4), 0)], tmp_path / "c")
