"""The front of `enclaveml serve --replicas`: lists the replicas and sums their metrics (host side).

Trust side: host (untrusted). The front handles no request of the protocol: clients (the SDK)
read the replica list from its /healthz and then talk to each replica's own host server
directly, attesting each one; everything the front says is a hint the client checks. Routes:

    GET /healthz                 {"status", "replicas": [{"id", "url", "enclave_key", "requests",
                                  "in_flight", "status", "models", "enclave_pid"}...], "models"}
    GET /metrics[?format=json]   the replicas' counters, gauges and histograms summed
    *   /v1/...                  421 MisdirectedRequest, with the replica list (ask a replica)
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ..metrics import Histogram, Metrics, json_logger

#: How often the front probes the replicas, and how long an unreachable one stays listed.
POLL_S = 1.0
PRUNE_S = 30.0


def merge_metrics(snapshots: list[dict]) -> Metrics:
    """Sum the replicas' /metrics JSON: counters and gauges by (name, labels), histograms bucket
    by bucket (a histogram whose buckets differ from the first one seen is skipped). Pure."""
    out = Metrics()
    for snap in snapshots:
        for kind, target in (("counters", out.counters), ("gauges", out.gauges)):
            for c in snap.get(kind, []):
                key = (str(c["name"]), tuple(sorted((str(k), str(v)) for k, v in c.get("labels", {}).items())))
                target[key] = target.get(key, 0) + float(c["value"])
        for h in snap.get("histograms", []):
            key = (str(h["name"]), tuple(sorted((str(k), str(v)) for k, v in h.get("labels", {}).items())))
            acc = out.hists.get(key)
            if acc is None:
                acc = out.hists[key] = Histogram(tuple(h["buckets"]))
            if list(acc.buckets) != list(h["buckets"]) or len(h["counts"]) != len(acc.counts):
                continue
            acc.counts = [a + int(b) for a, b in zip(acc.counts, h["counts"])]
            acc.total += float(h["sum"])
            acc.n += int(h["count"])
    return out


def replica_entry(replica_id: str, url: str, health: dict | None, metrics: dict | None, key: str | None,
                  status: str) -> dict[str, Any]:
    """One row of the front's /healthz `replicas` list. Pure."""
    counters = (metrics or {}).get("counters", [])
    gauges = (metrics or {}).get("gauges", [])
    return {"id": replica_id, "url": url, "enclave_key": key, "status": status,
            "requests": int(sum(c["value"] for c in counters if c.get("name") == "inferences_total")),
            "in_flight": int(sum(g["value"] for g in gauges if g.get("name") == "in_flight_requests")),
            "models": list((health or {}).get("models", [])), "enclave_pid": (health or {}).get("enclave_pid")}


class ReplicaView:
    """The front's picture of the replicas, refreshed by `poll` from the registry and the servers."""

    def __init__(self, registry):
        self.registry = registry
        self.rows: dict[str, dict] = {}
        self.metrics: dict[str, dict] = {}
        self.keys: dict[tuple[str, Any], str] = {}  # (url, enclave_pid) -> enclave public key hex
        self.unreachable_since: dict[str, float] = {}
        self.log = json_logger()

    async def poll_once(self, http: httpx.AsyncClient) -> None:
        entries = await self.registry.list.remote()
        rows, metrics = {}, {}
        for rid, info in sorted(entries.items()):
            url = str(info["url"])
            health = snap = None
            try:
                r = await http.get(url + "/healthz")
                health = r.json()
                status = "ok" if r.status_code == 200 else str(health.get("status", "down"))[:40]
                snap = (await http.get(url + "/metrics", params={"format": "json"})).json()
                self.unreachable_since.pop(rid, None)
            except (httpx.HTTPError, ValueError, AttributeError):
                status = "unreachable"
                first = self.unreachable_since.setdefault(rid, time.time())
                if time.time() - first > PRUNE_S:  # a replica whose actor died without deregistering
                    await self.registry.deregister.remote(rid)
                    self.unreachable_since.pop(rid, None)
                    continue
            key = await self._key(http, url, (health or {}).get("enclave_pid")) if status == "ok" else None
            rows[rid] = {**replica_entry(rid, url, health, snap, key, status), "server_pid": info.get("server_pid")}
            if snap is not None:
                metrics[rid] = snap
        self.rows, self.metrics = rows, metrics
        live = {(r["url"], r["enclave_pid"]) for r in rows.values()}
        self.keys = {k: v for k, v in self.keys.items() if k in live}  # forget replaced replicas' keys

    async def _key(self, http: httpx.AsyncClient, url: str, enclave_pid) -> str | None:
        """The replica's enclave key as its server reports it (a hint: clients attest it)."""
        cache = (url, enclave_pid)
        if cache not in self.keys:
            try:
                r = await http.get(url + "/v1/evidence", params={"nonce": os.urandom(16).hex()})
                self.keys[cache] = str(r.json()["public_key"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return None
        return self.keys[cache]

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                try:
                    await self.poll_once(http)
                except Exception as e:  # noqa: BLE001 (keep polling; the front must stay up)
                    self.log.warning("replica poll failed", extra={"fields": {"type": type(e).__name__}})
                await asyncio.sleep(POLL_S)

    def healthz(self) -> tuple[int, dict]:
        rows = [self.rows[k] for k in sorted(self.rows)]
        up = [r for r in rows if r["status"] == "ok"]
        body = {"status": "ok" if up else "no replica up", "replicas": rows,
                "models": sorted({m for r in up for m in r["models"]})}
        return (200 if up else 503), body


def create_front_app(view: ReplicaView) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(timeout=5.0) as http:  # list the replicas before 'listening'
            await view.poll_once(http)
        task = asyncio.ensure_future(view.run())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="enclaveml replicas", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz():
        code, body = view.healthz()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        merged = merge_metrics(list(view.metrics.values()))
        merged.gauges[("replicas_up", ())] = float(sum(r["status"] == "ok" for r in view.rows.values()))
        if format == "json":
            return JSONResponse(merged.to_json())
        return PlainTextResponse(merged.to_prometheus(), media_type="text/plain; version=0.0.4")

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "DELETE", "PUT"])
    async def misdirected(rest: str, request: Request):
        # The SDK's first evidence request lands here: the replica list tells it where to go.
        return JSONResponse({"error": "MisdirectedRequest",
                             "message": "this is a replica front: send requests to a replica listed in /healthz",
                             "replicas": view.healthz()[1]["replicas"]}, status_code=421)

    return app
