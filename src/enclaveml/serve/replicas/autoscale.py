"""Ray Serve autoscaling on the replicas' own queue depth (host side; pure logic, no I/O).

Why a custom policy: clients reach the replicas' host servers directly, not through Ray's proxy
or handles, so Ray's built-in signal (ongoing requests counted by Ray's routers) stays at zero.
Each replica instead reports the requests in flight in its server (`record_autoscaling_stats`,
the `in_flight_requests` gauge of its /metrics); this policy sizes the deployment so that each
replica has about `target_ongoing_requests` of them. Ray's wrapper then applies min/max
replicas, upscale/downscale delays and the scaling factors from the autoscaling config.
"""

from __future__ import annotations

import math
from typing import Any

#: The custom metric each replica reports (requests being served by its host server).
METRIC = "in_flight"


def desired_replicas(in_flight: dict[Any, float], current: int, target_per_replica: float) -> int:
    """Replicas needed for `in_flight` (per-replica averages over Ray's look-back window)."""
    if current <= 0 or not in_flight:
        return max(current, 0)  # nothing reported yet (e.g. replicas still starting): stay
    total = sum(max(0.0, float(v)) for v in in_flight.values())
    return max(1, math.ceil(total / max(target_per_replica, 1e-9)))


def in_flight_policy(ctx) -> tuple[int, dict]:
    """Ray Serve custom autoscaling policy (`AutoscalingContext` -> (replicas, policy state))."""
    metrics = ctx.aggregated_metrics or {}
    target = ctx.config.get_target_ongoing_requests() if ctx.config is not None else 2.0
    return desired_replicas(metrics.get(METRIC, {}), ctx.current_num_replicas, target), {}
