"""Shared test fixtures: real data from ../shared, small thread counts for 2-core CI."""

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
