"""Darknet deployed in an in-process `EnclaveService`, for the benchmarks that drive the enclave's
serving logic directly (no host, channel or HTTP): `bench_enclave_lone.py`, `bench_enclave_threads.py`.

Trust side: operator (owner and enclave in one process, sim backend, memory not locked).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def deployed_darknet(k: int):
    """(service, its deployment's ref, a client's target for it): darknet (trained zoo weights if
    present) split at `k`, deployed with its BackNet as the owner's CLI would."""
    from enclaveml.crypto import SigningKey, seal_key_release
    from enclaveml.models import zoo
    from enclaveml.models.bundle import bundle_files, make_bundle
    from enclaveml.protocol import ModelPin, ModelRef, Target
    from enclaveml.serve.enclave import EnclaveService
    from enclaveml.tee import get_backend

    try:
        model = zoo.load("darknet")
    except Exception:
        model = zoo.load("darknet", pretrained=False)
    entry = zoo.entry("darknet")
    with tempfile.TemporaryDirectory() as tmp:
        owner = SigningKey.generate()
        _, key = make_bundle(model, k, Path(tmp) / "b", {"zoo": "darknet"}, entry.preprocessing,
                             list(entry.classes), owner)
        svc = EnclaveService(get_backend("sim", platform_dir=Path(tmp) / "platform", lock_memory=False))
        svc.deploy("d", seal_key_release(owner, svc.public_key(), "d", key, svc.issue_nonce(b"bench-nonce-1234")),
                   bundle_files(Path(tmp) / "b"))
    ref = ModelRef(owner.public_key().to_bytes().hex(), "d")
    return svc, ref, Target(ref, ModelPin(ref.owner))
