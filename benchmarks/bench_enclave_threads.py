"""Does the enclave's serving logic scale over its pool threads? In one process, no host or channel.

Trust side: operator (drives `serve.enclave.EnclaveService` directly, as the worker's pool threads
would). Darknet (trained zoo weights if present) split at --k is deployed with its BackNet; the
first --images CIFAR-10 test JPEGs are sealed as requests of --batch images (as the SDK seals
them) and answered in one round trip (`front_batch(..., finish_rows)`, the default placement on
a CPU host), --per requests per call, on 1 and on 2 threads at once, alternating --rounds times.
Prints images/s, process CPU ms per image and the enclave's stage clock per image (wall / CPU us:
a stage whose wall exceeds its CPU on 2 threads waits, for the GIL or for a core), then the
decoder alone: `decode_array` and Pillow's `decode_image` per image on 1 and 2 threads.

    PYTHONPATH=src python benchmarks/bench_enclave_threads.py [--images 4096] [--rounds 2]

Why: under load the worker's two pool threads were busy 89% of the time but on a core only 89-91%
of that; Pillow's JPEG decoding (mostly Python) held the GIL (docs/benchmarks.md, session 8).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch


def main() -> None:
    from enclaveml import paths
    from enclaveml.crypto import frame_fresh
    from enclaveml.data.preprocess import decode_array, decode_image
    from enclaveml.models import zoo
    from enclaveml.protocol import infer as protocol

    shared = paths.shared_dir()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared / "data" / "cifar10" / "test") if shared else None)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32, help="images per request")
    ap.add_argument("--per", type=int, default=1, help="requests per front_batch call")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the worker's pool threads each run one torch thread
    images = [p.read_bytes() for p in sorted(Path(args.data).glob("*/*.jpg"))[: args.images]]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inprocess import deployed_darknet

    svc, ref, target = deployed_darknet(args.k)
    entry = zoo.entry("darknet")

    def sealed() -> list[bytes]:  # fresh ids every run: the replay guard would refuse a second use
        return [protocol.seal_infer(svc.public_key(), target,
                                    frame_fresh(protocol.encode_payload(images[i:i + args.batch], 1, False)))[0]
                for i in range(0, len(images), args.batch)]

    def serve(reqs: list[bytes]) -> None:
        torch.set_num_threads(1)
        for i in range(0, len(reqs), args.per):
            out = svc.front_batch(str(ref), reqs[i:i + args.per], 1 << 20)
            if any(isinstance(o, Exception) for o in out):
                raise RuntimeError(out)

    def run(n: int) -> dict:
        reqs = sealed()
        s0 = svc.clock.snapshot()
        threads = [threading.Thread(target=serve, args=(reqs[i::n],)) for i in range(n)]
        c, t = time.process_time(), time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        s1 = svc.clock.snapshot()
        stages = {k: [round((v["wall_ns"] - s0.get(k, {"wall_ns": 0})["wall_ns"]) / 1e3 / len(images), 1),
                      round((v["cpu_ns"] - s0.get(k, {"cpu_ns": 0})["cpu_ns"]) / 1e3 / len(images), 1)]
                  for k, v in s1.items()}
        return {"threads": n, "images_per_s": round(len(images) / dt, 1),
                "cpu_ms_per_image": round(1000 * cpu / len(images), 3),
                "stages_us_per_image": {k: v for k, v in stages.items() if v[0] >= 1}}

    run(1)  # warm: oneDNN primitives, caches
    results = []
    for _ in range(args.rounds):
        for n in (1, 2):
            r = run(n)
            results.append(r)
            print(f"{n} thread(s): {r['images_per_s']} images/s, {r['cpu_ms_per_image']} CPU ms/image; "
                  + ", ".join(f"{k} {w}/{c}" for k, (w, c) in r["stages_us_per_image"].items()))

    pre = entry.preprocessing
    subset = images[: min(len(images), 3000)]

    def decode_rate(fn, n: int) -> float:
        def loop(xs):
            for b in xs:
                fn(b, pre)
        ths = [threading.Thread(target=loop, args=(subset[i::n],)) for i in range(n)]
        t = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return round(1e6 * (time.perf_counter() - t) / len(subset), 1)

    decode = {}
    for name, fn in (("decode_array", decode_array), ("decode_image (Pillow)", decode_image)):
        fn(subset[0], pre)
        decode[name] = {"1 thread": decode_rate(fn, 1), "2 threads": decode_rate(fn, 2)}
        print(f"{name}: wall us per image on 1 thread {decode[name]['1 thread']}, on 2 threads "
              f"{decode[name]['2 threads']}")
    print(json.dumps({"runs": results, "decode_wall_us_per_image": decode, "images": len(images),
                      "batch": args.batch, "per": args.per, "k": args.k}))


if __name__ == "__main__":
    main()
