"""The paper's KL test with a dual network (owner side, assessment).

IRGenNet is the FrontNet (layers 0..k-1); IRValNet is the whole model, the oracle F. Each IR
channel of a sample x, min-max normalised, resized to the input size and replicated to three
channels, is shown to the oracle as an image. delta_k(x) = min over channels of
KL(F(x) || F(channel image)); the baseline is KL(F(x) || uniform). A channel that beats the
baseline carries content the oracle recognises: the point leaks.

On a 10-class model, some channel out of hundreds can beat the uniform baseline by luck when its
blob happens to land on x's class. So each point also runs a permutation control: the channels of
a *different* test sample's IR against F(x) (`chance_fraction`). A point leaks when x's own
channels beat the baseline on more samples than another image's channels do (plus a configurable
tolerance): then the IR carries content of x itself, which is what the paper's test asks.
`any_channel_beats_uniform` keeps the paper's literal criterion for reference.

How sure that verdict is: `ci` holds a confidence interval of leak_fraction - chance_fraction
(paired over the samples, assess/confidence.py), the verdict it supports ("leaks", "passes" or
"undecided") and how many samples would decide it if the observed shares held; the
recommendation reads `ci.verdict`, not the point estimate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .confidence import kl_confidence
from .leakage import AssessContext, LeakageResult, LeakageTest, PointData, register
from .metrics import kl_divergence, kl_to_uniform


def channel_images(ir: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """IR channels (n, C, h, w) or (n, C) -> grey images (n*C, 1, H, W) in [0, 1] and a 'blank' mask.

    A constant channel (dead ReLU, or a 1x1 spatial IR) has no min-max normalisation; it becomes
    the black image and is flagged so the oracle sees it once, not once per channel.
    """
    if ir.dim() == 2:
        ir = ir[:, :, None, None]
    if ir.dim() != 4:
        raise ValueError(f"IR of shape {tuple(ir.shape)}: expected (n, C) or (n, C, h, w)")
    flat = ir.reshape(-1, 1, ir.shape[-2], ir.shape[-1]).float()
    lo = flat.amin(dim=(2, 3), keepdim=True)
    hi = flat.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    blank = span.flatten() <= 1e-6 * hi.abs().flatten().clamp_min(1.0)
    norm = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    norm[blank] = 0.0
    if norm.shape[-2:] != tuple(size):
        norm = F.interpolate(norm, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    return norm, blank


@torch.no_grad()
def oracle_probs(ctx: AssessContext, grey: torch.Tensor) -> torch.Tensor:
    """Softmax of the whole model on grey [0, 1] images (n, 1, H, W)."""
    x = ctx.pre.normalise(grey.expand(-1, 3, -1, -1))
    return torch.softmax((ctx.oracle or ctx.model)(x).float(), dim=-1)


@register
class KLTest(LeakageTest):
    name = "kl"
    kind = "kl"

    @torch.no_grad()
    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        size = tuple(ctx.x_test.shape[-2:])
        ir = pt.ir_test
        n, c = ir.shape[0], ir.shape[1]
        p = ctx.probs_test  # (n, K)
        blank_q = oracle_probs(ctx, torch.zeros(1, 1, *size))[0]
        q_all = torch.empty(n, c, p.shape[1])
        per_chunk = max(1, self.config.kl_batch // c)  # whole samples per oracle batch
        for s in range(0, n, per_chunk):
            imgs, blank = channel_images(ir[s:s + per_chunk], size)
            q = blank_q.expand(imgs.shape[0], -1).clone()
            live = (~blank).nonzero().flatten()
            for b in range(0, live.numel(), self.config.kl_batch):
                idx = live[b:b + self.config.kl_batch]
                q[idx] = oracle_probs(ctx, imgs[idx])
            m = imgs.shape[0] // c
            q_all[s:s + m] = q.view(m, c, -1)
        kl_all = kl_divergence(p[:, None, :], q_all)  # (n, c)
        delta, _ = kl_all.min(dim=1)
        base = kl_to_uniform(p)
        beat = delta < base
        blank_beat = kl_divergence(p, blank_q[None, :]) < base
        if n > 1:  # permutation control: sample i against the channels of sample i+1
            other = kl_divergence(p[:, None, :], q_all.roll(1, dims=0)).min(dim=1).values
            chance = other < base
        else:
            other = kl_divergence(p, blank_q[None, :])
            chance = blank_beat
        leak_fraction = float(beat.float().mean())
        chance_fraction = float(chance.float().mean())
        leaks = leak_fraction > chance_fraction + self.config.kl_tolerance
        summary = {
            "min": float(delta.median()),
            "uniform": float(base.median()),
            "leaks": bool(leaks),
            "leak_fraction": round(leak_fraction, 4),
            "chance_fraction": round(chance_fraction, 4),
            "control_min": float(other.median()),  # median delta with another image's channels
            "blank_fraction": round(float(blank_beat.float().mean()), 4),
            "any_channel_beats_uniform": bool(beat.any()),
            "delta": _quantiles(delta),
            "uniform_dist": _quantiles(base),
            "channels": int(c),
            "ci": kl_confidence(beat.tolist(), chance.tolist(), self.config.kl_tolerance, self.config.kl_confidence),
        }
        # the report shows, for the first sample, the channels the oracle found most like x
        k = min(self.config.report_images, c)
        order = kl_all[0].argsort()[:k]
        imgs0, _ = channel_images(ir[:1], size)
        return LeakageResult(summary, {"channels": imgs0[order]})


def _quantiles(v: torch.Tensor) -> dict:
    q = torch.quantile(v.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.double)).tolist()
    return {"min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4], "mean": float(v.mean())}
