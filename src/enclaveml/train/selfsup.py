"""The host's label-free objective under `--defence selfsup`: its layers learn without labels.

Trust side: host. Under `labelfree` the enclave hands the host one batch-mean row per batch, so
no instance's label leaves the enclave, and the host's layers learn almost nothing: they stay
near their random initialisation and the model loses 11-26 points (docs/caltrain.md). Here the
host also trains its layers with a self-supervised loss computed from its own inputs and outputs
only (the IRs it receives and what its layers make of them), so what it learns from cannot
depend on a label: VICReg (Bardes, Ponce and LeCun, ICLR 2022) between the output of the IR and
the output of a second view the host makes of the IR (random shift, flip and channel dropout of
the feature map), with the variance and covariance terms keeping the features spread and
decorrelated. The enclave still trains the FrontNet from its local classifier and the sealed
head from the labels; the rows it hands back are `labelfree`'s.

Pure tensor logic: `HostObjective.loss` is called by `partitioned.HostTrainer` on its graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def ir_view(ir: torch.Tensor, gen: torch.Generator, drop: float = 0.2, shift: int = 1) -> torch.Tensor:
    """A second view of a batch of IRs: per row a random shift by up to `shift` cells (reflect
    padding) and a horizontal flip of the feature map, then channel dropout. A flat IR (N, D)
    gets the dropout only."""
    n = ir.shape[0]
    x = ir
    if ir.dim() == 4 and shift > 0 and min(ir.shape[-2:]) > shift:
        h, w = ir.shape[-2:]
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(ir.device)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(ir.device)
        x = padded[torch.arange(n, device=ir.device).view(n, 1, 1, 1),
                   torch.arange(ir.shape[1], device=ir.device).view(1, -1, 1, 1),
                   rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
        flip = (torch.rand(n, generator=gen) < 0.5).to(ir.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    if drop > 0:
        shape = (n, ir.shape[1]) + (1,) * (ir.dim() - 2)
        keep = (torch.rand(shape, generator=gen) >= drop).to(ir.device, ir.dtype)
        x = x * keep / (1.0 - drop)
    return x


def vicreg(z_a: torch.Tensor, z_b: "torch.Tensor | None", inv: float = 25.0, var: float = 25.0,
           cov: float = 1.0) -> torch.Tensor:
    """VICReg's loss: invariance (mean squared difference of the two views, when `z_b` is given),
    variance (hinge on each feature's standard deviation at 1) and covariance (squared
    off-diagonal covariances / dim), over both views."""
    za = z_a.reshape(z_a.shape[0], -1)
    views = [za] if z_b is None else [za, z_b.reshape(z_b.shape[0], -1)]
    n, d = za.shape
    loss = inv * F.mse_loss(views[0], views[1]) if len(views) == 2 else za.new_zeros(())
    for z in views:
        zc = z - z.mean(0)
        std = torch.sqrt(zc.var(0) + 1e-4)
        c = zc.T @ zc / max(1, n - 1)
        off = c - torch.diag(torch.diag(c))
        loss = loss + var * F.relu(1.0 - std).mean() + cov * off.pow(2).sum() / d
    return loss


@dataclass(frozen=True)
class HostObjective:
    """The host's self-supervised loss on one batch (scaled by `weight`): VICReg on its output
    for the IR and, with `views=2`, for a second view of it (`ir_view`); `views=1` keeps only the
    variance and covariance terms (no second forward pass)."""

    weight: float = 0.01
    views: int = 2

    def loss(self, module: nn.Module, ir: torch.Tensor, out: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to add to the host's backward (`ir` and `out`: this batch's, with their graph)."""
        if self.views == 1:
            return self.weight * vicreg(out, None)
        gen = torch.Generator().manual_seed(1_000_003 * int(step) + 7)  # the host's own, no secret
        return self.weight * vicreg(out, module(ir_view(ir, gen)))
