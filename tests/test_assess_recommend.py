"""The recommendation rule on hand-made point records."""

import pytest

from enclaveml.assess.recommend import recommend
from enclaveml.errors import PartitionError


def _pt(k, leaks, ssim, fits=True):
    return {"index": k, "name": f"l{k}", "kl": {"leaks": leaks, "leak_fraction": 0.9 if leaks else 0.1, "chance_fraction": 0.1},
            "inversion": {"ssim": ssim, "psnr": 10.0, "attack": "rmle"},
            "cost": {"fits": fits, "enclave_bytes": 2**20 * (200 if not fits else 1), "budget_bytes": 93 * 2**20}}


def test_shallowest_point_passing_both_tests_within_budget():
    pts = [_pt(1, True, 0.9), _pt(2, False, 0.5), _pt(3, True, 0.2), _pt(4, False, 0.25, fits=False), _pt(5, False, 0.2)]
    r = recommend(pts, 0.3)
    assert r["index"] == 5 and not r["overridden"]
    assert "point 1 fails" in r["reason"]
    assert recommend(pts, 0.6)["index"] == 2  # a looser threshold moves it shallower


def test_no_passing_point_and_owner_override():
    pts = [_pt(1, True, 0.9), _pt(2, True, 0.8)]
    assert recommend(pts, 0.3)["index"] is None
    r = recommend(pts, 0.3, override=2)
    assert r["index"] == 2 and r["overridden"] and "fails" in r["reason"]
    with pytest.raises(PartitionError):
        recommend(pts, 0.3, override=7)


def _ci_pt(k, verdict, ssim, needed=None):
    p = _pt(k, verdict == "leaks", ssim)
    p["kl"]["ci"] = {"confidence": 0.95, "difference": 0.05, "lower": -0.1 if verdict != "leaks" else 0.12,
                     "upper": 0.2 if verdict == "undecided" else (0.08 if verdict == "passes" else 0.4),
                     "tolerance": 0.1, "verdict": verdict, "samples_needed": needed}
    return p


def test_an_undecided_kl_verdict_fails_the_point_and_says_how_many_samples_decide_it():
    pts = [_ci_pt(1, "leaks", 0.9), _ci_pt(2, "undecided", 0.2, needed=180), _ci_pt(3, "passes", 0.15)]
    r = recommend(pts, 0.3)
    assert r["index"] == 3 and r["undecided_shallower"] == 2
    assert "point 2" in r["reason"] and "--samples 180" in r["reason"]
    assert recommend([_ci_pt(1, "undecided", 0.2, needed=None)], 0.3)["index"] is None
    none = recommend([_ci_pt(1, "undecided", 0.2, needed=None)], 0.3)
    assert none["undecided_shallower"] == 1 and "no sample size decides it" in none["reason"]
    # an undecided point that also fails the inversion attack is not the one to resample
    r = recommend([_ci_pt(1, "undecided", 0.9, needed=100), _ci_pt(2, "passes", 0.1)], 0.3)
    assert r["index"] == 2 and r["undecided_shallower"] is None
