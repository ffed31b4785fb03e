"""Partition points from a model's graph: residual, dense, depthwise and functional models split
bit-identically at every point; Sequential models keep their points; untraceable models fail in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from enclaveml.errors import PartitionError
from enclaveml.models import examples
from enclaveml.models.bundle import build_arch
from enclaveml.models.graph import as_layered, graph_model
from enclaveml.models.layers import LayeredModel
from enclaveml.models.zoo import darknet


def _randomise_bn(m: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a skipped or reordered op would change the output."""
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


GRAPH_MODELS = {
    "residual": (examples.resnet_cifar, (3, 32, 32)),
    "dense": (examples.densenet, (3, 32, 32)),
    "inverted_residual": (examples.mobilenet, (3, 32, 32)),
    "functional": (examples.functional_cnn, (3, 32, 32)),
}


@pytest.mark.parametrize("kind", sorted(GRAPH_MODELS))
def test_front_and_back_are_bit_identical_to_the_whole_model_at_every_point(kind):
    factory, shape = GRAPH_MODELS[kind]
    torch.manual_seed(0)
    model = _randomise_bn(factory())
    lm = graph_model(model, shape, 10)
    assert lm.traced_with == "fx" and len(lm) >= 5
    x = torch.rand(3, *shape)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(lm(x), ref)
        for p in lm.partition_points():
            front, back = lm.split(p.index)
            ir = front(x)
            assert tuple(ir.shape[1:]) == p.out_shape
            assert torch.equal(back(ir), ref), p


def test_residual_and_dense_blocks_are_cut_between_blocks_only():
    res = graph_model(examples.resnet_cifar(), (3, 32, 32), 10)
    # no point inside a block: the skip tensor is alive there; names come from the module path
    assert res.names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer1" in res.names and "layer4" in res.names and res.names[-3:] == ["avgpool", "flatten", "fc"]
    assert not any(n.startswith(("layer1_0_conv", "layer1_0_bn")) for n in res.names)
    dense = graph_model(examples.densenet(), (3, 32, 32), 10)
    # a DenseLayer's input is concatenated to its output: only the concatenation is a point
    assert not any("conv" in n or n.endswith("_bn") for n in dense.names if n.startswith("features_0"))
    assert "features_0_0" in dense.names and "features_0" in dense.names
    mob = graph_model(examples.mobilenet(), (3, 32, 32), 10)
    # blocks with a skip (features.1, features.2, features.4) stay whole; features.3 (stride 2) has none
    assert not any(n.startswith(("features_1_", "features_2_", "features_4_")) for n in mob.names)
    assert "features_3_conv_3" in mob.names


def test_resnet18_imagenet_points_and_determinism():
    a = graph_model(examples.resnet18(), (3, 224, 224), 1000)
    b = graph_model(examples.resnet18(), (3, 224, 224), 1000)
    assert a.names == b.names and list(a.state_dict()) == list(b.state_dict())
    assert "layer2" in a.names and a.partition_points()[a.names.index("layer2")].out_shape == (128, 28, 28)


def test_sequential_and_layered_models_keep_todays_points():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    lm = as_layered(seq, (3, 16, 16), 3)
    assert lm.names == ["0", "1", "2", "3"] and not hasattr(lm, "traced_with")
    zoo = darknet.build()
    assert as_layered(zoo, (3, 32, 32), 10) is zoo


def test_a_weight_used_on_both_sides_is_never_a_point():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.stem = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.conv(self.stem(x)))
            x = torch.relu(self.conv(x))  # the same weights again
            return self.fc(x.mean((2, 3)))

    lm = graph_model(Tied().eval(), (3, 8, 8), 2)
    # between the two uses of conv no point exists (its weights would reach the host)
    assert lm.names == ["stem", "conv", "relu", "mean", "fc"]  # "conv": its second call, "relu": the second relu
    for p in lm.partition_points():
        front, back = lm.split(p.index)
        front_ids = {id(t) for t in front.parameters()}
        assert not any(id(t) in front_ids for t in back.parameters()), p


class ShapeBranch(nn.Module):
    """fx cannot branch on a shape; torch.export can (the shape is static)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if x.shape[-1] > 8:
            x = self.pool(x)
        return self.fc(x.mean((2, 3)))


class DataBranch(ShapeBranch):
    def forward(self, x):
        x = torch.relu(self.conv(x))
        if x.sum() > 0:  # data-dependent: neither tracer can follow it
            x = self.pool(x)
        return self.fc(x.mean((2, 3)))


def test_torch_export_is_the_fallback_where_fx_cannot_trace():
    torch.manual_seed(0)
    m = ShapeBranch().eval()
    lm = graph_model(m, (3, 16, 16), 5)
    assert lm.traced_with == "export" and lm.names == ["conv", "relu", "pool", "mean", "fc"]
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        for p in lm.partition_points():
            front, back = lm.split(p.index)
            assert torch.equal(back(front(x)), m(x))


def test_an_untraceable_model_gets_one_line_naming_the_op_and_the_way_out():
    with pytest.raises(PartitionError) as e:
        graph_model(DataBranch().eval(), (3, 16, 16), 5)
    msg = str(e.value)
    assert "\n" not in msg and "if x.sum() > 0" in msg and "test_models_graph.py" in msg
    assert "torch.where" in msg and "nn.Sequential" in msg


def test_the_enclave_rebuilds_a_graph_model_from_an_allowed_factory():
    spec = "enclaveml.models.examples:resnet_cifar"
    owner = graph_model(examples.resnet_cifar(), (3, 32, 32), 10)
    rebuilt = build_arch({"factory": spec}, (3, 32, 32), 10, allowed_factories={spec})
    assert isinstance(rebuilt, LayeredModel) and rebuilt.names == owner.names
    k = owner.names.index("layer2") + 1
    front, back = owner.split(k)
    rfront, rback = rebuilt.split(k)
    rfront.load_state_dict(front.state_dict())
    rback.load_state_dict(back.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rback(rfront(x)), back(front(x)))


def test_load_user_model_takes_a_graph_model_with_its_own_parameter_names(tmp_path):
    from safetensors.torch import save_file

    from enclaveml.errors import UserInputError
    from enclaveml.models.loading import load_user_model

    torch.manual_seed(3)
    ref = _randomise_bn(examples.resnet_cifar())
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    lm, pre, _ = load_user_model("enclaveml.models.examples:resnet_cifar", str(tmp_path / "w.safetensors"), "3x32x32")
    assert lm.num_classes == 10 and "layer3" in lm.names
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(lm(x), ref(x))
    save_file({"fc.weight": torch.zeros(10, 128)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserInputError, match="does not fit"):
        load_user_model("enclaveml.models.examples:resnet_cifar", str(tmp_path / "bad.safetensors"), "3x32x32")
