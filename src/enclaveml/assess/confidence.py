"""How sure the KL verdict is: a confidence interval and the samples a stable verdict needs (owner side).

Pure functions, no tensors and no I/O. The KL test's verdict (assess/kl.py) compares two shares
measured on the *same* samples: `leak_fraction`, the share of samples where one of x's own IR
channels beats the uniform baseline, and `chance_fraction`, the share where another test image's
channels do (the permutation control). A point leaks when their difference exceeds the tolerance.
The two outcomes of one sample are paired (same F(x), same baseline), so the statistic is a
difference of paired proportions and its interval is Newcombe's hybrid score interval for paired
data (Newcombe 1998, Stat. Med. 17:2635, method 10): built from the two Wilson score intervals and
their correlation, closed form, deterministic, and with close to nominal coverage at the 16-64
samples an assessment uses, where a Wald interval or a percentile bootstrap of a {-1, 0, 1}-valued
difference is too narrow. A binomial interval on `leak_fraction` alone would ignore the control's
own sampling noise, which is as large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

#: the most samples `samples_needed` looks for; beyond it the verdict is "not decidable by sampling"
MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class PairedCounts:
    """The 2x2 table of the paired outcomes (own channels beat uniform, control beats uniform)."""

    both: int  # own and control beat the baseline
    own_only: int  # own channels beat it, the control does not
    control_only: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.own_only + self.control_only + self.neither

    @property
    def difference(self) -> float:
        """leak_fraction - chance_fraction."""
        return (self.own_only - self.control_only) / self.n

    @classmethod
    def from_outcomes(cls, own: Sequence[bool], control: Sequence[bool]) -> "PairedCounts":
        if len(own) != len(control) or not own:
            raise ValueError(f"paired outcomes need two equal, non-empty lists (got {len(own)} and {len(control)})")
        pairs = [(bool(a), bool(b)) for a, b in zip(own, control)]
        return cls(pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
                   pairs.count((False, False)))


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: expected a level between 0 and 1, e.g. 0.95")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (counts may be fractional: scaled tables)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n > 0 (got {successes}, {n})")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _scaled(c: PairedCounts, n: float) -> tuple[float, float, float, float]:
    s = n / c.n
    return c.both * s, c.own_only * s, c.control_only * s, c.neither * s


def _phi(a: float, b: float, c: float, d: float) -> float:
    """Continuity-corrected correlation of the paired outcomes, as Newcombe's method 10 uses it."""
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    if denom <= 0:
        return 0.0
    cross, half_n = a * d - b * c, (a + b + c + d) / 2
    if cross > half_n:
        return (cross - half_n) / math.sqrt(denom)
    return cross / math.sqrt(denom) if cross < 0 else 0.0


def paired_difference_interval(c: PairedCounts, confidence: float = 0.95,
                               n: float | None = None) -> tuple[float, float]:
    """Newcombe's method-10 interval of leak_fraction - chance_fraction.

    `n` rescales the table to another sample count with the same shares: the interval the
    assessment would report with `n` samples if the observed shares held.
    """
    a, b, cc, d = _scaled(c, c.n if n is None else n)
    total = a + b + cc + d
    p1, p2 = (a + b) / total, (a + cc) / total
    l1, u1 = wilson_interval(a + b, total, confidence)
    l2, u2 = wilson_interval(a + cc, total, confidence)
    phi = _phi(a, b, cc, d)
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def decide(interval: tuple[float, float], tolerance: float) -> str:
    """'leaks' when the whole interval is above the tolerance, 'passes' when it is at or below it."""
    lo, hi = interval
    if lo > tolerance:
        return "leaks"
    if hi <= tolerance:
        return "passes"
    return "undecided"


def samples_needed(c: PairedCounts, tolerance: float, confidence: float = 0.95,
                   limit: int = MAX_SAMPLES) -> int | None:
    """Fewest samples whose interval, with the observed shares, lies wholly on one side of the tolerance.

    The observed count when it already does; None when even `limit` samples would not (the
    estimate sits on the tolerance, where no sample size decides).
    """
    def decided(n: int) -> bool:
        return decide(paired_difference_interval(c, confidence, n), tolerance) != "undecided"

    if decided(c.n):
        return c.n
    lo, hi = c.n, c.n
    while not decided(hi):  # the interval narrows like 1/sqrt(n): double, then bisect
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decided(mid) else (mid, hi)
    return hi


def kl_confidence(own: Sequence[bool], control: Sequence[bool], tolerance: float,
                  confidence: float = 0.95) -> dict:
    """The `kl.ci` record of one point: interval, verdict and the samples a stable verdict needs."""
    c = PairedCounts.from_outcomes(own, control)
    lo, hi = paired_difference_interval(c, confidence)
    return {
        "statistic": "leak_fraction - chance_fraction",
        "method": "Newcombe paired score interval (method 10)",
        "confidence": confidence,
        "difference": round(c.difference, 4),
        "lower": round(lo, 4),
        "upper": round(hi, 4),
        "tolerance": tolerance,
        "verdict": decide((lo, hi), tolerance),
        "samples_needed": samples_needed(c, tolerance, confidence),
        "counts": {"both": c.both, "own_only": c.own_only, "control_only": c.control_only, "neither": c.neither},
    }
