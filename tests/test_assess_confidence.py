"""The KL verdict's confidence interval and sample-size maths: pure functions, checked by hand and by simulation."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from enclaveml.assess.confidence import (PairedCounts, decide, kl_confidence, paired_difference_interval,
                                         samples_needed, wilson_interval)


def test_wilson_matches_scipy():
    for k, n in [(0, 10), (3, 16), (37, 64), (64, 64)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_paired_interval_matches_the_published_example():
    # Fagerland, Lydersen & Laake, "Statistical analysis of contingency tables" (2017), ch. 8: complete
    # response before/after consolidation therapy (Cavo et al. 2012), Newcombe square-and-add interval
    c = PairedCounts(both=59, own_only=6, control_only=16, neither=80)
    lo, hi = paired_difference_interval(c)
    assert c.difference == pytest.approx(-0.0621, abs=5e-5)
    assert lo == pytest.approx(-0.1186, abs=5e-5) and hi == pytest.approx(-0.0046, abs=5e-5)


def test_interval_narrows_with_samples_and_contains_the_estimate():
    c = PairedCounts.from_outcomes([True] * 10 + [False] * 6, [True] * 7 + [False] * 9)
    widths = []
    for n in (16, 64, 256, 4096):
        lo, hi = paired_difference_interval(c, n=n)
        assert lo <= c.difference <= hi and -1 <= lo and hi <= 1
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.05


@pytest.mark.parametrize("n", [16, 64])
def test_coverage_is_close_to_nominal(n):
    """Simulated paired outcomes with a known true difference: the 95% interval covers it ~95% of the time."""
    rng = np.random.default_rng(0)
    probs = [0.45, 0.2, 0.1, 0.25]  # both, own only, control only, neither: true difference 0.1
    truth = probs[1] - probs[2]
    draws = rng.multinomial(n, probs, size=2000)
    covered = 0
    for a, b, c, d in draws:
        lo, hi = paired_difference_interval(PairedCounts(int(a), int(b), int(c), int(d)))
        covered += lo <= truth <= hi
    assert 0.93 <= covered / len(draws) <= 0.99, covered / len(draws)


def test_verdicts_and_the_samples_a_stable_verdict_needs():
    tol = 0.1
    assert decide((0.12, 0.4), tol) == "leaks" and decide((-0.2, 0.1), tol) == "passes"
    assert decide((0.05, 0.2), tol) == "undecided"
    clear = PairedCounts(30, 2, 2, 30)  # difference 0: passes at 64 samples already
    assert samples_needed(clear, tol) == 64
    close = PairedCounts(20, 8, 4, 32)  # difference +0.0625: undecided at 64 samples
    assert decide(paired_difference_interval(close), tol) == "undecided"
    need = samples_needed(close, tol)
    assert need is not None and need > 64
    assert decide(paired_difference_interval(close, n=need), tol) == "passes"
    assert decide(paired_difference_interval(close, n=need - 1), tol) == "undecided"  # the fewest
    on_the_line = PairedCounts(10, 8, 2, 40)  # difference exactly 0.1: no sample size decides it
    assert on_the_line.difference == pytest.approx(tol) and samples_needed(on_the_line, tol) is None


def test_kl_record_and_bad_input():
    rec = kl_confidence([True, True, False, True], [False, True, False, False], 0.1)
    assert rec["counts"] == {"both": 1, "own_only": 2, "control_only": 0, "neither": 1}
    assert rec["difference"] == 0.5 and rec["verdict"] in {"leaks", "undecided"}
    assert rec["lower"] <= 0.5 <= rec["upper"] and math.isfinite(rec["upper"])
    with pytest.raises(ValueError):
        kl_confidence([True], [True, False], 0.1)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        kl_confidence([True], [True], 0.1, confidence=1.5)
