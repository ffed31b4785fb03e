"""The decoder attacker's network: IR_k -> image (owner side, assessment).

One small convolutional decoder per point (He et al., ACSAC 2019, "inverse network"): convs at the
IR's size, then x2 bilinear upsampling to the input size; the width halves when the side doubles,
so every resolution level costs about the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SigmoidImage(torch.autograd.Function):
    """sigmoid(logits) widened to a float32, NCHW-contiguous image; its gradient in the logits' layout.

    The decoder's convolutions run channels-last (in bfloat16 under autocast) while the loss, its
    SSIM filter and the targets are NCHW float32. Converting here, once each way, hands the loss
    contiguous tensors and the last convolution's backward a channels-last gradient; before, the
    gradient came back NCHW and the sigmoid's backward and that convolution's took it in a layout
    other than their inputs'. The same values as `torch.sigmoid(z).float()` and its gradient (the
    sigmoid in the logits' dtype, the incoming gradient rounded to it), bit for bit.
    """

    @staticmethod
    def forward(ctx, z):
        y = torch.sigmoid(z)
        ctx.save_for_backward(y)
        ctx.layout = torch.channels_last if z.dim() == 4 and not z.is_contiguous() \
            and z.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return y.to(dtype=torch.float32, memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        g = torch.ops.aten.sigmoid_backward(grad.to(y.dtype), y)
        return g.contiguous(memory_format=ctx.layout)


def _width(r: int, base: int) -> int:
    """Channels at spatial size r: halve the width when the side doubles (constant cost per level)."""
    return int(max(16, min(128, base // max(r, 1))))


class Decoder(nn.Module):
    """IR (C, h, w) or (C,) -> image (3, H, W) in [0, 1]: convs at IR size, then x2 upsampling."""

    def __init__(self, ir_shape: tuple[int, ...], out_hw: tuple[int, int], mean: torch.Tensor,
                 std: torch.Tensor, base: int = 512):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        H, W = out_hw
        self.out_hw = out_hw
        if len(ir_shape) == 1 or (len(ir_shape) == 3 and ir_shape[1] * ir_shape[2] == 1):
            # a vector IR (after pooling; a 1x1 map is one too): project to a 4x4 map first. On cnn26's
            # 256x1x1 point this stem reaches SSIM 0.23 where convolutions on the 1x1 map reached 0.17
            c0 = _width(4, base)
            self.stem = nn.Sequential(nn.Flatten(), nn.Linear(ir_shape[0], c0 * 16), nn.Unflatten(1, (c0, 4, 4)),
                                      nn.ReLU(inplace=True))
            c, r = c0, 4
        else:
            c_in, h = ir_shape[0], ir_shape[1]
            c, r = _width(h, base), h
            self.stem = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        body: list[nn.Module] = [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        while r < H:
            r2 = min(2 * r, H)
            c2 = _width(r2, base)
            body += [nn.Upsample(size=(r2, round(r2 * W / H)), mode="bilinear", align_corners=False),
                     nn.Conv2d(c, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(inplace=True)]
            c, r = c2, r2
        body += [nn.Conv2d(c, 3, 3, padding=1)]
        self.body = nn.Sequential(*body)

    def forward(self, ir: torch.Tensor) -> torch.Tensor:
        """The reconstruction: float32, NCHW-contiguous, in [0, 1]."""
        z = (ir - self.mean) / self.std
        y = _SigmoidImage.apply(self.body(self.stem(z)))
        if y.shape[-2:] != self.out_hw:
            y = F.interpolate(y, size=self.out_hw, mode="bilinear", align_corners=False)
        return y


def channel_stats(ir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (0, 2, 3) if ir.dim() == 4 else (0,)
    mean = ir.mean(dim=dims, keepdim=True)[0]
    std = ir.std(dim=dims, keepdim=True)[0].clamp_min(1e-3)
    return mean, std
