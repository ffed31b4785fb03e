"""Start `enclaveml serve` as a child process and wait until it listens (for tests, benchmarks, demos).

Trust side: whoever operates the host (a test harness, a benchmark). The server logs JSON lines to
a log file; its 'listening' line carries the port it really got (we ask for port 0).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerProcess:
    """`with ServerProcess(store, log) as srv: srv.url ...` (stops the server, and its enclave, on exit)."""

    def __init__(self, store: str | os.PathLike[str], log: str | os.PathLike[str], tee: str = "sim",
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None, timeout_s: float = 180.0,
                 die_with_parent: bool = False):
        self.store, self.log_path = Path(store), Path(log)
        self.args = [sys.executable, "-m", "enclaveml", "serve", "--tee", tee, "--port", "0",
                     "--store", str(self.store), *(extra_args or [])]
        self.env = env
        self.timeout_s = timeout_s
        #: Linux: the server gets SIGKILL when the process that started it dies (a Ray replica
        #: actor killed outright must not leave its server, and enclave, behind).
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"event":"listening"' in line:
                    self.port = int(json.loads(line)["port"])
                    break
            if self.port is not None:
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"server did not start in {self.timeout_s:.0f} s; see {self.log_path}")
        r = httpx.get(self.url + "/healthz", timeout=60)
        if r.status_code != 200:
            self.stop()
            raise RuntimeError(f"server is not healthy: {r.text}")
        return self

    def enclave_pid(self) -> int:
        return int(httpx.get(self.url + "/healthz", timeout=60).json()["enclave_pid"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """(In the child, before exec.) Ask Linux for SIGKILL when the parent dies (PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own shutdown stops the server
        pass


def snapshot_package(dest: str | os.PathLike[str]) -> Path:
    """Copy the enclaveml source (no weights, no caches) under `dest`; returns `dest` for PYTHONPATH.

    Why: the sim measurement hashes the package source at worker launch. Running the server from
    a frozen copy keeps the expected measurement stable while the checkout is being edited.
    """
    import shutil

    import enclaveml

    src = Path(enclaveml.__file__).resolve().parent
    dest = Path(dest)
    shutil.copytree(src, dest / "enclaveml", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.pyc"))
    return dest


def local_sim_policy(home: str | os.PathLike[str], package_parent: str | os.PathLike[str] | None = None):
    """The policy that accepts this machine's sim platform (under `home`) running that package copy."""
    from ..tee import Policy
    from ..tee.sim import PLATFORM_DIR, expected_sim_measurement, sim_platform_public_key

    root = Path(package_parent) / "enclaveml" if package_parent is not None else None
    return Policy(allowed_backends=["sim"], measurements={"sim": [expected_sim_measurement(None, root=root)]},
                  sim_platform_keys=[sim_platform_public_key(Path(home) / PLATFORM_DIR).hex()])


def server_env(home: str | os.PathLike[str], package_parent: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment for a server child: its ENCLAVEML_HOME, the package copy first on the path, and
    OpenMP's spin-wait bounded (`threads.with_bounded_spin`: its lone BackNet passes may then use
    every core)."""
    from .threads import with_bounded_spin

    env = {**with_bounded_spin(), "ENCLAVEML_HOME": str(home)}
    if package_parent is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
