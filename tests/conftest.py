"""Shared test fixtures: real data from ../shared, small thread counts for 2-core CI, and a
session check that no shared-memory segment of ours (/dev/shm/eml*) outlives the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCLAVEML_SHARED", ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10"
ATTESTATION = SHARED / "testvectors" / "attestation"
HPKE_VECTORS = SHARED / "testvectors" / "hpke"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not CIFAR10.is_dir():
        pytest.skip("../shared/data/cifar10 is not beside this checkout")
    return CIFAR10


@pytest.fixture
def one_thread():
    """One intra-op thread for a test of small tensors (attacks on tiny models, small L-BFGS
    problems): on a shared 2-core machine two threads only contend, up to 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-data caches and sim platform keys out of the user's home during tests."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("ENCLAVEML_CACHE", str(base / "cache"))
    monkeypatch.setenv("ENCLAVEML_HOME", str(base / "home"))


def _our_shm_segments() -> set[str]:
    d = Path("/dev/shm")
    return {p.name for p in d.iterdir() if p.name.startswith("eml")} if d.is_dir() else set()


def _made_by_us(name: str) -> bool:
    """Whether the segment's creator (the pid in its name) is this test process or one of its
    descendants. One that is already gone counts as ours (strict); a live process of another
    tree is another program's on a shared machine."""
    try:
        pid = int(name.split("_")[1])
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return False
    except (IndexError, ValueError):
        return False
    except OSError:  # gone
        return True


@pytest.fixture(scope="session", autouse=True)
def _no_shared_memory_left_behind():
    """Channel segments are anonymous memfds (security review F-34): a /dev/shm/eml* entry made
    during the session by this process tree (a server, a worker, one a test killed) fails the run.
    New entries are classified as they appear, while their creator is still alive."""
    import threading

    before = _our_shm_segments()
    ours: dict[str, bool] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            for n in _our_shm_segments() - before:
                if n not in ours:
                    ours[n] = _made_by_us(n)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    yield
    done.set()
    t.join(5)
    left = sorted(n for n in _our_shm_segments() - before if ours.get(n, _made_by_us(n)))
    assert not left, f"shared-memory segments outlived the test session: {left[:10]}"
