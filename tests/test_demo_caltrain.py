"""The CalTrain act of `make demo` in a user's clone: no CIFAR-10, so scikit-learn's packaged digits.

Runs scripts/demo_caltrain.sh end to end (real server, enclave worker, uploads, training, trace,
signed audit) with DATA pointing nowhere, as in a clone without ../shared. Slow (about a minute
on a quiet 2-core machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.extended  # `make demo` runs the same script; test_train_audit/test_train_trace_modes cover its parts
def test_caltrain_demo_runs_on_packaged_digits(tmp_path):
    pytest.importorskip("sklearn.datasets")
    if shutil.which("curl") is None:
        pytest.skip("the demo script waits for the server with curl")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "enclaveml"
    cli.write_text(f"#!/bin/sh\nexec {sys.executable} -m enclaveml \"$@\"\n")
    cli.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT / "src"), "DATA": str(tmp_path / "no-cifar10"), "CALTRAIN_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "demo_caltrain.sh")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout
    assert "sklearn.datasets.load_digits" in log
    assert "traced inputs point to one cluster" in log or "no separated cluster" in log, log[-3000:]
    assert "label audit of run" in log and "verified: signed by an enclave" in log
    assert "the trace names participant 3" in log, log[-3000:]
    assert "the audit ranks participant 2" in log, log[-3000:]
