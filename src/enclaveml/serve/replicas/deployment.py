"""One replica of `enclaveml serve --replicas`: a Ray Serve replica that runs one ordinary host
server (`enclaveml serve`, with its own enclave worker and enclave key) and answers for its health.

Trust side: host (untrusted). The replica actor never sees more than the host server does:
it starts the server, probes /healthz and /metrics, and (only on Ray's proxy path) forwards
request bytes, which are ciphertext. Ray restarts a replica whose `check_health` fails (server
process gone, or /healthz failing for a while); the new replica's server restores every
deployment in the shared store that its enclave can unseal (docs/scaling.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray

from ..launcher import ServerProcess

#: Name of the registry actor (in the Ray namespace of the `serve --replicas` process).
REGISTRY = "enclaveml-replica-registry"
#: Consecutive failed /healthz probes after which the replica reports itself unhealthy. (The host
#: server restarts a dead enclave worker on its own within a second or two; Ray should not
#: restart the whole replica for that.)
HEALTH_FAILURES = 3
#: The request headers forwarded on Ray's proxy path (everything else is dropped).
FORWARD_HEADERS = ("content-type", "content-length")


@dataclass
class ReplicaSpec:
    """What every replica starts: the `enclaveml serve` flags besides --port/--store, the shared
    store, the address the server listens on and the environment it gets."""

    store: str
    tee: str = "sim"
    server_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    listen_host: str = "127.0.0.1"
    start_timeout_s: float = 300.0


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    """Which replica serves where: each replica registers its server's URL (for the front)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def register(self, replica_id: str, info: dict) -> None:
        self.entries[replica_id] = {**info, "registered_at": time.time()}

    def deregister(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)

    def list(self) -> dict[str, dict]:
        return dict(self.entries)


def advertised_host(listen_host: str) -> str:
    """The address clients use for a server listening on `listen_host` (the node's IP for a wildcard)."""
    if listen_host in ("0.0.0.0", "::", ""):
        return ray.util.get_node_ip_address()
    return listen_host


class EnclaveReplica:
    """The user class of the Ray Serve deployment (`serve.deployment(EnclaveReplica)` in run.py)."""

    def __init__(self, spec: ReplicaSpec, registry_name: str = REGISTRY):
        from ray import serve

        self.spec = spec
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        store = Path(spec.store)
        args = ["--host", spec.listen_host, *spec.server_args]
        self.server = ServerProcess(store, store / ".replica-logs" / f"{self.replica_id}.log", tee=spec.tee,
                                    extra_args=args, env={**os.environ, **spec.env},
                                    timeout_s=spec.start_timeout_s, die_with_parent=True)
        self.server.start()
        self.url = f"http://{advertised_host(spec.listen_host)}:{self.server.port}"
        self.local_url = self.server.url  # 127.0.0.1 (a wildcard listener answers there too)
        self.failures = 0
        self._http: httpx.AsyncClient | None = None
        self.registry = ray.get_actor(registry_name)
        ray.get(self.registry.register.remote(self.replica_id, {"url": self.url, "server_pid": self.server.pid}))

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:  # created in the replica's event loop
            self._http = httpx.AsyncClient(timeout=10.0)
        return self._http

    async def check_health(self) -> None:
        """Raise (Ray then restarts this replica) if the server died or keeps failing /healthz."""
        if self.server.proc is None or self.server.proc.poll() is not None:
            raise RuntimeError(f"replica {self.replica_id}: host server exited")
        try:
            r = await self._client().get(self.local_url + "/healthz")
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        self.failures = 0 if ok else self.failures + 1
        if self.failures >= HEALTH_FAILURES:
            raise RuntimeError(f"replica {self.replica_id}: /healthz failed {self.failures} times")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue depth for the autoscaler (autoscale.METRIC): requests in flight in the server."""
        from .autoscale import METRIC

        try:
            r = await self._client().get(self.local_url + "/metrics", params={"format": "json"})
            gauges = r.json().get("gauges", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return {METRIC: 0.0}
        return {METRIC: float(sum(g["value"] for g in gauges if g.get("name") == "in_flight_requests"))}

    def info(self) -> dict[str, Any]:
        return {"id": self.replica_id, "url": self.url, "server_pid": self.server.pid}

    async def __call__(self, request) -> Any:
        """Ray's proxy path: forward the request bytes to this replica's server (ciphertext only).

        Ray picks the replica, so this path suits one replica (or measuring Ray's proxy cost):
        a request sealed to another replica's key fails closed here (docs/scaling.md).
        """
        from starlette.responses import Response

        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_HEADERS}
        r = await self._client().request(request.method, self.local_url + request.url.path,
                                         params=dict(request.query_params), content=body, headers=headers)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    def __del__(self) -> None:
        """Ray stops the replica: deregister and stop the server (and with it the enclave)."""
        try:
            self.registry.deregister.remote(self.replica_id)
        except Exception:  # noqa: BLE001 (Ray may already be shutting down)
            pass
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
