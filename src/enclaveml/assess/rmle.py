"""White-box inversion: regularised maximum-likelihood estimation of x from IR_k (owner side).

The strongest attacker knows the FrontNet's weights (e.g. a leaked or public pretrained
FrontNet). Starting from grey, Adam searches for the image whose IR matches the observed one,
with a total-variation prior that favours natural images (He et al., ACSAC 2019, "rMLE").
Pixels are parameterised as sigmoid(z) so they stay in [0, 1]. The search stops early once its
objective improves by less than 1% over 30 steps (converged); the FrontNet it differentiates is an
inference copy with batch norm folded in (assess/inference.py), the same function.

All points search at once (`reconstruct_points`): the candidate images of every point are one
batch, and one pass of the folded model serves them all, each point's rows leaving the pass at
its own depth (a staircase). The work is the same as one search per point; the batches are 12x
larger. The points are split in one set per core of equal FrontNet cost (`balanced_sets`), each set
one staircase search on one thread, side by side (assess/threads.py). Each point keeps its own
objective, Adam moments and stopping rule, so the searches do not interact: how the points are
grouped changes nothing but float rounding. With `bf16` the staircase's passes run under bfloat16
autocast (the objective, the prior and Adam stay float32): 0.67x the CPU time on darknet; a strided
depthwise convolution's input gradient is then computed by the float32 kernel (assess/strided.py:
bfloat16's is a slow path, 60% of a step on EfficientNet-Lite0; the same forward and gradient, from a faster kernel).
"""

from __future__ import annotations

import torch

from .affine import affine_copies
from .inference import folded
from .kl_screen import bf16_is_fast
from .leakage import AssessContext, LeakageResult, LeakageTest, PointData, register
from .metrics import psnr, ssim
from .strided import with_fast_input_grads
from .threads import side_by_side

#: Adam's constants (torch.optim.Adam's defaults), for the batched search's own update
BETAS, EPS = (0.9, 0.999), 1e-8


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


def reconstruct_points(model: torch.nn.Module, pre, targets: dict[int, torch.Tensor], shape: tuple[int, ...],
                       steps: "int | dict[int, int]", lr: float, tv: float, window: int = 0, min_delta: float = 0.01,
                       bf16: bool = False) -> dict[int, tuple[torch.Tensor, int]]:
    """`reconstruct` for every point k of `targets` (IR_k of the same images) at once, through
    `model.run(x, start, stop)`: {k: (images, steps taken)}; `steps` is one budget for all points or
    one per point.

    The rows of the batch are grouped by point, shallowest first; after layer k the rows of point
    k leave the pass, so each row runs exactly its own FrontNet. Adam's update is elementwise, so
    one update of the whole batch is each point's own update; a point that converges, or whose
    budget is spent, leaves the batch with its moments.
    """
    ks = sorted(targets)
    budget = {k: int(steps[k] if isinstance(steps, dict) else steps) for k in ks}
    steps = max(budget.values(), default=0)
    rows = {k: int(targets[k].shape[0]) for k in ks}
    scale = {k: targets[k].flatten(1).pow(2).mean(1).clamp_min(1e-8) for k in ks}
    z = torch.zeros(sum(rows.values()), *shape)
    m1, m2 = torch.zeros_like(z), torch.zeros_like(z)
    history: dict[int, list[float]] = {k: [] for k in ks}
    done: dict[int, tuple[torch.Tensor, int]] = {}
    active = list(ks)
    for step in range(steps):
        spent = [k for k in active if step >= budget[k]]
        if spent:  # these points' budgets ran out: they leave with their images after budget[k] steps
            keep, row = torch.ones(z.shape[0], dtype=torch.bool), 0
            for k in list(active):
                if k in spent:
                    done[k] = (torch.sigmoid(z[row:row + rows[k]]), budget[k])
                    keep[row:row + rows[k]] = False
                    active.remove(k)
                row += rows[k]
            z, m1, m2 = z[keep], m1[keep], m2[keep]
            if not active:
                break
        z.requires_grad_(True)
        x = torch.sigmoid(z)
        h, at, row, total, finished = pre.normalise(x), 0, 0, 0.0, []
        for k in active:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                h = model.run(h, at, k)
            at, n = k, rows[k]
            out, h = h[:n].float(), h[n:]
            fit = (out - targets[k]).flatten(1).pow(2).mean(1) / scale[k]
            loss = (fit + tv * total_variation(x[row:row + n])).sum()
            history[k].append(float(loss.detach()))
            if window and converged(history[k], window, min_delta):
                finished.append((k, row, n))
            total = total + loss
            row += n
        (grad,) = torch.autograd.grad(total, z)
        z = z.detach()
        if finished:  # converged points leave with the images that gave the converged objective
            keep = torch.ones(z.shape[0], dtype=torch.bool)
            for k, r, n in finished:
                done[k] = (torch.sigmoid(z[r:r + n]), step)
                keep[r:r + n] = False
                active.remove(k)
            z, m1, m2, grad = z[keep], m1[keep], m2[keep], grad[keep]
            if not active:
                break
        t = step + 1
        m1.mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
        m2.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
        denom = (m2.sqrt() / (1 - BETAS[1] ** t) ** 0.5).add_(EPS)
        z.addcdiv_(m1, denom, value=-lr / (1 - BETAS[0] ** t))
    row = 0
    for k in active:  # the step budget ran out
        done[k] = (torch.sigmoid(z[row:row + rows[k]]), budget[k])
        row += rows[k]
    return done


def step_budgets(flops: dict[int, float], steps: int, full_flops: float, min_steps: int) -> dict[int, int]:
    """Adam steps per point: `steps` for a FrontNet of at most `full_flops` FLOPs per image, else
    proportionally fewer (the same compute per search), never fewer than `min_steps` (nor more than `steps`)."""
    floor = min(steps, min_steps)
    return {k: steps if f <= full_flops else max(floor, min(steps, round(steps * full_flops / f)))
            for k, f in flops.items()}


def near_threshold(ssims: dict[int, float], threshold: float, near: float) -> list[int]:
    """Points (of those searched with a cut budget) whose rMLE SSIM is within `near` of the SSIM
    threshold or above it: there more steps could change the inversion verdict, so they get all of them."""
    return sorted(k for k, s in ssims.items() if s >= threshold - near)


def converged(history: list[float], window: int, min_delta: float) -> bool:
    """True when the last value is less than `min_delta` (relative) below the value `window` steps before."""
    if len(history) <= window:
        return False
    before, now = history[-1 - window], history[-1]
    return now > before * (1 - min_delta)


def balanced_sets(costs: dict[int, float], workers: int) -> list[list[int]]:
    """Points split into at most `workers` sets of near-equal total cost (largest first, each to the
    least-loaded set), each sorted: one staircase search per set, the sets side by side on the cores."""
    sets: list[list[int]] = [[] for _ in range(max(1, min(workers, len(costs))))]
    load = [0.0] * len(sets)
    for k in sorted(costs, key=lambda k: (-costs[k], k)):
        i = min(range(len(sets)), key=lambda j: (load[j], j))
        sets[i].append(k)
        load[i] += costs[k]
    return [sorted(s) for s in sets if s]


def frontnet_flops(model: torch.nn.Module, ks: list[int], shape: tuple[int, ...]) -> dict[int, float]:
    """FLOPs of each point's FrontNet on one image, from one counted pass through `model.run`."""
    from torch.utils.flop_counter import FlopCounterMode

    out, h, at, total = {}, torch.zeros(1, *shape), 0, 0.0
    with torch.no_grad():
        for k in sorted(ks):
            with FlopCounterMode(display=False) as fc:
                h = model.run(h, at, k)
            total += fc.get_total_flops()
            out[k], at = max(total, 1.0), k
    return out


def point_groups(ks: list[int], rows: int, pixels: int, budget: int = 2 ** 20) -> list[list[int]]:
    """Points in depth order, grouped so that one group's batch holds at most `budget` pixels
    (rows x H x W; at least one point a group): bounded memory on large inputs (ImageNet)."""
    per = max(1, budget // max(1, rows * pixels))
    return [ks[i:i + per] for i in range(0, len(ks), per)]


@register
class RMLEInversion(LeakageTest):
    name = "rmle"
    kind = "inversion"

    def __init__(self, config):
        super().__init__(config)
        self._done: dict[int, tuple[torch.Tensor, int]] = {}
        self._copies: dict[int, int] = {}  # point -> the earlier point whose search serves it (assess/affine.py)
        self._precision = "float32"  # of the staircase searches
        self._budgets: dict[int, int] = {}  # point -> its search's step budget
        self._fast_grads = 0  # strided depthwise convolutions given the float32 input gradient (assess/strided.py)
        self._extended: set[int] = set()  # points searched again with every step (`near_threshold`)

    def prepare(self, ctx: AssessContext, points: list[PointData]) -> None:
        """Search for every point's images together (one staircase batch), when the model can run
        layer ranges (`run`); otherwise each point searches alone in `evaluate`."""
        fast = ctx.oracle if ctx.oracle is not None else ctx.model
        if not points or not callable(getattr(fast, "run", None)):
            return
        cfg = self.config
        n = min(cfg.rmle_samples, ctx.x_test.shape[0])
        shape = tuple(ctx.x_test.shape[1:])
        # a point whose IR is an affine copy or a reshape of an earlier one's (conv -> batch norm,
        # pool -> flatten) is attacked through the earlier point: the attacker knows the map, so the
        # source's reconstruction is this point's too; one search instead of two
        self._copies = {k: c.source for k, c in affine_copies({pt.point.index: pt.ir_test for pt in points}).items()}
        targets = {pt.point.index: pt.ir_test[:n] for pt in points if pt.point.index not in self._copies}
        # forward + backward cost grows with the FrontNet: split the points in sets of equal cost, one
        # per core; each set is one staircase search (in memory-bounded groups), single-threaded
        workers = ctx.cores()
        # counted on the model itself (the folded copy's zero-tap kernels would count extra multiplies)
        flops = frontnet_flops(ctx.model if callable(getattr(ctx.model, "run", None)) else fast, sorted(targets), shape)
        # large inputs: deep FrontNets search with fewer steps (config.py: rmle_full_flops); darknet, cnn26: all 150
        self._budgets = step_budgets(flops, cfg.rmle_steps, cfg.rmle_full_flops, cfg.rmle_min_steps)
        sets = balanced_sets({k: f * self._budgets[k] for k, f in flops.items()}, workers) \
            if workers > 1 and len(targets) > 1 else [sorted(targets)]

        bf16 = cfg.rmle_bf16 and bf16_is_fast()  # emulated bfloat16 would be slower, not faster
        self._precision = "bfloat16 autocast" if bf16 else "float32"
        if bf16:  # strided depthwise convolutions: their input gradient by the float32 kernel (assess/strided.py)
            fast, self._fast_grads = with_fast_input_grads(fast)

        def search(ks: list[int]) -> dict[int, tuple[torch.Tensor, int]]:
            found: dict[int, tuple[torch.Tensor, int]] = {}
            for group in point_groups(ks, n, shape[-1] * shape[-2]):
                found.update(reconstruct_points(
                    fast, ctx.pre, {k: targets[k] for k in group}, shape, {k: self._budgets[k] for k in group},
                    cfg.rmle_lr, cfg.rmle_tv,
                    cfg.rmle_window if cfg.rmle_early_stop else 0, cfg.rmle_min_delta, bf16=bf16))
            return found

        for found in side_by_side(search, sets, workers):
            self._done.update(found)
        # a cut budget near the verdict: search those points again with every step (the review's safeguard)
        x = ctx.x_test[:n]
        again = near_threshold({k: float(ssim(self._done[k][0], x).mean()) for k in self._done
                                if self._budgets[k] < cfg.rmle_steps}, cfg.ssim_threshold, cfg.rmle_full_near)
        if again:
            self._extended = set(again)
            self._budgets.update({k: cfg.rmle_steps for k in again})
            sets = balanced_sets({k: flops[k] for k in again}, workers) if workers > 1 and len(again) > 1 else [again]
            for found in side_by_side(search, sets, workers):
                self._done.update(found)

    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        cfg = self.config
        n = min(cfg.rmle_samples, ctx.x_test.shape[0])
        x = ctx.x_test[:n]
        k = self._copies.get(pt.point.index, pt.point.index)
        if k in self._done:  # kept (a few images a point): a later copy may need it
            recon, steps = self._done[k]
        else:
            k = pt.point.index
            front = folded(pt.front, tuple(x.shape[1:]))  # same function, faster; the target IR is the real FrontNet's
            recon, steps = reconstruct(front, ctx.pre, pt.ir_test[:n], tuple(x.shape[1:]), cfg.rmle_steps,
                                       cfg.rmle_lr, cfg.rmle_tv, cfg.rmle_window if cfg.rmle_early_stop else 0,
                                       cfg.rmle_min_delta)
        s, p = ssim(recon, x), psnr(recon, x)
        summary = {"ssim": float(s.mean()), "psnr": float(p.mean()), "ssim_min": float(s.min()),
                   "ssim_max": float(s.max()), "samples": n, "steps": steps, "step_budget": self._budgets.get(k, cfg.rmle_steps),
                   "precision": self._precision if k in self._done else "float32"}
        if k in self._done and self._fast_grads:
            summary["float32_grad_convs"] = self._fast_grads  # strided depthwise convolutions (assess/strided.py)
        if k in self._extended:
            summary["extended"] = True  # its cut budget came near the SSIM threshold: searched again, every step
        if k != pt.point.index:
            summary["search_of"] = k  # this point's IR is an affine copy of point k's: the same search
        return LeakageResult(summary, {"reconstructions": recon[: cfg.report_images]})
