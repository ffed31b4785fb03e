"""Classifier heads: the class mapping permutes the last Linear / 1x1 conv whenever the rest of the
head treats the classes alike, and refuses (saying why) otherwise; bundles of such models still
compute the whole model's predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from enclaveml.crypto import SigningKey
from enclaveml.data.preprocess import Preprocessing
from enclaveml.errors import PartitionError
from enclaveml.models import examples
from enclaveml.models.bundle import make_bundle, open_enclave_parts, read_public_bundle
from enclaveml.models.graph import as_layered
from enclaveml.models.head import find_classifier

N = 5


def _trunk():
    return [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]


def _seq(*head):
    return as_layered(nn.Sequential(*_trunk(), *head).eval(), (3, 8, 8), N)


class ConvHead(nn.Module):
    """A fully convolutional classifier: 1x1 conv to the classes, then global pooling (functional)."""

    def __init__(self, act=None):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Conv2d(8, N, 1)
        self.act = act

    def forward(self, x):
        x = self.cls(F.relu(self.body(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.act(x) if self.act is not None else x


@pytest.mark.parametrize("head,keys", [
    ((nn.Linear(8, N),), ("4.weight", "4.bias")),
    ((nn.Linear(8, N), nn.ReLU()), ("4.weight", "4.bias")),
    ((nn.Linear(8, N), nn.Softmax(dim=1)), ("4.weight", "4.bias")),
    ((nn.Linear(8, N), nn.LogSoftmax(dim=-1)), ("4.weight", "4.bias")),
    ((nn.Dropout(0.2), nn.Linear(8, N, bias=False), nn.Identity()), ("5.weight",)),
    ((nn.Sequential(nn.Dropout(0.2), nn.Linear(8, N)),), ("4.1.weight", "4.1.bias")),  # EfficientNet's fc block
])
def test_equivariant_heads_after_a_linear_are_accepted(head, keys):
    c = find_classifier(_seq(*head))
    assert c.keys == keys and c.kind == "linear" and c.layer in (4, 5)


def test_a_1x1_conv_classifier_with_global_pooling_is_accepted():
    lm = as_layered(ConvHead().eval(), (3, 8, 8), N)
    c = find_classifier(lm)
    assert c.kind == "conv1x1" and c.keys == ("cls.cls.weight", "cls.cls.bias") and lm.names[c.layer] == "cls"
    lm = as_layered(ConvHead(nn.Softmax(dim=1)).eval(), (3, 8, 8), N)
    assert find_classifier(lm).kind == "conv1x1"


@pytest.mark.parametrize("head,why", [
    ((nn.Linear(8, N), nn.BatchNorm1d(N)), "BatchNorm1d"),
    ((nn.Linear(8, N), nn.Softmax(dim=0)), "dim=0"),
    ((nn.Linear(8, N), nn.PReLU(N)), "per-channel"),
])
def test_heads_that_treat_classes_differently_are_refused_saying_why(head, why):
    with pytest.raises(PartitionError, match=why) as e:
        find_classifier(_seq(*head))
    assert "permutation-equivariant" in str(e.value) and "\n" not in str(e.value)


def test_a_per_class_constant_after_the_classifier_is_refused():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, N)
            self.prior = nn.Parameter(torch.randn(N))

        def forward(self, x):
            return self.fc(F.relu(self.body(x)).mean((2, 3))) + self.prior

    with pytest.raises(PartitionError, match="arithmetic"):
        find_classifier(as_layered(Biased().eval(), (3, 8, 8), N))


def test_no_classifier_at_all_is_refused():
    lm = as_layered(nn.Sequential(nn.Conv2d(3, N, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Sigmoid()).eval(),
                    (3, 8, 8), N)
    with pytest.raises(PartitionError, match="3x3|no nn.Linear|Conv2d"):
        find_classifier(lm)


@pytest.mark.parametrize("name", ["functional_cnn", "mobilenet", "allconv"])
def test_bundles_with_such_heads_reproduce_the_whole_model(tmp_path, name):
    """Owner splits a graph model; host and enclave rebuild it from the allowed factory; the
    host's scores come out in the secret order and the enclave's mapping restores the model's."""
    spec = f"enclaveml.models.examples:{name}"
    torch.manual_seed(0)
    model = getattr(examples, name)().eval()
    shape = (3, 32, 32)
    lm = as_layered(model, shape, 10)
    k = find_classifier(lm).layer  # the deepest point that leaves the classifier on the host
    owner = SigningKey.generate()
    pre = Preprocessing(size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)
    names = [f"c{i}" for i in range(10)]
    if k + 1 < len(lm):
        with pytest.raises(PartitionError, match="FrontNet"):
            make_bundle(lm, k + 1, tmp_path / "too-deep", {"factory": spec}, pre, names, owner)
    man, key = make_bundle(lm, k, tmp_path / "b", {"factory": spec}, pre, names, owner)
    allowed = {spec}
    _, back = read_public_bundle(tmp_path / "b", owner.public_key(), allowed_factories=allowed)
    front, mapping = open_enclave_parts(tmp_path / "b", key, owner.public_key(), allowed_factories=allowed)
    x = torch.rand(8, *shape)
    with torch.no_grad():
        ref = model(x)
        host = back(front(x))
        out = mapping.to_original(host)
    assert not torch.equal(host, ref)  # the host's scores are in the secret order
    # the GEMM on permuted rows may round differently in the last bit (BLAS tiling), nothing more
    assert torch.allclose(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(out.argmax(1), ref.argmax(1))
