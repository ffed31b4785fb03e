"""ONNX in: models exported to ONNX here, read back through onnx2torch, cut from their graph,
partitioned into a bundle whose public architecture file carries no weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from enclaveml.errors import UserInputError
from enclaveml.models import examples
from enclaveml.models.bundle import load_manifest, load_model_key, open_enclave_parts, read_public_bundle
from enclaveml.models.loading import load_model

pytest.importorskip("onnx")
try:  # through enclaveml's own import (stands in for torchvision where it is missing)
    from enclaveml.models.onnx_in import _onnx2torch
    _onnx2torch()
except UserInputError:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)


def _randomise_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


def _export(model, path, shape=(3, 32, 32)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.rand(2, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["scores"],
                          dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    cnn = examples.functional_cnn().eval()
    res = _randomise_bn(examples.resnet_cifar())
    return {"cnn": (cnn, _export(cnn, d / "cnn.onnx")), "residual": (res, _export(res, d / "residual.onnx"))}


@pytest.mark.parametrize("kind", ["cnn", "residual"])
def test_an_exported_model_reads_back_with_the_same_predictions_and_splits_exactly(exported, kind):
    ref, path = exported[kind]
    m, pre, classes = load_model(str(path))
    assert m.input_shape == (3, 32, 32) and m.num_classes == 10 and classes is None
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        whole = m(x)
        assert torch.allclose(whole, ref(x), rtol=0, atol=1e-5)
        assert torch.equal(whole.argmax(1), ref(x).argmax(1))
        points = m.partition_points()
        assert len(points) >= 5
        for p in points:
            front, back = m.split(p.index)
            assert torch.equal(back(front(x)), whole), p
    if kind == "residual":  # the residual blocks stay whole in the converted graph too
        assert not any("conv1" in n and "layer" in n for n in m.names)


def test_a_model_card_beside_the_onnx_file_gives_classes_and_raw_pixel_preprocessing(exported, tmp_path):
    _, path = exported["cnn"]
    (tmp_path / "m.onnx").write_bytes(path.read_bytes())
    (tmp_path / "model.json").write_text(json.dumps({"pixels": "0-255", "mean": [0, 0, 0], "std": [1, 1, 1],
                                                      "classes": [f"k{i}" for i in range(10)]}))
    m, pre, classes = load_model(str(tmp_path / "m.onnx"))
    assert classes == [f"k{i}" for i in range(10)]
    assert pre.mean == (0.0,) * 3 and pre.std == pytest.approx((1 / 255,) * 3)  # x * 255: raw 0..255 pixels
    (tmp_path / "model.json").write_text(json.dumps({"classes": ["a", "b"]}))
    with pytest.raises(UserInputError, match="2 class names"):
        load_model(str(tmp_path / "m.onnx"))


def test_not_an_onnx_file_is_one_line(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf")
    with pytest.raises(UserInputError, match="not a valid ONNX model"):
        load_model(str(tmp_path / "junk.onnx"))


def test_partition_onnx_writes_a_weightless_architecture_and_a_working_bundle(exported, tmp_path, monkeypatch):
    from enclaveml.cli import app

    ref, path = exported["residual"]
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["partition", "--onnx", str(path), "--at", "5", "--out", "b", "--owner-key", "o.key"])
    assert r.exit_code == 0, (r.output, r.exception)
    arch_file = tmp_path / "b.arch.onnx"
    man = load_manifest(tmp_path / "b")
    assert man.arch["factory"] == "enclaveml.models.onnx_in:architecture"
    assert man.arch["kwargs"]["path"] == str(arch_file.resolve())
    # the public architecture holds no weight of the model
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(i) for i in onnx.load(str(arch_file)).graph.initializer]
    assert all(float(abs(w).sum()) == 0.0 for w in weights if w.dtype.kind == "f")
    allowed = {"enclaveml.models.onnx_in:architecture"}
    with pytest.raises(UserInputError, match="not allowed"):
        read_public_bundle(tmp_path / "b")
    _, back = read_public_bundle(tmp_path / "b", allowed_factories=allowed)
    front, mapping = open_enclave_parts(tmp_path / "b", load_model_key(tmp_path / "b.modelkey"),
                                        allowed_factories=allowed)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = mapping.to_original(back(front(x)))
        assert torch.allclose(out, ref(x), rtol=0, atol=1e-4)
        assert torch.equal(out.argmax(1), ref(x).argmax(1))
    # a changed architecture file is refused (its SHA-256 is in the signed manifest)
    arch_file.write_bytes(arch_file.read_bytes() + b"\x00")
    from enclaveml.models.onnx_in import architecture

    with pytest.raises(UserInputError, match="failed"):
        read_public_bundle(tmp_path / "b", allowed_factories=allowed)
    with pytest.raises(UserInputError, match="SHA-256"):
        architecture(**man.arch["kwargs"])


def test_the_architecture_factory_reads_only_a_regular_file_with_the_pinned_hash(tmp_path):
    from enclaveml.models.onnx_in import architecture

    with pytest.raises(UserInputError, match="not a regular file"):
        architecture("/dev/zero", "00" * 32)  # an uploaded manifest names this path: never read forever
    (tmp_path / "a.onnx").write_bytes(b"x")
    with pytest.raises(UserInputError, match="SHA-256"):
        architecture(str(tmp_path / "a.onnx"), "00" * 32)
