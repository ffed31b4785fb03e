"""The layer-sequence view: partition points and FrontNet/BackNet splits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from enclaveml.errors import PartitionError, UnknownModel
from enclaveml.models import LayeredModel
from enclaveml.models import zoo


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_split_composition_is_bit_identical(name):
    torch.manual_seed(0)
    model = zoo.load(name, pretrained=False)
    # Non-trivial batch-norm statistics, so eval mode is not the identity.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        whole = model(x)
        for p in model.partition_points():
            front, back = model.split(p.index)
            ir = front(x)
            assert tuple(ir.shape[1:]) == p.out_shape
            assert torch.equal(back(ir), whole), f"{name} split at {p.index} ({p.name}) differs"


def test_points_cover_every_boundary():
    model = zoo.load("darknet", pretrained=False)
    points = model.partition_points()
    assert [p.index for p in points] == list(range(1, len(model)))
    assert points[0].name == "conv1" and points[-1].name == "gap"
    assert points[-1].out_shape == (512,)


def test_user_sequential_and_block_list():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    m = LayeredModel.from_sequential(seq, (1, 8, 8), 3)
    assert m.names == ["0", "1", "2", "3"]
    assert [p.out_shape for p in m.partition_points()] == [(4, 6, 6), (4, 6, 6), (144,)]
    blocks = LayeredModel.from_sequential(list(seq), (1, 8, 8), 3)
    assert blocks.names[0] == "layer0"
    x = torch.randn(2, 1, 8, 8)
    front, back = m.split(2)
    assert torch.equal(back(front(x)), seq(x))


@pytest.mark.parametrize("k", [0, 13, -1, 99])
def test_out_of_range_point_is_a_clear_error(k):
    model = zoo.load("darknet", pretrained=False)
    with pytest.raises(PartitionError, match="out of range"):
        model.split(k)


def test_unknown_zoo_model():
    with pytest.raises(UnknownModel, match="known: darknet"):
        zoo.entry("resnet9000")


def test_penultimate_is_classifier_input():
    model = zoo.load("extraction", pretrained=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb = model.penultimate(x)
        assert torch.allclose(model.layers.fc(emb), model(x))
