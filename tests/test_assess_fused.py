"""The KL oracle's fused convolutions give the unfused oracle's answers (assess/fused.py)."""

import pytest
import torch
from torch import nn

from enclaveml.assess.fused import FusedConv2d, available, fused_oracle
from enclaveml.assess.inference import folded_layers, plain_padding_convs
from enclaveml.models.layers import LayeredModel

pytestmark = pytest.mark.skipif(not available(), reason="needs PyTorch with oneDNN (mkldnn)")


class Block(nn.Module):
    """An inverted-residual block as EfficientNet writes it: one ReLU6 module called twice, a residual add."""

    def __init__(self, c: int):
        super().__init__()
        self.expand = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(4 * c)
        self.dw = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c, bias=False)
        self.bn1 = nn.BatchNorm2d(4 * c)
        self.act = nn.ReLU6()
        self.project = nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        h = self.act(self.bn0(self.expand(x)))
        h = self.act(self.bn1(self.dw(h)))
        return self.project(h) + x


class SamePad(nn.Conv2d):
    """A TensorFlow-style "same" convolution: an asymmetric zero pad before an unpadded convolution."""

    def __init__(self, cin, cout, k, stride, pad, groups=1):
        super().__init__(cin, cout, k, stride, groups=groups)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x):
        return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, 1, self.groups)


def _model() -> LayeredModel:
    torch.manual_seed(0)
    stem = nn.Sequential(SamePad(3, 8, 3, 2, (0, 1, 0, 1)), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
    down = nn.Sequential(SamePad(8, 8, 5, 2, (1, 2, 1, 2), groups=8), nn.ReLU())
    head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    m = LayeredModel([("stem", stem), ("block", Block(8)), ("down", down), ("head", head)], (3, 20, 20), 10)
    for mod in m.modules():  # non-trivial batch-norm statistics, so the fold changes the weights
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m.eval().to(memory_format=torch.channels_last)


def test_asymmetric_pad_becomes_a_plain_convolution_with_zero_taps():
    conv = SamePad(4, 6, 3, 2, (0, 1, 0, 1))
    holder = nn.Sequential(conv)
    x = torch.randn(2, 4, 11, 12)
    ref = conv(x)
    assert plain_padding_convs(holder) == 1
    plain = holder[0]
    assert type(plain) is nn.Conv2d and plain.padding == (1, 1) and plain.kernel_size == (4, 4)
    assert torch.allclose(plain(x), ref, atol=1e-6)


def test_fused_oracle_equals_the_folded_oracle_in_both_precisions():
    model = _model()
    folded = folded_layers(model, (3, 20, 20))
    fused = fused_oracle(folded, (3, 20, 20))
    kinds = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    posts = sorted(m.attr if not m.add else "add" for m in kinds)
    # every convolution fused: stem (leaky ReLU), expand and depthwise (ReLU6), project (+ residual), down, head (SiLU)
    assert posts == ["add", "hardtanh", "hardtanh", "leaky_relu", "relu", "swish"]
    x = torch.rand(5, 3, 20, 20)
    with torch.no_grad():
        ref, out = model(x), fused(x)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(out, folded(x), atol=1e-6, rtol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, low_ref = fused(x).float(), folded(x).float()
    assert torch.allclose(low, low_ref, atol=0.1)  # both bfloat16: the same rounding scale
    assert not torch.allclose(low, out, atol=1e-6)  # and it really ran in bfloat16
    # the prefixes (a point's FrontNet) agree too
    assert torch.allclose(fused.run(x, 0, 2), folded.run(x, 0, 2), atol=1e-6)


def test_a_stage_that_cannot_fuse_is_kept():
    model = LayeredModel([("a", nn.Sequential(nn.Flatten(), nn.Linear(12, 4))), ("b", nn.Linear(4, 3))], (3, 2, 2), 3)
    folded = folded_layers(model.eval(), (3, 2, 2))
    assert fused_oracle(folded, (3, 2, 2)) is folded
