"""The KL test's oracle queries: every channel image in bfloat16, float32 where the minimum is (owner side).

The KL test needs, per sample, only the *smallest* KL over its IR channels (and over another
sample's channels, for the permutation control); the oracle's pass over a channel image is the
whole cost. So every channel image first goes through the oracle in bfloat16 (about 1.8x faster
on CPUs with bfloat16 dot products, AVX512-BF16 or AMX), and the images whose bfloat16 KL lies
within half a margin of their sample's smallest float32 KL go through again in float32. With the
bfloat16 error below half the margin, no other channel can hold the minimum, so the minimum, the
verdicts and every statistic built from the minima equal a float32-only run's (to float rounding)
as long as the errors measured (below) bound those of the images skipped: a measured bound, not a
proof (docs/assessment.md, "KL test"; `kl_screen=False` runs everything in float32).

The margin is checked, not assumed: a seeded random share of all channel images and every row's
bfloat16 minimum are computed in both precisions as well (first: the margin starts at four times
the largest error there, at most 0.1); an image is recomputed when its bfloat16 KL lies within
half the margin of its row's smallest float32 KL so far, and while the largest error seen among
the images that matter (each row's bfloat16 minimum, and every float32-checked image within one
margin of its row's exact minimum) exceeds a third of the margin, or any checked image farther
out was overestimated by at least 2/3 of its distance from the minimum, the margin grows to cover
it and the new candidates are recomputed. So a skipped image could hold the minimum only if
bfloat16 overestimated its KL by more than 1.5 times what was measured at its distance
(underestimates make candidates, never skipped images). An error far above every minimum that is
small against its distance does not widen the margin: there the answers are peaked on another
class and bfloat16's error has a heavy tail (up to 1 nat on EfficientNet-Lite0 at 224x224,
against ~0.1-0.2 near a minimum), which made the margin, measured over all images, cover most
channels (86-99% recomputed). On darknet the bfloat16 KL error is at most ~0.04 (KL values
0.5-5). Without fast bfloat16, or with `kl_screen` off, everything runs
in float32, as before.

The audit (after the screen decided): a seeded random draw of the images it skipped (`audit_share`,
at least `audit_min`) goes through float32. One below its row's minimum means a minimum was
missed: the point falls back to float32 for every image. Otherwise the audited errors join the
measured ones, and one the margin did not cover widens it (new candidates computed). It bounds
the share of skipped images whose error breaks the measured bound (about 3/m with m audited, 95%),
not a single adversarial image: that needs `kl_screen` off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .metrics import kl_divergence
from .threads import side_by_side

#: the margin is 3x the largest bfloat16 overestimate among float32-checked images within this many
#: margins of their row's exact minimum (and wide enough that no checked image farther out was
#: overestimated by 2/3 of its distance): errors measured where they could hide a minimum
WINDOW = 1.0

#: the audit's random draw uses seed + this (a stream apart from the check share's)
AUDIT_SEED = 7919

#: grey images (B, 1, H, W) in [0, 1], low precision or not -> oracle probabilities (B, K), float32
Oracle = Callable[[torch.Tensor, bool], torch.Tensor]


def bf16_is_fast() -> bool:
    """Whether this CPU has native bfloat16 dot products (oneDNN says so); else bfloat16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def normalised_maps(ir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IR (n, C, h, w) or (n, C) -> per-channel min-max normalised maps (n, C, h, w) and a blank mask (n, C).

    A constant channel (dead ReLU, or a 1x1 spatial IR) has no min-max normalisation: its map is 0
    (the black image) and it is flagged blank, so the oracle sees the black image once.
    """
    if ir.dim() == 2:
        ir = ir[:, :, None, None]
    if ir.dim() != 4:
        raise ValueError(f"IR of shape {tuple(ir.shape)}: expected (n, C) or (n, C, h, w)")
    x = ir.float()
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    blank = (span <= 1e-6 * hi.abs().clamp_min(1.0))[..., 0, 0]
    norm = torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))
    norm[blank] = 0.0
    return norm, blank


def to_images(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised maps (B, h, w) -> grey images (B, 1, H, W) in [0, 1] (bilinear resize)."""
    img = maps[:, None]
    if img.shape[-2:] != tuple(size):
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    return img


@dataclass
class Answers:
    """One point's oracle answers, kept so that the next point can reuse those of identical images."""

    norm: torch.Tensor  # normalised maps (n, C, h, w)
    q: torch.Tensor  # oracle probabilities (n, C, K)
    exact: torch.Tensor  # (n, C): computed in float32


@dataclass
class AuditReport:
    """The final float32 audit of images the screen skipped (`kl.oracle.audit`)."""

    images: int = 0  # skipped images drawn and computed in float32
    below_minimum: int = 0  # of those (own or control), a float32 KL below its row's minimum: the screen was wrong
    fallback: bool = False  # then every image of the point was computed in float32
    widened: bool = False  # an audited image broke the margin's rules: the margin grew ...
    rechecked: int = 0  # ... and this many more candidates were computed in float32

    def to_dict(self) -> dict:
        return {"images": self.images, "below_minimum": self.below_minimum, "fallback": self.fallback,
                "widened": self.widened, "rechecked": self.rechecked, "share_bound": self.share_bound()}

    def share_bound(self) -> float | None:
        """What a clean audit guarantees (95%, the rule of three): fewer than 3/m of the skipped images
        break the screen's error bound; not that no single one does (only `kl_screen=False` does)."""
        return None if not self.images or self.fallback else round(min(1.0, 3 / self.images), 4)


@dataclass
class ScreenReport:
    """How the oracle's answers were computed, for the JSON (`kl.oracle`)."""

    live: int  # channel images shown to the oracle (blank ones are shown once, apart)
    float32: int  # of those, computed in float32
    screened: bool  # whether a bfloat16 pass screened them first
    margin: float  # final margin around each minimum (KL units)
    max_error: float  # largest bfloat16 overestimate of a KL seen near the minima (kl_screen._max_error)
    reused: int = 0  # images identical to the previous point's, answered from its passes
    audit: AuditReport | None = None  # the screen's final audit (None: no screen)

    def to_dict(self) -> dict:
        return {"precision": "bfloat16 screen, float32 near each minimum" if self.screened else "float32",
                "images": self.live, "float32_images": self.float32,
                "margin": round(self.margin, 5), "max_bf16_error": round(self.max_error, 5),
                "reused_images": self.reused, **({"audit": self.audit.to_dict()} if self.audit is not None else {})}


def balanced_batch(n: int, batch: int, workers: int) -> int:
    """A batch size of at most `batch` that splits `n` items into a multiple of `workers` batches of
    near-equal size (no worker idles on the last round)."""
    if n <= 0:
        return max(1, batch)
    rounds = -(-n // max(1, batch * workers))
    return -(-n // (rounds * max(1, workers)))


def channel_kl(oracle: Oracle, ir: torch.Tensor, p: torch.Tensor, blank_q: torch.Tensor, size: tuple[int, int],
               batch: int, screen: bool, margin: float = 0.1, check_share: float = 0.03, seed: int = 0,
               previous: Answers | None = None, same_tol: float = 1e-5, workers: int = 1,
               batch_float32: int | None = None, audit_share: float = 0.02,
               audit_min: int = 32) -> tuple[torch.Tensor, torch.Tensor, ScreenReport, Answers]:
    """own[i, c] = KL(p_i || F(image of channel c of sample i)) and ctl[i, c] = KL(p_i || F(image of
    channel c of sample i-1)) (the permutation control, cyclic), each (n, C), exact near each row's
    minimum; how they were computed; and the answers, for the next point.

    With `previous` (the answers of a point with IRs of the same shape on the same samples), an
    image whose normalised map equals the previous one's (within `same_tol`: e.g. after a batch
    norm, whose per-channel affine map normalisation removes) takes that answer, not a new pass.
    The oracle's batches run `workers` at a time, one thread each; the answers do not depend on it.
    `batch` is the bfloat16 pass's batch size, `batch_float32` (default `batch`) the float32 one's:
    their best sizes differ (cache-sized passes, docs/benchmarks.md).

    `margin` is the widest starting margin: the float32 check share is computed first and the margin
    starts at `min(margin, 4 x the largest error seen there)`, so a model whose KL values are tiny
    (an untrained model's near-uniform outputs) does not put every image through float32 again;
    it then grows as described in the module docstring.
    """
    norm, blank = normalised_maps(ir)
    n, c = blank.shape
    q = blank_q.expand(n, c, -1).clone()
    exact = blank.clone()
    known = torch.zeros_like(blank)
    if previous is not None and previous.norm.shape == norm.shape:
        known = ((norm - previous.norm).abs().amax(dim=(2, 3)) <= same_tol) & ~blank
        q[known] = previous.q[known]
        exact |= known & previous.exact
    live = (~blank).nonzero()
    reused = int(known.sum())

    def compute(mask: torch.Tensor, low: bool) -> None:
        pairs = mask.nonzero()
        per = balanced_batch(pairs.shape[0], batch if low or batch_float32 is None else batch_float32, workers)
        chunks = [pairs[b:b + per].unbind(1) for b in range(0, pairs.shape[0], per)]
        # the batches side by side, one thread each (assess/threads.py); each batch's answer is the same
        outs = side_by_side(lambda ij: oracle(to_images(norm[ij[0], ij[1]], size), low), chunks, workers)
        for (i, j), out in zip(chunks, outs):
            q[i, j] = out

    def kls() -> tuple[torch.Tensor, torch.Tensor]:
        return kl_divergence(p[:, None, :], q), kl_divergence(p[:, None, :], q.roll(1, dims=0))

    def answers() -> Answers:
        return Answers(norm, q, exact)

    if not screen or live.shape[0] == 0:
        compute(~blank & ~known, False)
        exact |= ~blank
        own, ctl = kls()
        return own, ctl, ScreenReport(int(live.shape[0]), int(live.shape[0]) - reused, False, 0.0, 0.0, reused), answers()
    compute(~blank & ~known, True)
    own16, ctl16 = kls()
    check = torch.zeros_like(blank)  # a seeded random share, computed in both precisions
    gen = torch.Generator().manual_seed(seed)
    k = min(live.shape[0], max(64, round(check_share * live.shape[0])))
    pick = live[torch.randperm(live.shape[0], generator=gen)[:k]]
    check[pick[:, 0], pick[:, 1]] = True
    fresh = torch.zeros_like(blank)  # computed in float32 here
    # the check share and every row's bfloat16 minimum (own and control) first: each row's exact
    # minimum so far, and the errors the starting margin is measured from
    rows = torch.arange(n)
    anchor = torch.zeros_like(blank)
    anchor[rows, own16.argmin(dim=1)] = True
    anchor[(rows - 1) % n, ctl16.argmin(dim=1)] = True  # row i's control uses sample i-1's channels
    first = (check | anchor) & ~exact
    if first.any():
        compute(first, False)
        exact |= first
        fresh |= first
    own, ctl = kls()
    margin = min(margin, 4 * _max_error(own, ctl, own16, ctl16, fresh, anchor, exact, WINDOW * margin))

    def settle(margin: float) -> tuple[float, float]:
        """Grow the margin until the errors measured allow it, and compute every candidate in float32."""
        nonlocal own, ctl, exact, fresh
        while True:
            # a skipped image's float32 KL is above its bfloat16 KL minus the error bound (margin / 3, seen
            # errors x 1.5): below the row's exact minimum only if its bfloat16 KL is within margin / 2 of it
            m_own, m_ctl = _exact_minima(own, ctl, exact)
            max_error = _max_error(own, ctl, own16, ctl16, fresh, anchor, exact, WINDOW * margin)
            wide = _widest_violation(own, ctl, own16, ctl16, fresh, m_own, m_ctl)
            if margin < 3 * max_error or margin < 2 * wide:
                margin = max(3 * max_error, 2 * wide)
                continue
            near_own = own16 <= m_own + margin / 2
            near_ctl = (ctl16 <= m_ctl + margin / 2).roll(-1, dims=0)  # row i's control uses sample i-1's channels
            want = (near_own | near_ctl) & ~exact
            if not want.any():
                return margin, max_error
            compute(want, False)
            exact |= want
            fresh |= want
            own, ctl = kls()

    margin, max_error = settle(margin)
    # the audit: a seeded random share of the images the screen skipped, in float32 (a draw of its own,
    # made after the screen decided). One below its row's minimum: the screen missed a minimum, and the
    # point falls back to float32 for every image. Otherwise the audited images join the measured errors:
    # one that breaks the margin's rules (an overestimate the bound did not cover) widens it, and the
    # new candidates are computed, as for the check share.
    audit = AuditReport()
    skipped = (~exact).nonzero()
    k = min(skipped.shape[0], max(audit_min, round(audit_share * skipped.shape[0]))) if audit_share > 0 else 0
    if k:
        pick = skipped[torch.randperm(skipped.shape[0], generator=torch.Generator().manual_seed(seed + AUDIT_SEED))[:k]]
        sel = torch.zeros_like(blank)
        sel[pick[:, 0], pick[:, 1]] = True
        m_own, m_ctl = _exact_minima(own, ctl, exact)
        compute(sel, False)
        exact |= sel
        fresh |= sel
        own, ctl = kls()
        audit.images = k
        audit.below_minimum = int(((own < m_own) & sel).sum() + ((ctl < m_ctl) & sel.roll(1, dims=0)).sum())
        if audit.below_minimum:
            rest = ~exact
            compute(rest, False)
            exact |= rest
            fresh |= rest
            own, ctl = kls()
            audit.fallback = True
        else:
            before = int(fresh.sum())
            wider, max_error = settle(margin)
            audit.widened = wider > margin
            audit.rechecked = int(fresh.sum()) - before
            margin = wider
    return own, ctl, ScreenReport(int(live.shape[0]), int(fresh.sum()), True, margin, max_error, reused, audit), answers()


def _exact_minima(own: torch.Tensor, ctl: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's smallest float32 KL so far, own and control, as (n, 1) columns."""
    inf = torch.tensor(float("inf"))
    return (torch.where(exact, own, inf).min(dim=1, keepdim=True).values,
            torch.where(exact.roll(1, dims=0), ctl, inf).min(dim=1, keepdim=True).values)


def _max_error(own, ctl, own16, ctl16, fresh, anchor, exact, window: float) -> float:
    """The largest overestimate KL bf16 - KL fp32 (0 if none) among the images computed in both precisions
    that matter for the minima: each row's bfloat16 minimum, and every image whose bfloat16 KL lies
    within `window` of its row's exact minimum.

    Why one-sided: an image is skipped when its bfloat16 KL lies more than margin / 2 above its row's
    smallest float32 KL (exact, no error in it), so it could hide a smaller minimum only if bfloat16
    overestimated it by more than that; an underestimate makes an image a candidate, never a skipped
    one. (Each row's bfloat16 minimum is picked for its underestimate: on EfficientNet-Lite0 those ran
    to 0.42 nats and set a two-sided margin.) Why near the minima: errors far above every minimum
    (answers peaked on another class: bfloat16's heavy tail, up to 1 nat on Lite0) cannot hide one."""
    m_own, m_ctl = _exact_minima(own, ctl, exact)
    use_own = fresh & (anchor | (own16 <= m_own + window))
    use_ctl = fresh.roll(1, dims=0) & (anchor.roll(1, dims=0) | (ctl16 <= m_ctl + window))
    err = torch.cat([(own16 - own)[use_own], (ctl16 - ctl)[use_ctl]]).clamp_min(0)
    return float(err.max()) if err.numel() else 0.0


def _widest_violation(own, ctl, own16, ctl16, fresh, m_own, m_ctl) -> float:
    """The largest distance d above its row's exact minimum (bfloat16 KL - minimum) of a float32-checked
    image whose bfloat16 overestimate e would have hidden a minimum there with a 1.5x safety factor
    (1.5 e >= d): the band must reach at least that far, wherever the error was seen (0 if none)."""
    d = torch.cat([(own16 - m_own)[fresh], (ctl16 - m_ctl)[fresh.roll(1, dims=0)]])
    e = torch.cat([(own16 - own)[fresh], (ctl16 - ctl)[fresh.roll(1, dims=0)]])
    hit = (1.5 * e >= d) & (d > 0)
    return float(d[hit].max()) if hit.any() else 0.0

