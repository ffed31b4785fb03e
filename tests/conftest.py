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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-data caches and sim platform keys out of the user's home during tests."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("ENCLAVEML_CACHE", str(base / "cache"))
    monkeypatch.setenv("ENCLAVEML_HOME", str(base / "home"))


def _our_shm_segments() -> set[str]:
    d = Path("/dev/shm")
    return {p.name for p in d.iterdir() if p.name.startswith("eml")} if d.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def _no_shared_memory_left_behind():
    """Channel segments are anonymous memfds (security review F-34): a /dev/shm/eml* entry made
    during the session, by any test or any process it killed, fails the run."""
    before = _our_shm_segments()
    yield
    left = sorted(n for n in _our_shm_segments() - before if not _held_by_a_stranger(n))
    assert not left, f"shared-memory segments outlived the test session: {left[:10]}"


def _held_by_a_stranger(name: str) -> bool:
    """A segment whose creator (the pid in its name) is alive and not of this test process tree:
    another program's on a shared machine, not a leak of ours. A gone creator counts as ours."""
    try:
        pid = int(name.split("_")[1])
        ppid = pid
        while ppid > 1:
            if ppid == os.getpid():
                return False
            stat = Path(f"/proc/{ppid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        return True
    except (IndexError, ValueError, OSError):
        return False
