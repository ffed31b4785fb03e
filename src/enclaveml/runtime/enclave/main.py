"""The enclave worker's main: connect the channel, harden, pick the backend, serve the registered ops.

Trust side: enclave. One main for every enclave worker (serving's `serve/worker.py`, CalTrain's
`train/enclave_worker.py`): each describes itself as a `WorkerApp` (its own flags, its measured
configuration, and a function that builds its op registry once the process is hardened) and calls
`run_worker(app)`. The order is the point: the process hardens itself before any key or input
exists in its memory, measures itself at launch, and only then builds the app's state.

Common flags: `--channel-fd FD` or `--channel-path PATH [--no-shm]` (the transport), `--tee`
(backend: sim, gramine-sgx, tsm), `--threads` (requests handled at once; an app may cap it, e.g.
CalTrain at 1: its steps are a strict sequence), `--torch-threads`, `--no-lock-memory`.
Every worker answers two built-in ops inline: `ping` (liveness) and `info` (backend, measurement,
hardening report, and what the app adds).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import heap
from ..rpc import serve_channel
from ..transport import worker_channel_from_argv
from .ops import OpRegistry


@dataclass
class WorkerApp:
    """What an enclave worker adds to the runtime.

    `add_arguments(parser)`: its own flags. `config(args)`: its enclave configuration (measured by
    the sim backend; fixed in the manifest's argv under Gramine). `build(backend, args, config)`:
    called after hardening; returns the op registry and a function giving the app's `info` fields.
    `max_threads`: a cap on pool threads (1: one request at a time, in order).
    `inline_when_idle(header, tensors, blobs)`: requests that may run on the reading thread while
    the pool is idle (`rpc.serve_channel`)."""

    prog: str
    build: Callable[[Any, argparse.Namespace, dict], "tuple[OpRegistry, Callable[[], dict]]"]
    add_arguments: "Callable[[argparse.ArgumentParser], None] | None" = None
    config: "Callable[[argparse.Namespace], dict] | None" = None
    max_threads: "int | None" = None
    default_threads: int = 2
    inline_when_idle: "Callable[[dict, dict, dict], bool] | None" = None


def parse_args(app: WorkerApp, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=app.prog)
    p.add_argument("--tee", default="sim")
    p.add_argument("--threads", type=int, default=app.default_threads, help="requests handled at once")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--no-lock-memory", action="store_true")
    if app.add_arguments is not None:
        app.add_arguments(p)
    return p.parse_args(argv)


def add_builtin_ops(registry: OpRegistry, info: Callable[[], dict]) -> OpRegistry:
    """The ops every worker answers, on the reading thread: `ping` (liveness: so it answers while
    every pool thread runs a long request; a busy enclave is not a hung one) and `info`."""
    registry.add("ping", lambda call: {"pong": True}, inline=True)
    registry.add("info", lambda call: info(), inline=True)
    return registry


def quiet_warnings() -> None:
    """No warning is ever printed by an enclave worker: its stderr is the host's log, and a
    library's warning may quote what it was given (Pillow's EXIF warnings name the tags and sizes
    of the user's image). Ahead of every other filter, `-W error` included."""
    warnings.simplefilter("ignore")


def run_worker(app: WorkerApp, argv: list[str] | None = None) -> None:
    """The worker process's main: returns when the host closes the channel."""
    quiet_warnings()  # before anything of a request is parsed
    channel, rest = worker_channel_from_argv(list(sys.argv[1:] if argv is None else argv))
    args = parse_args(app, rest)

    from ...tee import get_backend

    config = app.config(args) if app.config is not None else {}
    options = {"lock_memory": not args.no_lock_memory, "config": config} if args.tee == "sim" else {}
    backend = get_backend(args.tee, **options)
    hardening = backend.harden()  # first: before any key or input exists in this process
    torch.set_num_threads(max(1, args.torch_threads))
    measurement = backend.measurement()  # measured at launch, like a TEE

    heap.configure()  # no collection of the startup heap in a request's path (runtime/heap.py)
    registry, app_info = app.build(backend, args, config)
    base = {"tee": args.tee, "measurement": measurement, "hardening": hardening}
    add_builtin_ops(registry, lambda: {**base, **app_info()})
    threads = max(1, args.threads)
    if app.max_threads is not None:
        threads = min(threads, app.max_threads)
    heap.settle()
    serve_channel(channel, registry.handle, max_workers=threads, inline=registry.is_inline,
                  inline_when_idle=app.inline_when_idle)
