"""Start the replicas on Ray Serve and the front on --port, until interrupted (host side).

A local Ray instance by default (small: no dashboard, the CPUs it is told), an existing cluster
with `ray_address`. The deployment has a fixed number of replicas, or autoscales between
min and max on the replicas' queue depth (autoscale.py). Ray's HTTP proxy is off unless
`proxy_port` is given (then it forwards to one replica; for one replica or measurement).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from ..metrics import json_logger
from .deployment import REGISTRY, ReplicaSpec

APP_NAME = "enclaveml"
NAMESPACE = "enclaveml"


@dataclass
class ReplicaPlan:
    """How many replicas and how Ray runs them."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    ray_address: str | None = None
    #: CPUs Ray reserves per replica (placement); a replica's server uses about one core under load.
    replica_cpus: float = 1.0
    #: CPUs of a local Ray instance (default: the machine's).
    ray_cpus: int | None = None
    health_check_period_s: float = 5.0
    target_in_flight: float = 4.0
    proxy_port: int | None = None

    def autoscaling(self) -> dict[str, Any] | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        lo = self.min_replicas if self.min_replicas is not None else 1
        hi = self.max_replicas if self.max_replicas is not None else max(lo, self.replicas)
        from .autoscale import in_flight_policy

        return {"min_replicas": lo, "max_replicas": hi, "initial_replicas": min(max(self.replicas, lo), hi),
                "target_ongoing_requests": self.target_in_flight, "metrics_interval_s": 2.0,
                "look_back_period_s": 10.0, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0,
                "policy": {"policy_function": in_flight_policy}}


def check_plan(plan: ReplicaPlan) -> None:
    from ...errors import UserInputError

    if plan.replicas < 1:
        raise UserInputError("--replicas must be at least 1")
    if plan.min_replicas is not None and plan.min_replicas < 1:
        raise UserInputError("--min-replicas must be at least 1 (a replica must hold the deployments)")
    if plan.max_replicas is not None and plan.max_replicas < (plan.min_replicas or 1):
        raise UserInputError("--max-replicas must be at least --min-replicas")


def init_ray(plan: ReplicaPlan) -> None:
    """Connect to `plan.ray_address`, or start a small local Ray (no dashboard, quiet workers)."""
    import ray

    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "ENCLAVEML_HOME": os.environ.get("ENCLAVEML_HOME", "")}
    runtime_env = {"env_vars": {k: v for k, v in env.items() if v}}
    if plan.ray_address:
        ray.init(address=plan.ray_address, namespace=NAMESPACE, runtime_env=runtime_env, log_to_driver=False)
    else:
        # (A local Ray's workers inherit this process's environment: PYTHONPATH, ENCLAVEML_HOME.)
        ray.init(address="local", num_cpus=plan.ray_cpus or os.cpu_count() or 1, include_dashboard=False, namespace=NAMESPACE,
                 log_to_driver=False, object_store_memory=80 * 1024 * 1024, configure_logging=False)


def start_replicas(spec: ReplicaSpec, plan: ReplicaPlan):
    """Deploy the replicas; returns the registry actor once they are up (serve.run waits)."""
    import ray
    from ray import serve

    from .deployment import EnclaveReplica, ReplicaRegistry

    check_plan(plan)
    registry = ReplicaRegistry.options(name=REGISTRY, get_if_exists=True).remote()
    if plan.proxy_port is None:
        serve.start(proxy_location="Disabled")
    else:
        serve.start(http_options={"host": "127.0.0.1", "port": plan.proxy_port})
    opts: dict[str, Any] = dict(ray_actor_options={"num_cpus": plan.replica_cpus},
                                health_check_period_s=plan.health_check_period_s, health_check_timeout_s=30.0,
                                max_ongoing_requests=256, graceful_shutdown_timeout_s=30.0)
    auto = plan.autoscaling()
    if auto is None:
        opts["num_replicas"] = plan.replicas
    else:
        opts["autoscaling_config"] = auto
    dep = serve.deployment(EnclaveReplica, name="EnclaveReplica").options(**opts)
    serve.run(dep.bind(spec, REGISTRY), name=APP_NAME, route_prefix="/")
    ray.get(registry.list.remote())
    return registry


def stop_replicas() -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()


def run_front(registry, host: str, port: int) -> None:
    """Serve the front on host:port until interrupted; logs `listening` with the real port."""
    import uvicorn

    from .front import ReplicaView, create_front_app

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    log = json_logger()
    server = uvicorn.Server(uvicorn.Config(create_front_app(ReplicaView(registry)), log_config=None,
                                           access_log=False, lifespan="on", timeout_graceful_shutdown=5))
    startup = server.startup

    async def announce(sockets=None):
        await startup(sockets=sockets)
        log.info("listening", extra={"fields": {"host": host, "port": sock.getsockname()[1], "pid": os.getpid(),
                                                "front": True}})

    server.startup = announce  # type: ignore[method-assign]
    server.run(sockets=[sock])


def serve_replicated(spec: ReplicaSpec, plan: ReplicaPlan, host: str, port: int) -> None:
    """`enclaveml serve --replicas`: Ray, the replicas, then the front, until Ctrl-C."""
    log = json_logger()
    check_plan(plan)
    init_ray(plan)
    try:
        registry = start_replicas(spec, plan)
        log.info("replicas started", extra={"fields": {"replicas": plan.replicas, "autoscaling": plan.autoscaling()
                                                       is not None, "ray_address": plan.ray_address or "local"}})
        run_front(registry, host, port)
    finally:
        stop_replicas()
