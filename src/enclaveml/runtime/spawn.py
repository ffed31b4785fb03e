"""Start an enclave worker process and connect a channel to it: by fd, by socket path, or under Gramine.

Trust side: host. The worker is always a separate process (its own address space), never a fork
of the host. `WorkerSpec` says which worker (its module, its arguments) and how it starts;
`start_worker(spec)` returns (process, host end of the channel). `handle.EnclaveHandle` starts
and restarts workers through it, for serving and CalTrain alike.

- by fd (default): a socketpair; the worker inherits its end as `--channel-fd FD`; tensors go
  through shared memory.
- by path (`socket_path`): the host listens on a Unix socket path, the worker connects with
  `--channel-path PATH --no-shm`; tensors go inline (for enclaves that cannot inherit fds or map
  host memory).
- under Gramine (`socket_path` and `launch`): `launch()` starts `gramine-sgx worker`, whose argv
  is fixed by the signed manifest (`tee.gramine.worker_argv`), not by this host; the host only
  listens at the path the manifest names (`gramine_launch`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .arena import DEFAULT_ARENA_BYTES
from .errors import ChannelClosed
from .transport import Channel


@dataclass
class WorkerSpec:
    """Which worker to start and how. `module` is run as `python -m module`; `launch`, given with
    `socket_path`, starts the process instead (Gramine: the manifest fixes the argv)."""

    module: str
    args: list[str] = field(default_factory=list)
    env: "dict[str, str] | None" = None
    socket_path: "str | None" = None
    launch: "Callable[[], subprocess.Popen] | None" = None
    arena_bytes: int = DEFAULT_ARENA_BYTES
    connect_timeout_s: float = 120.0

    def path_argv(self) -> list[str]:
        """The argv of a plain worker reached over `socket_path` (no shared memory)."""
        return [sys.executable, "-m", self.module, "--channel-path", str(self.socket_path), "--no-shm", *self.args]


def spawn_by_fd(module: str, args: list[str], env: dict[str, str] | None = None,
                arena_bytes: int = DEFAULT_ARENA_BYTES) -> tuple[subprocess.Popen, Channel]:
    """Start `python -m module --channel-fd FD *args` connected to the returned Channel.

    The worker finds its end with `transport.worker_channel_from_argv`.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = child.fileno()
        proc = subprocess.Popen([sys.executable, "-m", module, "--channel-fd", str(fd), *args],
                                pass_fds=(fd,), env=env, close_fds=True)
    finally:
        child.close()
    return proc, Channel(parent, arena_bytes)


def spawn_at_path(path: str, argv: list[str] | None = None, env: dict[str, str] | None = None,
                  launch: "Callable[[], subprocess.Popen] | None" = None, timeout_s: float = 120.0,
                  use_shm: bool = False) -> tuple[subprocess.Popen, Channel]:
    """Listen on the Unix socket `path`, start the worker, accept its connection.

    Either `argv` (run as a subprocess) or `launch()` (returns a Popen, e.g. Gramine's). Shared
    memory is off by default here: an enclave that cannot inherit fds usually cannot map host
    shared memory either, so tensors go inline.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path):
            os.unlink(path)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.settimeout(0.2)
        proc = launch() if launch is not None else subprocess.Popen(list(argv or []), env=env, close_fds=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn, _ = listener.accept()
                break
            except socket.timeout:
                if proc.poll() is not None:  # it died before connecting: say so now, not at the deadline
                    raise ChannelClosed(f"the enclave worker exited ({proc.returncode}) before connecting to {path}"
                                        ) from None
                if time.monotonic() < deadline:
                    continue
                proc.kill()
                raise ChannelClosed(f"the enclave worker did not connect to {path} in {timeout_s:.0f} s") from None
            except OSError:
                proc.kill()
                raise ChannelClosed(f"the enclave worker could not connect to {path}") from None
        conn.settimeout(None)
        return proc, Channel(conn, use_shm=use_shm)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def start_worker(spec: WorkerSpec) -> tuple[subprocess.Popen, Channel]:
    """Start the worker `spec` describes: (its process, the host's end of the channel)."""
    if spec.socket_path is None:
        if spec.launch is not None:
            raise ValueError("a launched worker (Gramine) is reached over a socket path")
        return spawn_by_fd(spec.module, spec.args, env=spec.env, arena_bytes=spec.arena_bytes)
    return spawn_at_path(spec.socket_path, spec.path_argv(), env=spec.env, launch=spec.launch,
                         timeout_s=spec.connect_timeout_s)


@dataclass
class GramineLaunch:
    """A prepared Gramine worker: the socket its manifest names and how to start it (None after a
    dry run, which only wrote the manifest and printed the commands)."""

    socket_path: str
    launch: "Callable[[], subprocess.Popen] | None"
    mrenclave: "str | None" = None


def gramine_launch(workdir: Path, worker_argv: Callable[[str], list[str]], cost_path: "Path | None" = None,
                   signing_key: "Path | None" = None, dry_run: bool = False, threads: int = 1,
                   echo: Callable[[str], Any] = print) -> GramineLaunch:
    """Write the worker's manifest template into `workdir` (the argv from `worker_argv(socket)`);
    with `dry_run` print the Gramine commands and launch nothing; else check the tools, render and
    sign, and return how to start `gramine-sgx worker`. The same for every worker module."""
    import shlex

    from ..errors import UserInputError
    from ..tee import gramine

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "worker.sock"
    if len(str(sock).encode()) > 100:  # sun_path is 108 bytes on Linux
        raise UserInputError(f"--gramine-dir {workdir} is too long for a Unix socket path; pick a shorter one")
    sealed = workdir / "sealed"
    sealed.mkdir(exist_ok=True)
    opts = dict(argv=worker_argv(str(sock)), state_dir=sealed)
    if cost_path is not None:
        cost = gramine.cost_from_file(cost_path)
        cost.setdefault("threads", threads)
        text = gramine.manifest_for_cost(cost, **opts)
    else:
        text = gramine.generate_manifest(**opts)
    (workdir / "worker.manifest.template").write_text(text)
    cmds = gramine.build_commands(workdir, signing_key)
    if dry_run:
        echo(f"manifest template: {workdir / 'worker.manifest.template'}")
        echo(f"worker socket: {sock}")
        for cmd in cmds:
            echo(f"(cd {shlex.quote(str(workdir))} && {shlex.join(cmd)})")
        return GramineLaunch(str(sock), None)
    gramine.require_tools()
    build = gramine.build_enclave(workdir, text, signing_key)
    print(f"enclave signed: MRENCLAVE {build.mrenclave} MRSIGNER {build.mrsigner}", file=sys.stderr, flush=True)
    return GramineLaunch(str(sock), lambda: gramine.launch_enclave(build), build.mrenclave)
