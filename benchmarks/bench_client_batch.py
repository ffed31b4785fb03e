"""Client CPU to seal one inference request and to open and check its answer, per image.

Trust side: client (no server, no network). The SDK's own request path (`EnclaveClient._seal`:
payload, padding, freshness header, HPKE in the policy's suite, the target in the clear) and
answer path (`RequestContext.open_response` + `protocol.decode_results` against the pin) on real
CIFAR-10 JPEGs, with an answer the enclave's code builds (`encode_result`, `seal_response`).
Prints thread-CPU microseconds per request and per image for each, then one JSON line.

    PYTHONPATH=src python benchmarks/bench_client_batch.py [--images 32] [--suite x25519] [--n 300]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from enclaveml.client.sdk import AttestedEnclave, EnclaveClient
from enclaveml.crypto import suites as S
from enclaveml.protocol import infer as protocol
from enclaveml.protocol.identity import ModelIdentity, ModelPin, ModelRef, Target, infer_aad, split_target
from enclaveml.tee import Policy

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10" / "test"


def _cpu_us(f, n: int) -> float:
    for _ in range(max(5, n // 10)):
        f()
    t = time.thread_time()
    for _ in range(n):
        f()
    return (time.thread_time() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per request")
    ap.add_argument("--suite", default=S.X25519, help="HPKE suite (crypto/suites.py; default x25519)")
    ap.add_argument("--n", type=int, default=300, help="requests timed per path")
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(DATA.glob("*/*.jpg"))[:args.images]]
    keys = S.EnclaveKeys.generate()
    owner = "ab" * 32
    target = Target(ModelRef(owner, "darknet"), ModelPin(owner, (), 10))
    identity = ModelIdentity(owner, "darknet", "cd" * 32, 10, 0)
    labels = [f"class{i}" for i in range(10)]
    client = EnclaveClient("http://127.0.0.1:1", Policy(crypto={"suite": S.check_suite(args.suite)}))
    att = AttestedEnclave(keys.classic.public_bytes(), b"n", None, 0.0, pq_public_key=keys.pq.public_bytes())
    aad = infer_aad(target.to_bytes())
    body, ctx = client._seal(att, images, target, 1, False)
    _, _, msg = split_target(body)
    _, sealer = S.open_any(keys, msg, aad)
    answer = sealer.seal_response(b"".join(protocol.encode_result(identity, [0.1] * 10, labels, 1) for _ in images), aad)

    def open_and_check():
        return protocol.decode_results(ctx.open_response(answer, aad), len(images), expected=target)

    out = {"images": len(images), "suite": args.suite,
           "seal_us": round(_cpu_us(lambda: client._seal(att, images, target, 1, False), args.n), 1),
           "open_us": round(_cpu_us(open_and_check, args.n), 1)}
    client.close()
    for k in ("seal", "open"):
        print(f"{k}: {out[k + '_us']:8.1f} us CPU per {len(images)}-image request, {out[k + '_us'] / len(images):6.1f} per image")
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
