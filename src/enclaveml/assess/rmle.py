"""White-box inversion: regularised maximum-likelihood estimation of x from IR_k (owner side).

The strongest attacker knows the FrontNet's weights (e.g. a leaked or public pretrained
FrontNet). Starting from grey, Adam searches for the image whose IR matches the observed one,
with a total-variation prior that favours natural images (He et al., ACSAC 2019, "rMLE").
Pixels are parameterised as sigmoid(z) so they stay in [0, 1]. The search stops early once its
objective improves by less than 1% over 30 steps (converged); the FrontNet it differentiates is an
inference copy with batch norm folded in (assess/inference.py), the same function.
"""

from __future__ import annotations

import torch

from .inference import folded
from .leakage import AssessContext, LeakageResult, LeakageTest, PointData, register
from .metrics import psnr, ssim


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image: mean absolute difference of neighbouring pixels."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def reconstruct(front: torch.nn.Module, pre, target: torch.Tensor, shape: tuple[int, ...], steps: int,
                lr: float, tv: float, window: int = 0, min_delta: float = 0.01) -> tuple[torch.Tensor, int]:
    """Images (n, *shape) in [0, 1] whose FrontNet IR is closest to `target` under the TV prior,
    and the steps taken.

    With `window` > 0 the search stops early once the objective has improved by less than
    `min_delta` (relative) over the last `window` steps: converged, further steps change little.
    """
    z = torch.zeros(target.shape[0], *shape, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    scale = target.flatten(1).pow(2).mean(1).clamp_min(1e-8)
    history: list[float] = []
    for step in range(steps):
        x = torch.sigmoid(z)
        out = front(pre.normalise(x))
        fit = (out - target).flatten(1).pow(2).mean(1) / scale
        loss = (fit + tv * total_variation(x)).sum()
        history.append(float(loss.detach()))
        if window and converged(history, window, min_delta):
            return torch.sigmoid(z.detach()), step
        (grad,) = torch.autograd.grad(loss, z)
        z.grad = grad
        opt.step()
    return torch.sigmoid(z.detach()), steps


def converged(history: list[float], window: int, min_delta: float) -> bool:
    """True when the last value is less than `min_delta` (relative) below the value `window` steps before."""
    if len(history) <= window:
        return False
    before, now = history[-1 - window], history[-1]
    return now > before * (1 - min_delta)


@register
class RMLEInversion(LeakageTest):
    name = "rmle"
    kind = "inversion"

    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        cfg = self.config
        n = min(cfg.rmle_samples, ctx.x_test.shape[0])
        x = ctx.x_test[:n]
        front = folded(pt.front, tuple(x.shape[1:]))  # same function, faster; the target IR is the real FrontNet's
        recon, steps = reconstruct(front, ctx.pre, pt.ir_test[:n], tuple(x.shape[1:]), cfg.rmle_steps, cfg.rmle_lr,
                                   cfg.rmle_tv, cfg.rmle_window if cfg.rmle_early_stop else 0, cfg.rmle_min_delta)
        s, p = ssim(recon, x), psnr(recon, x)
        summary = {"ssim": float(s.mean()), "psnr": float(p.mean()), "ssim_min": float(s.min()),
                   "ssim_max": float(s.max()), "samples": n, "steps": steps, "step_budget": cfg.rmle_steps}
        return LeakageResult(summary, {"reconstructions": recon[: cfg.report_images]})
