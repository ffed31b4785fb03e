"""Pure parts of `serve --replicas`: the front's metric sums, the SDK's reading of a (hostile)
replica list, and the queue-depth autoscaling policy against Ray's own AutoscalingContext."""

from __future__ import annotations

import pytest

from enclaveml.client.replicas import parse_replicas
from enclaveml.serve.metrics import Metrics
from enclaveml.serve.replicas.autoscale import METRIC, desired_replicas, in_flight_policy
from enclaveml.serve.replicas.front import merge_metrics, replica_entry


def _snap(n_infer: int, in_flight: int, latencies: list[float]) -> dict:
    m = Metrics()
    m.inc("inferences_total", n_infer, model="o/m", outcome="ok")
    m.inc("errors_total", 1, kind="DataError")
    m.add_gauge("in_flight_requests", in_flight)
    for v in latencies:
        m.observe("inference_seconds", v, model="o/m")
    return m.to_json()


def test_merge_metrics_sums_counters_gauges_and_histograms():
    merged = merge_metrics([_snap(3, 1, [0.002, 0.2]), _snap(5, 2, [0.02])])
    assert merged.counter("inferences_total", model="o/m", outcome="ok") == 8
    assert merged.counter("errors_total") == 2
    assert merged.gauges[("in_flight_requests", ())] == 3
    (h,) = merged.hists.values()
    assert h.n == 3 and abs(h.total - 0.222) < 1e-9 and sum(h.counts) == 3
    text = merged.to_prometheus()
    assert "# TYPE enclaveml_in_flight_requests gauge" in text and 'enclaveml_inference_seconds_count{model="o/m"} 3' in text


def test_merge_metrics_skips_histograms_with_other_buckets():
    a, b = _snap(1, 0, [0.01]), _snap(1, 0, [0.01])
    b["histograms"][0]["buckets"] = [1.0, 2.0]
    b["histograms"][0]["counts"] = [1, 0, 0]
    (h,) = merge_metrics([a, b]).hists.values()
    assert h.n == 1


def test_replica_entry_counts_requests_and_queue():
    row = replica_entry("r1", "http://127.0.0.1:1", {"models": ["o/m"], "enclave_pid": 7}, _snap(4, 2, []), "ab", "ok")
    assert row == {"id": "r1", "url": "http://127.0.0.1:1", "enclave_key": "ab", "status": "ok", "requests": 4,
                   "in_flight": 2, "models": ["o/m"], "enclave_pid": 7}


def test_parse_replicas_keeps_only_well_formed_http_rows():
    body = {"replicas": [
        {"id": "a", "url": "http://10.0.0.1:8080/", "status": "ok"},
        {"id": "b", "url": "file:///etc/passwd", "status": "ok"},
        {"id": "c", "url": "http://", "status": "ok"},
        {"id": 5, "url": "http://x:1"},
        "junk",
        {"id": "d", "url": "https://h:443", "status": "unreachable"},
    ]}
    assert parse_replicas(body) == [{"id": "a", "url": "http://10.0.0.1:8080", "status": "ok"},
                                    {"id": "d", "url": "https://h:443", "status": "unreachable"}]
    assert parse_replicas({"status": "ok", "models": []}) is None  # a plain server's /healthz
    assert parse_replicas([1, 2]) is None


def test_desired_replicas_follows_queue_depth():
    assert desired_replicas({"a": 8.0, "b": 4.0}, current=2, target_per_replica=4) == 3
    assert desired_replicas({"a": 0.0, "b": 0.0}, current=2, target_per_replica=4) == 1
    assert desired_replicas({}, current=2, target_per_replica=4) == 2  # nothing reported yet
    assert desired_replicas({"a": -3.0}, current=1, target_per_replica=4) == 1


def test_policy_reads_ray_autoscaling_context():
    serve_config = pytest.importorskip("ray.serve.config")
    cfg = serve_config.AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=2)
    ctx = serve_config.AutoscalingContext(
        deployment_id=None, deployment_name="EnclaveReplica", app_name="enclaveml", current_num_replicas=2,
        target_num_replicas=2, running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={METRIC: {"r1": 5.0, "r2": 2.0}}, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=cfg)
    assert in_flight_policy(ctx) == (4, {})  # 7 in flight / 2 per replica


def test_a_hostile_front_cannot_route_images_to_an_unattested_replica():
    """The front lists a "replica" whose evidence does not verify: the client refuses it and sends
    it (and the front) nothing but evidence requests. (MockTransport: the network is faked.)"""
    import httpx

    from enclaveml import errors as E
    from enclaveml.client import EnclaveClient
    from enclaveml.crypto import HpkeKeyPair
    from enclaveml.tee import Policy

    policy = Policy(allowed_backends=["sim"], measurements={"sim": ["00" * 32]}, sim_platform_keys=["11" * 32])
    rogue = HpkeKeyPair.generate().public_bytes().hex()
    listing = {"replicas": [{"id": "r1", "url": "http://rogue.invalid:9", "status": "ok", "enclave_key": rogue}]}
    seen: list = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        if req.url.host == "front.invalid":
            return httpx.Response(421 if req.url.path.startswith("/v1/") else 200, json=listing)
        return httpx.Response(200, json={"public_key": rogue, "nonce": req.url.params["nonce"] + "00" * 24,
                                         "evidence": {"backend": "sim", "quote": "e30="}})

    c = EnclaveClient("http://front.invalid", policy, http=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(E.TrustError):
        c.infer([b"\x89PNG secret image"], model="m")
    assert any(r.url.host == "rogue.invalid" for r in seen)  # it did try the listed replica ...
    assert all(r.url.path in ("/v1/evidence", "/healthz") for r in seen)  # ... but only to attest it
    assert all(b"secret image" not in (r.content or b"") for r in seen)
