"""White-box inversion: regularised maximum-likelihood estimation of x from IR_k (owner side).

The strongest attacker knows the FrontNet's weights (e.g. a leaked or public pretrained
FrontNet). Starting from grey, Adam searches for the image whose IR matches the observed one,
with a total-variation prior that favours natural images (He et al., ACSAC 2019, "rMLE").
Pixels are parameterised as sigmoid(z) so they stay in [0, 1].
"""

from __future__ import annotations

import torch

from .leakage import AssessContext, LeakageResult, LeakageTest, PointData, register
from .metrics import psnr, ssim


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image: mean absolute difference of neighbouring pixels."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def reconstruct(front: torch.nn.Module, pre, target: torch.Tensor, shape: tuple[int, ...], steps: int,
                lr: float, tv: float) -> torch.Tensor:
    """Images (n, *shape) in [0, 1] whose FrontNet IR is closest to `target` under the TV prior."""
    z = torch.zeros(target.shape[0], *shape, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    scale = target.flatten(1).pow(2).mean(1).clamp_min(1e-8)
    for _ in range(steps):
        x = torch.sigmoid(z)
        out = front(pre.normalise(x))
        fit = (out - target).flatten(1).pow(2).mean(1) / scale
        loss = (fit + tv * total_variation(x)).sum()
        (grad,) = torch.autograd.grad(loss, z)
        z.grad = grad
        opt.step()
    return torch.sigmoid(z.detach())


@register
class RMLEInversion(LeakageTest):
    name = "rmle"
    kind = "inversion"

    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        cfg = self.config
        n = min(cfg.rmle_samples, ctx.x_test.shape[0])
        x = ctx.x_test[:n]
        recon = reconstruct(pt.front, ctx.pre, pt.ir_test[:n], tuple(x.shape[1:]), cfg.rmle_steps, cfg.rmle_lr, cfg.rmle_tv)
        s, p = ssim(recon, x), psnr(recon, x)
        summary = {"ssim": float(s.mean()), "psnr": float(p.mean()), "ssim_min": float(s.min()),
                   "ssim_max": float(s.max()), "samples": n, "steps": cfg.rmle_steps}
        return LeakageResult(summary, {"reconstructions": recon[: cfg.report_images]})
