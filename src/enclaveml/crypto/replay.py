"""Reject replayed or stale requests inside the enclave: a freshness window plus a seen-set.

Trust side: enclave (the state lives in enclave memory; the host cannot reset it without
restarting the enclave, which also changes the enclave's HPKE key and so voids old requests).
The client puts a random request id and its clock's timestamp inside the encrypted request
(`frame_fresh`); the enclave checks them after decryption (`ReplayGuard.check`).

Memory is bounded: ids older than the window are forgotten (the window alone rejects them), and
if `max_entries` is reached the oldest id is evicted and its timestamp becomes a floor below which
every request is refused. So the guard fails closed: never does forgetting let a replay through.

The clock is the host's (inside a TEE `time.time()` comes from the untrusted OS), so the guard
never lets it go back: "now" is the highest time the clock has ever shown (a high-water mark),
and both the window and the forgetting are judged against it. A host that rolls the clock back
only makes requests look stale (fails closed); it cannot revive an id that was forgotten. Client
timestamps do not move the mark (any client could otherwise push it forward and lock others out).
"""

from __future__ import annotations

import heapq
import math
import struct
import threading
import time
from typing import Callable

from ..errors import ReplayedMessage, TamperedMessage
from . import _hazmat as hz

REQUEST_ID_BYTES = 16
_FRESH_HEADER = struct.Struct(">B16sd")  # version, request id, timestamp (seconds since the epoch)
FRESH_VERSION = 1


class ReplayGuard:
    """Remembers request ids for `window_s`; refuses repeats and timestamps outside the window."""

    def __init__(self, window_s: float = 120.0, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.time):
        if not window_s > 0 or max_entries < 1:
            raise ValueError("window_s must be > 0 and max_entries >= 1")
        self.window_s = float(window_s)
        self.max_entries = int(max_entries)
        self._clock = clock
        self._seen: dict[bytes, float] = {}
        self._by_time: list[tuple[float, bytes]] = []
        self._floor = -math.inf
        self._high_water = -math.inf  # the highest time the clock has shown; never goes back
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def _now(self) -> float:
        """max(clock(), every earlier reading): a clock set back cannot make old requests fresh."""
        t = float(self._clock())
        if not math.isfinite(t):
            raise ReplayedMessage("the enclave's clock gave no usable time")
        self._high_water = max(self._high_water, t)
        return self._high_water

    def _forget_expired(self, now: float) -> None:
        while self._by_time and self._by_time[0][0] < now - self.window_s:
            _, rid = heapq.heappop(self._by_time)
            self._seen.pop(rid, None)

    def check(self, request_id: bytes, timestamp: float) -> None:
        """Accept (and remember) a fresh, never-seen request; otherwise raise `ReplayedMessage`."""
        rid = bytes(request_id)
        if not 1 <= len(rid) <= 64:
            raise ReplayedMessage("request id must be 1 to 64 bytes")
        ts = float(timestamp)
        with self._lock:
            now = self._now()
            if not math.isfinite(ts) or abs(now - ts) > self.window_s:
                raise ReplayedMessage(f"request timestamp is outside the {self.window_s:g} s freshness window")
            if ts <= self._floor:
                raise ReplayedMessage("request is older than the replay cache remembers (cache was full)")
            self._forget_expired(now)
            if rid in self._seen:
                raise ReplayedMessage("request id was seen before (replay)")
            while len(self._seen) >= self.max_entries:
                old_ts, old_id = heapq.heappop(self._by_time)
                self._seen.pop(old_id, None)
                self._floor = max(self._floor, old_ts)
            self._seen[rid] = ts
            heapq.heappush(self._by_time, (ts, rid))

    def check_fresh(self, framed: bytes) -> bytes:
        """Parse a `frame_fresh` payload, check its id and timestamp, return the inner payload."""
        request_id, timestamp, payload = parse_fresh(framed)
        self.check(request_id, timestamp)
        return payload


def frame_fresh(payload: bytes, clock: Callable[[], float] = time.time, request_id: bytes | None = None) -> bytes:
    """Client side: prefix a payload with version (1), a random request id (16) and a timestamp (8).

    Put the result *inside* the HPKE request, so the host can neither read nor change it.
    """
    rid = hz.random_bytes(REQUEST_ID_BYTES) if request_id is None else bytes(request_id)
    if len(rid) != REQUEST_ID_BYTES:
        raise ValueError("request_id must be 16 bytes")
    return _FRESH_HEADER.pack(FRESH_VERSION, rid, float(clock())) + bytes(payload)


def parse_fresh(framed: bytes) -> tuple[bytes, float, bytes]:
    """Split a framed payload into (request id, timestamp, payload)."""
    framed = bytes(framed)
    if len(framed) < _FRESH_HEADER.size:
        raise TamperedMessage("request is too short for its freshness header")
    version, rid, ts = _FRESH_HEADER.unpack_from(framed)
    if version != FRESH_VERSION:
        raise TamperedMessage(f"unknown freshness header version {version}")
    return rid, ts, framed[_FRESH_HEADER.size:]
