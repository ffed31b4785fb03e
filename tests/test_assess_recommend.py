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
