"""Black-box inversion: a decoder trained to map IR_k back to the input (owner side, assessment).

The host sees IR tensors; an attacker with data of the same distribution (here: the held-out
split) can learn the inverse of the FrontNet without its weights (He et al., ACSAC 2019, "inverse
network"). One small convolutional decoder per point, sized so every resolution level costs about
the same, trained briefly with Adam on MSE; scored by SSIM and PSNR on the test samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .leakage import AssessContext, LeakageResult, LeakageTest, PointData, register
from .metrics import psnr, ssim


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
        if len(ir_shape) == 1:  # a vector IR (after pooling): project to a 4x4 map first
            c0 = _width(4, base)
            self.stem = nn.Sequential(nn.Linear(ir_shape[0], c0 * 16), nn.Unflatten(1, (c0, 4, 4)), nn.ReLU(inplace=True))
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
        z = (ir - self.mean) / self.std
        y = torch.sigmoid(self.body(self.stem(z)))
        if y.shape[-2:] != self.out_hw:
            y = F.interpolate(y, size=self.out_hw, mode="bilinear", align_corners=False)
        return y


def _channel_stats(ir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (0, 2, 3) if ir.dim() == 4 else (0,)
    mean = ir.mean(dim=dims, keepdim=True)[0]
    std = ir.std(dim=dims, keepdim=True)[0].clamp_min(1e-3)
    return mean, std


def train_decoder(ir_train: torch.Tensor, x_train: torch.Tensor, steps: int, batch: int, lr: float,
                  seed: int) -> Decoder:
    """Fit a decoder IR -> pixels on the attacker's data; returns it in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = _channel_stats(ir_train)
    dec = Decoder(tuple(ir_train.shape[1:]), tuple(x_train.shape[-2:]), mean, std)
    dec = dec.to(memory_format=torch.channels_last)  # ~2x faster convs + batch norm on CPU
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    dec.train()
    m = ir_train.shape[0]
    # small convolutions on a small batch: extra CPU threads cost more in synchronisation than they
    # give (measured: 631 s with 2 threads vs 389 s with 1 for darknet's 12 decoders)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            idx = torch.randint(0, m, (min(batch, m),), generator=gen)
            loss = F.mse_loss(dec(ir_train[idx]), x_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return dec.eval()


@register
class DecoderInversion(LeakageTest):
    name = "decoder"
    kind = "inversion"

    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        cfg = self.config
        dec = train_decoder(pt.ir_train, ctx.x_train, cfg.decoder_steps, cfg.decoder_batch, cfg.decoder_lr,
                            cfg.seed + pt.point.index)
        with torch.no_grad():
            recon = torch.cat([dec(pt.ir_test[i:i + 256]) for i in range(0, pt.ir_test.shape[0], 256)])
        s, p = ssim(recon, ctx.x_test), psnr(recon, ctx.x_test)
        summary = {"ssim": float(s.mean()), "psnr": float(p.mean()), "ssim_min": float(s.min()),
                   "ssim_max": float(s.max()), "samples": int(s.numel()), "train_images": int(pt.ir_train.shape[0]),
                   "steps": cfg.decoder_steps}
        if not math.isfinite(summary["ssim"]):
            raise FloatingPointError("decoder inversion produced NaN")
        return LeakageResult(summary, {"reconstructions": recon[: cfg.report_images]})
