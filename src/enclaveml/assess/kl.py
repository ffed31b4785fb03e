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

The oracle's passes over the channel images are the whole cost; they run in bfloat16 first and in
float32 again near each minimum (assess/kl_screen.py), which keeps every minimum exact. Where the
bfloat16 error is large against the spread of a sample's KL values (EfficientNet-Lite0: errors of
0.2-0.5 nats, and an unrelated image's channels all within a nat of each other), most images go
through float32 again and the screen would cost more than it saves: after a point where more
than `SCREEN_MAX_FLOAT32` of the images needed float32, the later points run in float32 only
(cnn26 with random weights: near-uniform answers, every image in float32). With the margin
measured near the minima (kl_screen.py) EfficientNet-Lite0's deep points need 16-35%.
"""

from __future__ import annotations

import torch

from .confidence import kl_confidence
from .fused import fused_oracle
from .kl_screen import Answers, bf16_is_fast, channel_kl, normalised_maps, to_images
from .leakage import AssessContext, LeakageResult, LeakageTest, PointData, register
from .metrics import kl_divergence, kl_to_uniform

#: a bfloat16 pass costs about 0.55 of a float32 one (darknet, EfficientNet-Lite0 here): when more than
#: this share of a point's images needed float32 too, later points skip the screen (the same minima)
SCREEN_MAX_FLOAT32 = 0.45
#: judged on points with at least this many images (the screen's random check, >= 64 images, is then <= 1/8)
SCREEN_JUDGED_FROM = 512


def channel_images(ir: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """IR channels (n, C, h, w) or (n, C) -> grey images (n*C, 1, H, W) in [0, 1] and a 'blank' mask.

    A constant channel (dead ReLU, or a 1x1 spatial IR) has no min-max normalisation; it becomes
    the black image and is flagged so the oracle sees it once, not once per channel.
    """
    norm, blank = normalised_maps(ir)
    return to_images(norm.reshape(-1, *norm.shape[-2:]), size), blank.flatten()


@torch.no_grad()
def oracle_probs(ctx: AssessContext, grey: torch.Tensor, low_precision: bool = False,
                 oracle: torch.nn.Module | None = None) -> torch.Tensor:
    """Softmax of the whole model (`oracle`, else the context's) on grey [0, 1] images (n, 1, H, W),
    in bfloat16 when asked."""
    x = ctx.pre.normalise(grey.expand(-1, 3, -1, -1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
        logits = (oracle or ctx.oracle or ctx.model)(x)
    return torch.softmax(logits.float(), dim=-1)


@register
class KLTest(LeakageTest):
    name = "kl"
    kind = "kl"
    pool_priority = 1  # many independent oracle batches: they fill the cores around the attacks' rounds

    def __init__(self, config):
        super().__init__(config)
        self._previous: tuple[AssessContext, Answers] | None = None  # the last point's oracle answers
        self._screen_pays = True  # false once the bfloat16 screen sent most images to float32 anyway
        self._fused: tuple[AssessContext, torch.nn.Module] | None = None  # the oracle with fused convolutions

    def _oracle(self, ctx: AssessContext) -> torch.nn.Module:
        """The context's oracle with each convolution's activation or residual add fused in (assess/fused.py):
        the same answers, ~0.77x the CPU time on EfficientNet-Lite0; built once per context."""
        if self._fused is None or self._fused[0] is not ctx:
            base = ctx.oracle or ctx.model
            self._fused = (ctx, fused_oracle(base, tuple(ctx.x_test.shape[1:])))
        return self._fused[1]

    @torch.no_grad()
    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        size = tuple(ctx.x_test.shape[-2:])
        ir = pt.ir_test
        n, c = ir.shape[0], ir.shape[1]
        p = ctx.probs_test  # (n, K)
        oracle = self._oracle(ctx)
        blank_q = oracle_probs(ctx, torch.zeros(1, 1, *size), oracle=oracle)[0]
        screen = self.config.kl_screen and bf16_is_fast() and self._screen_pays
        previous = self._previous[1] if self._previous is not None and self._previous[0] is ctx else None
        # large inputs: fewer images per batch (512 at 224x224 would take 2.5 GB for one activation)
        batch = max(1, min(self.config.kl_batch, self.config.kl_batch_pixels // (size[0] * size[1])))
        kl_all, ctl_all, how, answers = channel_kl(
            lambda g, low: oracle_probs(ctx, g, low, oracle), ir, p, blank_q, size, batch, screen,
            seed=self.config.seed, previous=previous, workers=ctx.cores(),
            batch_float32=max(1, min(self.config.kl_batch_float32, batch)),
            audit_share=self.config.kl_audit_share, audit_min=self.config.kl_audit_min)
        self._previous = (ctx, answers)  # same samples and oracle: the next point may reuse them
        fresh = how.live - how.reused
        if how.screened and fresh >= SCREEN_JUDGED_FROM and how.float32 > SCREEN_MAX_FLOAT32 * fresh:
            # the minima were exact either way; computing most images twice costs more than float32 alone
            self._screen_pays = False
        delta, _ = kl_all.min(dim=1)
        base = kl_to_uniform(p)
        beat = delta < base
        blank_beat = kl_divergence(p, blank_q[None, :]) < base
        if n > 1:  # permutation control: sample i against the channels of sample i-1
            other = ctl_all.min(dim=1).values
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
            "oracle": {**how.to_dict(), "screen_skipped": bool(self.config.kl_screen and bf16_is_fast() and not screen)},
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
