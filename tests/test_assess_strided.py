"""rMLE's strided depthwise convolutions: the same forward, the input gradient by the float32 kernel (assess/strided.py)."""

import torch
from torch import nn

from enclaveml.assess.strided import StridedDepthwise, with_fast_input_grads


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(),
                         nn.Conv2d(16, 16, 4, stride=2, padding=1, groups=16), nn.ReLU6(),  # strided depthwise
                         nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise, stride 1: left alone
                         nn.Conv2d(16, 8, 1)).eval()


def _grad(net: nn.Module, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    (g,) = torch.autograd.grad(out.float().pow(2).sum(), x)
    return out.detach(), g


def test_same_forward_and_a_float32_input_gradient_under_bfloat16():
    net = _net()
    fast, n = with_fast_input_grads(net)
    assert n == 1 and isinstance(fast[2], StridedDepthwise) and type(net[2]) is nn.Conv2d  # a copy; net unchanged
    assert type(fast[4]) is nn.Conv2d
    x = torch.rand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    out32, g32 = _grad(net, x, False)
    out_a, g_a = _grad(net, x, True)  # bfloat16 autocast, the native bfloat16 backward
    out_b, g_b = _grad(fast, x, True)
    assert torch.equal(out_a, out_b)  # the same bfloat16 forward: the same activations and objective
    err_a = float((g_a - g32).abs().max() / g32.abs().max())
    err_b = float((g_b - g32).abs().max() / g32.abs().max())
    assert err_b <= err_a + 1e-3, (err_a, err_b)  # the whole net's gradient: no worse than bfloat16's backward
    # the layer alone: its input gradient is the float32 one of the bfloat16 forward (float64 reference)
    layer = fast[2]
    h = torch.randn(4, 16, 12, 12).contiguous(memory_format=torch.channels_last).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(h)
    gy = torch.randn(y.shape)
    (gh,) = torch.autograd.grad(y, h, gy.to(y.dtype))
    ref = torch.nn.grad.conv2d_input(h.shape, layer.weight.to(torch.bfloat16).double(), gy.to(torch.bfloat16).double(),
                                     2, 1, 1, 16)
    assert gh.dtype == torch.bfloat16 and float((gh.double() - ref).abs().max() / ref.abs().max()) < 8e-3
    f_out, f_g = _grad(fast, x, False)  # outside autocast: a plain convolution
    assert torch.allclose(f_out, out32, atol=1e-6) and torch.allclose(f_g, g32, rtol=1e-5, atol=1e-6)


def test_a_model_without_strided_depthwise_convolutions_is_returned_as_it_is():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3, groups=8))
    assert with_fast_input_grads(net) == (net, 0)
