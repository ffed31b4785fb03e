"""Do one-round-trip answers equal the two-call path's, bit for bit? (issue 13, serve/placement.py)

Trust side: operator (owner, host and enclave in one process). Darknet (trained zoo weights) split
at --k, deployed in an in-process `EnclaveService` with its BackNet; each of --n CIFAR-10 test
JPEGs is answered twice: front -> the host's small-pass BackNet copy (channels-last, as
`BackNetExecutor` runs it) -> finish, and `front_batch(finish_rows=4)` (the enclave's one op).
Prints how many answers (logits and the top 10) are identical and the largest difference:

    PYTHONPATH=src python benchmarks/check_one_round_trip.py [--k 10] [--n 100]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from enclaveml import paths
    from enclaveml.crypto import SigningKey, frame_fresh, seal_key_release
    from enclaveml.models import zoo
    from enclaveml.models.bundle import bundle_files, make_bundle, read_public_bundle
    from enclaveml.protocol import ModelPin, ModelRef, Target, infer as protocol
    from enclaveml.serve.enclave import Answered, EnclaveService
    from enclaveml.serve.placement import SMALL_ROWS
    from enclaveml.tee import get_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = paths.shared_dir() / "data" / "cifar10" / "test"
    images = sorted(data.glob("*/*.jpg"))
    images = images[::max(1, len(images) // args.n)][:args.n]
    with tempfile.TemporaryDirectory(prefix="one-trip-") as tmp:
        base = Path(tmp)
        entry, owner = zoo.entry("darknet"), SigningKey.generate()
        _, key = make_bundle(zoo.load("darknet"), args.k, base / "b", {"zoo": "darknet"}, entry.preprocessing,
                             list(entry.classes), owner)
        svc = EnclaveService(get_backend("sim", platform_dir=base / "platform", lock_memory=False))
        files = bundle_files(base / "b")
        svc.deploy("d", seal_key_release(owner, svc.public_key(), "d", key, svc.issue_nonce(b"check-nonce-0001")), files)
        _, back = read_public_bundle(files)
        host_small = copy.deepcopy(back).to(memory_format=torch.channels_last)
        ref = ModelRef(owner.public_key().to_bytes().hex(), "d")
        same, worst = 0, 0.0
        for path in images:
            def seal():
                payload = protocol.encode_payload(path.read_bytes(), 10, True)
                return protocol.seal_infer(svc.public_key(), Target(ref, ModelPin(ref.owner)), frame_fresh(payload))

            msg, ctx, aad = seal()
            handle, ir = svc.front(str(ref), msg)
            with torch.no_grad():
                two = protocol.decode_result(ctx.open_response(svc.finish(handle, host_small(ir)), aad))
            msg, ctx, aad = seal()
            (ans,) = svc.front_batch(str(ref), [msg], finish_rows=SMALL_ROWS)
            assert isinstance(ans, Answered)
            one = protocol.decode_result(ctx.open_response(ans.sealed, aad))
            same += one["logits"] == two["logits"] and one["top"] == two["top"]
            worst = max(worst, max(abs(a - b) for a, b in zip(one["logits"], two["logits"])))
    print(f"{same}/{len(images)} answers identical (logits and top 10); largest logit difference {worst}")


if __name__ == "__main__":
    main()
