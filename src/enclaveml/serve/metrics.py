"""Counters and histograms for /metrics, rendered as Prometheus text or JSON; structured logs.

Trust side: host. Only counts, sizes, timings, status codes and error kinds are recorded: never
inputs, labels or keys (the host has none of these to begin with).
"""

from __future__ import annotations

import bisect
import json
import logging
import sys
import threading
import time

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.total += v
        self.n += 1


class Metrics:
    """Thread-safe registry: counters keyed by (name, labels), histograms keyed by (name, labels)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.hists: dict[tuple[str, tuple], Histogram] = {}
        #: Values that go up and down (e.g. requests in flight), keyed like counters.
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.started = time.time()

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def add_gauge(self, name: str, n: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.gauges[key] = self.gauges.get(key, 0) + n

    def observe(self, name: str, value: float, buckets=LATENCY_BUCKETS_S, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self.hists.get(key)
            if h is None:
                h = self.hists[key] = Histogram(buckets)
            h.observe(value)

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            if labels:
                return self.counters.get((name, tuple(sorted(labels.items()))), 0)
            return sum(v for (n, _), v in self.counters.items() if n == name)

    def to_json(self) -> dict:
        with self._lock:
            counters = [{"name": n, "labels": dict(lab), "value": v} for (n, lab), v in sorted(self.counters.items())]
            hists = [{"name": n, "labels": dict(lab), "buckets": list(h.buckets), "counts": list(h.counts),
                      "sum": h.total, "count": h.n} for (n, lab), h in sorted(self.hists.items())]
            gauges = [{"name": n, "labels": dict(lab), "value": v} for (n, lab), v in sorted(self.gauges.items())]
        return {"uptime_s": time.time() - self.started, "counters": counters, "histograms": hists, "gauges": gauges}

    def to_prometheus(self) -> str:
        def fmt(labels: tuple, extra: tuple = ()) -> str:
            items = list(labels) + list(extra)
            if not items:
                return ""
            return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}"

        lines = []
        with self._lock:
            for name in sorted({n for n, _ in self.counters}):
                lines.append(f"# TYPE enclaveml_{name} counter")
                for (n, lab), v in sorted(self.counters.items()):
                    if n == name:
                        lines.append(f"enclaveml_{n}{fmt(lab)} {v:g}")
            for name in sorted({n for n, _ in self.gauges}):
                lines.append(f"# TYPE enclaveml_{name} gauge")
                for (n, lab), v in sorted(self.gauges.items()):
                    if n == name:
                        lines.append(f"enclaveml_{n}{fmt(lab)} {v:g}")
            for name in sorted({n for n, _ in self.hists}):
                lines.append(f"# TYPE enclaveml_{name} histogram")
                for (n, lab), h in sorted(self.hists.items()):
                    if n != name:
                        continue
                    cum = 0
                    for b, c in zip(h.buckets, h.counts):
                        cum += c
                        lines.append(f"enclaveml_{n}_bucket{fmt(lab, (('le', f'{b:g}'),))} {cum}")
                    lines.append(f"enclaveml_{n}_bucket{fmt(lab, (('le', '+Inf'),))} {h.n}")
                    lines.append(f"enclaveml_{n}_sum{fmt(lab)} {h.total:.6f}")
                    lines.append(f"enclaveml_{n}_count{fmt(lab)} {h.n}")
        return "\n".join(lines) + "\n"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields come from `extra={"fields": {...}}` only."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "event": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        return json.dumps(out, separators=(",", ":"), default=str)


def log_event(log: logging.Logger, event: str, fields: dict, level: int = logging.INFO) -> None:
    """`log.log(level, event, extra={"fields": fields})`, the same line, made cheaply for the
    per-request log: when `log` is as `json_logger` set it up (its one handler, no filters), the
    JSON goes straight to that handler's stream, without building a `LogRecord` (caller lookup,
    thread and process names: about 3/4 of a log call's CPU). Anything else, and any error
    writing, takes the standard path."""
    if not log.isEnabledFor(level):
        return
    hs = log.handlers
    h = hs[0] if len(hs) == 1 else None
    if (h is None or log.filters or h.filters or not getattr(h, "_enclaveml", False) or level < h.level
            or type(h.formatter) is not JsonFormatter or not isinstance(h, logging.StreamHandler)):
        log.log(level, event, extra={"fields": fields})
        return
    out = {"ts": round(time.time(), 6), "level": logging.getLevelName(level).lower(), "event": event}
    out.update(fields)
    line = json.dumps(out, separators=(",", ":"), default=str) + h.terminator
    h.acquire()
    try:
        h.stream.write(line)
        h.flush()
        return
    except Exception:
        pass
    finally:
        h.release()
    log.log(level, event, extra={"fields": fields})  # the standard path reports the error


def json_logger(name: str = "enclaveml.serve", stream=None, level: int = logging.INFO) -> logging.Logger:
    log = logging.getLogger(name)
    if not any(getattr(h, "_enclaveml", False) for h in log.handlers):
        h = logging.StreamHandler(stream or sys.stderr)
        h.setFormatter(JsonFormatter())
        h._enclaveml = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.setLevel(level)
    log.propagate = False
    return log
