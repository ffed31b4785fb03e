"""rMLE's FrontNet copy with a fast input gradient for strided depthwise convolutions (owner side, assessment).

Why: rMLE differentiates the FrontNet with respect to its input under bfloat16 autocast, and this
PyTorch's oneDNN backward of a *strided depthwise* convolution in bfloat16 takes a slow path: on
EfficientNet-Lite0's four stride-2 depthwise convolutions (8 images) 32-118 ms against 1-4 ms for
their forward, 60% of an rMLE step at the head point (docs/benchmarks.md, "helper kl, session 7").
The float32 backward of the same convolution is the fast kernel (2-22 ms). So `StridedDepthwise`
runs its forward as before (bfloat16 under autocast: the same activations, the same objective) and
computes its input gradient with the fast float32 kernel, cast back to the activation's dtype: the
gradient of the same forward at bfloat16 precision, as autocast's backward gives it (the review
measured 1.9e-3 relative error against float64 for both). Weights get no gradient (rMLE's copy has none). Outside bfloat16
autocast the module is a plain `F.conv2d`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class _Float32InputGrad(torch.autograd.Function):
    """conv2d(x, w, b) in x's dtype; d/dx by the float32 convolution backward (w, b: no gradient)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups, x.dtype)
        ctx.save_for_backward(w)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, dtype = ctx.conf
        g = grad.float().contiguous(memory_format=torch.channels_last)
        shell = torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last)  # its shape only
        gx = torch.ops.aten.convolution_backward(g, shell, w.float(), None, stride, padding, dilation, False, [0, 0],
                                                 groups, [True, False, False])[0]
        return gx.to(dtype), None, None, None, None, None, None


class StridedDepthwise(nn.Module):
    """A strided depthwise `nn.Conv2d` (zero padding) whose input gradient under bfloat16 autocast is float32's."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), int(conv.groups)
        self._low: tuple[torch.Tensor, torch.Tensor | None] | None = None  # bfloat16 weights, made on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _bf16_autocast() or not x.requires_grad:
            w, b = self.weight, self.bias
            if _bf16_autocast():
                x, w, b = x.to(torch.bfloat16), w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16)
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if self._low is None:
            self._low = (self.weight.to(torch.bfloat16), None if self.bias is None else self.bias.to(torch.bfloat16))
        w, b = self._low
        with torch.autocast("cpu", enabled=False):
            return _Float32InputGrad.apply(x.to(torch.bfloat16), w, b, self.stride, self.padding, self.dilation,
                                           self.groups)


def _strided_depthwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels
            and max(m.stride) > 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple))


def with_fast_input_grads(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` (rMLE's folded FrontNets) with every strided depthwise convolution a
    `StridedDepthwise`, and how many were replaced; `model` itself when there is none."""
    names = [n for n, m in model.named_modules() if _strided_depthwise(m)]
    if not names:
        return model, 0
    new = copy.deepcopy(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = new.get_submodule(parent) if parent else new
        setattr(owner, leaf, StridedDepthwise(getattr(owner, leaf)))
    return new, len(names)
