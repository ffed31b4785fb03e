"""The runtime's host handle and supervisor on a minimal real worker (the runtime's own worker main,
an app with one op): info and hardening from the main, a restart after SIGKILL through the app's
`restart`, backoff while restarting fails, and no restart once the host stops supervising."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from enclaveml.errors import DataError
from enclaveml.runtime.handle import DIED, EnclaveHandle, Supervisor, replace
from enclaveml.runtime.spawn import WorkerSpec

APP = '''
from enclaveml.runtime.enclave.main import WorkerApp, run_worker
from enclaveml.runtime.enclave.ops import Int, OpRegistry

def build(backend, args, config):
    ops = OpRegistry()

    @ops.op("square", x=Int(0, 1000))
    def square(call, x):
        return {"y": x * x}

    return ops, lambda: {"app": "tiny"}

run_worker(WorkerApp(prog="tiny", build=build, config=lambda args: {"app": "tiny"}))
'''


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "tiny_worker.py").write_text(APP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path[1:]])}
    return WorkerSpec("tiny_worker", ["--tee", "sim", "--no-lock-memory"], env=env)


def test_the_worker_main_hardens_measures_and_serves_the_apps_ops(spec):
    h = EnclaveHandle(spec, timeout_s=60)
    try:
        assert h.info["app"] == "tiny" and h.info["tee"] == "sim" and len(bytes.fromhex(h.info["measurement"])) == 32
        assert h.info["hardening"]["backend"] == "sim" and h.info["hardening"]["non_dumpable"] == "applied"
        assert h.call({"op": "square", "x": 12})[0]["y"] == 144
        with pytest.raises(DataError, match="x must be an integer 0..1000"):
            h.call({"op": "square", "x": 1001})
        assert asyncio.run(h.ping(5.0)) and h.alive()
    finally:
        h.close()
    assert not h.alive()


def test_the_supervisor_restarts_a_killed_worker_with_backoff_and_stops_cleanly(spec):
    current = {"h": EnclaveHandle(spec, timeout_s=60)}
    calls: list[tuple[str, float]] = []

    async def restart(reason: str) -> bool:
        calls.append((reason, time.monotonic()))
        if len(calls) == 1:
            return False  # the first attempt fails: the supervisor waits and tries again
        current["h"] = await replace(current["h"], reason)
        return True

    sup = Supervisor(lambda: current["h"], restart, ping_interval_s=0.3, ping_timeout_s=3.0, poll_s=0.1)
    sup.start_thread()
    old = current["h"].pid
    try:
        os.kill(old, signal.SIGKILL)
        deadline = time.time() + 60
        while current["h"].pid == old:
            assert time.time() < deadline, calls
            time.sleep(0.05)
        assert [r for r, _ in calls] == [DIED, DIED] and calls[1][1] - calls[0][1] >= 0.1  # backed off
        assert current["h"].call({"op": "square", "x": 3})[0]["y"] == 9
    finally:
        sup.stop()
        current["h"].close()
    time.sleep(0.5)
    assert len(calls) == 2, "a worker the host closed itself was restarted"
