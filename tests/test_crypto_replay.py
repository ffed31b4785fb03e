"""ReplayGuard: repeats, freshness window, bounded memory that fails closed, framing."""

from __future__ import annotations

import math

import pytest

from enclaveml.crypto import HpkeKeyPair, ReplayGuard, frame_fresh, open_request, parse_fresh, seal_request
from enclaveml.errors import ReplayedMessage, TamperedMessage


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_repeat_is_rejected():
    clock = Clock()
    g = ReplayGuard(window_s=120, clock=clock)
    g.check(b"id-1", clock.t)
    g.check(b"id-2", clock.t)
    with pytest.raises(ReplayedMessage, match="seen before"):
        g.check(b"id-1", clock.t)
    with pytest.raises(ReplayedMessage):
        g.check(b"id-1", clock.t + 5)  # a new timestamp does not launder an old id


@pytest.mark.parametrize("offset", [-121.0, 121.0, math.inf, -math.inf, math.nan])
def test_outside_window_is_rejected(offset):
    clock = Clock()
    g = ReplayGuard(window_s=120, clock=clock)
    with pytest.raises(ReplayedMessage, match="window"):
        g.check(b"id", clock.t + offset)


def test_edges_of_window_are_accepted():
    clock = Clock()
    g = ReplayGuard(window_s=120, clock=clock)
    g.check(b"a", clock.t - 120)
    g.check(b"b", clock.t + 120)


def test_expired_ids_are_forgotten_but_replays_still_fail():
    clock = Clock()
    g = ReplayGuard(window_s=10, clock=clock)
    for i in range(50):
        g.check(f"id{i}".encode(), clock.t)
    assert len(g) == 50
    clock.t += 11
    g.check(b"new", clock.t)
    assert len(g) == 1  # old entries dropped
    with pytest.raises(ReplayedMessage):
        g.check(b"id0", clock.t - 11)  # the replay is now outside the window


def test_full_cache_evicts_oldest_and_fails_closed():
    clock = Clock()
    g = ReplayGuard(window_s=100, max_entries=3, clock=clock)
    for i, dt in enumerate([-30, -20, -10]):
        g.check(f"r{i}".encode(), clock.t + dt)
    g.check(b"r3", clock.t)  # evicts r0 (t-30) and sets the floor there
    assert len(g) == 3
    with pytest.raises(ReplayedMessage):
        g.check(b"r0", clock.t - 30)  # the evicted id cannot be replayed
    with pytest.raises(ReplayedMessage):
        g.check(b"fresh-but-old", clock.t - 40)
    g.check(b"r4", clock.t - 5)


def test_request_id_length():
    g = ReplayGuard()
    with pytest.raises(ReplayedMessage):
        g.check(b"", 0.0)
    with pytest.raises(ReplayedMessage):
        g.check(b"x" * 65, 0.0)


def test_framed_request_through_hpke():
    clock = Clock()
    kp = HpkeKeyPair.generate()
    g = ReplayGuard(clock=clock)
    framed = frame_fresh(b"image", clock=clock)
    rid, ts, payload = parse_fresh(framed)
    assert len(rid) == 16 and ts == clock.t and payload == b"image"
    msg, _ = seal_request(kp.public_bytes(), framed)
    pt, _ = open_request(kp, msg)
    assert g.check_fresh(pt) == b"image"
    pt_again, _ = open_request(kp, msg)  # the host replays the same ciphertext
    with pytest.raises(ReplayedMessage):
        g.check_fresh(pt_again)
    with pytest.raises(TamperedMessage):
        parse_fresh(b"\x01short")
    with pytest.raises(TamperedMessage):
        parse_fresh(b"\x02" + framed[1:])


def test_clock_going_back_never_revives_a_forgotten_request():
    """The clock is the host's: the guard judges against the highest time it has seen (F-4)."""
    clock = Clock()
    g = ReplayGuard(window_s=10, clock=clock)
    start = clock.t
    g.check(b"old", start)
    clock.t += 100
    g.check(b"new", clock.t)  # "old" expires and is forgotten
    assert len(g) == 1
    clock.t = start  # rolled back
    with pytest.raises(ReplayedMessage, match="window"):
        g.check(b"old", start)
    with pytest.raises(ReplayedMessage, match="window"):
        g.check(b"fresh-by-the-rolled-back-clock", start)  # fails closed
    g.check(b"fresh", start + 100)  # requests fresh by the high-water mark still pass


def test_client_timestamps_do_not_move_the_high_water_mark():
    clock = Clock()
    g = ReplayGuard(window_s=10, clock=clock)
    g.check(b"ahead", clock.t + 10)  # allowed, but must not drag "now" forward
    g.check(b"behind", clock.t - 10)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_unusable_clock_fails_closed(bad):
    clock = Clock(bad)
    with pytest.raises(ReplayedMessage):
        ReplayGuard(clock=clock).check(b"id", 0.0)
