"""Loading a user's own model: `module:factory`, weights files, preprocessing, and the errors."""

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from enclaveml.errors import UnknownModel, UserInputError
from enclaveml.models.layers import LayeredModel
from enclaveml.models.loading import load_model, load_user_model, parse_input_size

USER_MODULE = '''
from torch import nn
preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
classes = [f"c{i}" for i in range(4)]

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

def blocks():
    return [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4)]

def broken():
    raise RuntimeError("no GPU here")

not_callable = 3
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


def test_sequential_factory_with_safetensors_and_pt_weights(user_module, tmp_path):
    import my_nets

    ref = my_nets.build().eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    x = torch.rand(2, 3, 16, 16)
    for w in ("w.safetensors", "w.pt"):
        model, pre, classes = load_user_model(f"{user_module}:build", str(tmp_path / w), "3x16x16")
        assert isinstance(model, LayeredModel) and len(model) == 5 and model.num_classes == 4
        assert torch.equal(model(x), ref(x))
        assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.25, 0.25, 0.25) and pre.size == (16, 16) and not pre.resize
        assert classes == ["c0", "c1", "c2", "c3"]
    _, pre, _ = load_user_model(f"{user_module}:blocks", None, "3x16x16", mean=[0, 0, 0], std=[1, 1, 1], resize=True)
    assert pre.mean == (0.0, 0.0, 0.0) and pre.resize


def test_user_model_errors_are_one_line_user_errors(user_module, tmp_path):
    with pytest.raises(UnknownModel):
        load_user_model("no_such_module_xyz:build")
    with pytest.raises(UnknownModel):
        load_user_model(f"{user_module}:missing")
    with pytest.raises(UnknownModel):
        load_user_model(f"{user_module}:not_callable")
    with pytest.raises(UserInputError, match="factory failed"):
        load_user_model(f"{user_module}:broken", None, "3x16x16")
    with pytest.raises(UserInputError, match="--input-size"):
        load_user_model(f"{user_module}:build")
    with pytest.raises(UserInputError, match="fails on an input"):
        load_user_model(f"{user_module}:blocks", None, "3x32x32")  # the Linear expects 16x16
    with pytest.raises(UserInputError, match="no such file"):
        load_user_model(f"{user_module}:build", str(tmp_path / "nope.pt"), "3x16x16")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="cannot read"):
        load_user_model(f"{user_module}:build", str(tmp_path / "junk.pt"), "3x16x16")
    save_file({"0.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserInputError, match="does not fit"):
        load_user_model(f"{user_module}:build", str(tmp_path / "bad.safetensors"), "3x16x16")
    for bad in ("224x224", "3x0x4", "1x28x28", "big"):
        with pytest.raises(UserInputError):
            parse_input_size(bad)
    assert parse_input_size("3x224x224") == (3, 224, 224)


def test_zoo_names_go_through_the_same_door():
    with pytest.raises(UnknownModel):
        load_model("resnet9000")
    model, pre, classes = load_model("darknet", pretrained=False)
    assert len(classes) == 10 and pre.size == (32, 32) and model.input_shape == (3, 32, 32)
    with pytest.raises(UserInputError):
        load_model("darknet", input_size="3x64x64", pretrained=False)


def test_efficientnet_lite0_as_a_user_model_matches_the_package(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    from enclaveml.models import efficientnet

    model, pre, classes = load_user_model("enclaveml.models.efficientnet:lite0", None, "3x224x224")
    assert len(model) == 20 and model.num_classes == 1000 and classes is None
    assert pre.size == (224, 224) and pre.mean[0] == pytest.approx(127 / 255)
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(efficientnet.packaged_weights_path(), weights_only=True))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)
    # the same network through --weights: architecture factory + exported safetensors
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "lite0.safetensors"))
    again, _, _ = load_user_model("enclaveml.models.efficientnet:lite0_untrained", str(tmp_path / "lite0.safetensors"), "3x224x224")
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-5)
