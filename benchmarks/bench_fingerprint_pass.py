"""The training enclave's fingerprint pass, by layout and threading: what `CalTrainEnclave._fingerprints` chose.

What it measures: wall seconds of `fingerprints()` (eval forward of the whole model, the
normalised penultimate embedding) over `--images` random uint8 CIFAR-size images, alternating
the variants `--repeats` times (medians), on an untrained `--model`:

    default          one torch thread, the default (contiguous) layout
    channels_last    one torch thread, a channels-last copy of the model and inputs (what the enclave runs)
    intra_op_2       channels-last, torch.set_num_threads(2) (tried and dropped: spins on busy cores)
    workers_2        channels-last, chunks of 512 on two Python threads of one torch thread each
                     (what the enclave runs when it has 2 or more CPUs)

and the largest difference of channels-last fingerprints from default ones (float rounding).
Run: `OMP_NUM_THREADS=1 python benchmarks/bench_fingerprint_pass.py` (about a minute on 2 cores).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from enclaveml.train.fingerprint import channels_last_copy, fingerprints
from enclaveml.train.spec import ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="darknet:width=16")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    spec = ModelSpec.parse(a.model)
    pre = spec.preprocessing()
    model = spec.build().eval()
    cl = channels_last_copy(model).eval()
    x = (torch.rand(a.images, *spec.build().input_shape, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    chunks = [x[i:i + 512] for i in range(0, len(x), 512)]
    pool = ThreadPoolExecutor(2)

    def intra_op_2():
        torch.set_num_threads(2)
        try:
            return fingerprints(cl, x, pre, channels_last=True)
        finally:
            torch.set_num_threads(1)

    variants = {
        "default": lambda: fingerprints(model, x, pre),
        "channels_last": lambda: fingerprints(cl, x, pre, channels_last=True),
        "intra_op_2": intra_op_2,
        "workers_2": lambda: torch.cat(list(pool.map(lambda c: fingerprints(cl, c, pre, channels_last=True), chunks))),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    diff = float((fingerprints(model, x, pre) - fingerprints(cl, x, pre, channels_last=True)).abs().max())
    same = torch.equal(variants["workers_2"](), variants["channels_last"]())
    out = {"benchmark": "fingerprint-pass", "model": spec.text, "images": a.images, "cpus": os.cpu_count(),
           "seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
           "max_abs_diff_channels_last": diff, "workers_2_equals_channels_last": same,
           "load_average": os.getloadavg()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
