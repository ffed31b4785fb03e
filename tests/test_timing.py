"""Per-stage time counters (enclaveml/timing.py): totals add up, diffs subtract, nothing else kept."""

import time

from enclaveml.timing import StageClock, diff, now, since


def test_stage_totals_and_diff():
    c = StageClock()
    with c.stage("sleep"):
        time.sleep(0.02)
    t = now()
    sum(range(200_000))  # CPU work
    since(c, "work", t)
    since(None, "ignored", t)  # no clock: no-op
    first = c.snapshot()
    assert set(first) == {"sleep", "work"}
    assert first["sleep"]["n"] == 1 and first["sleep"]["wall_ns"] >= 20_000_000
    assert first["sleep"]["cpu_ns"] < first["sleep"]["wall_ns"] // 2  # sleeping is not CPU
    assert first["work"]["cpu_ns"] > 0
    c.add("work", 5, 3, n=2)
    d = diff(c.snapshot(), first)
    assert d == {"work": {"n": 2, "wall_ns": 5, "cpu_ns": 3}}  # unchanged stages drop out


def test_stage_clocks_can_be_switched_off(monkeypatch):
    import enclaveml.timing as T

    monkeypatch.setattr(T, "ENABLED", False)
    c = StageClock()
    with c.stage("a"):
        pass
    since(c, "b", now())
    c.add("c", 1, 1)
    assert c.snapshot() == {} and now() == (0, 0)
