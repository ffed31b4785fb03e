"""FrontNet execution cost in one process: memory layout, pass size, threads, grad mode, hardening.

Trust side: operator (a measurement of the enclave's FrontNet code path, outside any enclave).

`python benchmarks/bench_frontnet.py [--model darknet] [--k 10] [--reps 3]`: CPU microseconds per
image (thread CPU time, so a loaded machine inflates it less than wall time) of the zoo model's
first k layers on random 32x32 inputs, one torch thread, for each variant: contiguous NCHW
against channels-last weights and input (what `serve/enclave.py` runs), passes of 32 and 64
images (the enclave's `MAX_PASS`), `torch.inference_mode` against `torch.no_grad`, two threads
running passes at once in one process (the enclave worker's two pool threads), and all of it
again after the sim TEE's process hardening (`tee.harden`). Each variant runs `--reps` times,
interleaved with the others; the table gives the fastest and the median, the last line a JSON
object of the fastest.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import threading

import torch


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def per_image_us(front, batch: int, images: int, channels_last: bool, mode=torch.no_grad) -> float:
    """Thread CPU us per image of `images` images through `front` in passes of `batch`."""
    x = torch.randn(batch, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    passes = max(1, images // batch)
    with mode():
        front(x)  # warm: oneDNN primitives are built on the first pass of a shape
        c = _cpu()
        for _ in range(passes):
            front(x)
        return (_cpu() - c) / (passes * batch) * 1e6


def two_threads_us(front, batch: int, images: int, channels_last: bool) -> float:
    """The mean of two threads' per-image CPU while both run passes at once."""
    out: list[float] = []
    ts = [threading.Thread(target=lambda: out.append(per_image_us(front, batch, images, channels_last)))
          for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(out) / len(out)


def main() -> None:
    from enclaveml.models import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="darknet")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024, help="images per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        model = zoo.load(args.model)
    except Exception:
        model = zoo.load(args.model, pretrained=False)
    front = torch.nn.Sequential(*list(model.layers)[:args.k]).eval()
    front_cl = copy.deepcopy(front).to(memory_format=torch.channels_last)
    n = args.images
    variants = {
        "nchw, pass 32": lambda: per_image_us(front, 32, n, False),
        "nchw, pass 64": lambda: per_image_us(front, 64, n, False),
        "nchw, pass 32, inference_mode": lambda: per_image_us(front, 32, n, False, torch.inference_mode),
        "channels-last, pass 32": lambda: per_image_us(front_cl, 32, n, True),
        "channels-last, pass 64": lambda: per_image_us(front_cl, 64, n, True),
        "channels-last weights, nchw input, pass 32": lambda: per_image_us(front_cl, 32, n, False),
        "nchw, pass 64, two threads at once": lambda: two_threads_us(front, 64, n, False),
        "channels-last, pass 32, two threads at once": lambda: two_threads_us(front_cl, 32, n, True),
    }
    with torch.no_grad():
        x = torch.randn(64, 3, 32, 32)
        diff = float((front(x) - front_cl(x.contiguous(memory_format=torch.channels_last))).abs().max())
    best: dict[str, float] = {}

    def run(tag: str) -> None:
        res: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.reps):
            for k, f in variants.items():
                res[k].append(f())
        for k, v in res.items():
            v.sort()
            best[f"{tag}: {k}"] = round(v[0], 1)
            print(f"{tag + ': ' + k:64}{v[0]:>9.0f}{v[len(v) // 2]:>9.0f}", file=sys.stderr)

    print(f"{args.model} FrontNet k={args.k}, CPU us per image, one torch thread{'':14}{'fastest':>9}{'median':>9}",
          file=sys.stderr)
    run("as is")
    from enclaveml.tee.harden import harden_process

    report = harden_process()  # what the sim backend's worker applies first
    run("hardened")
    print(json.dumps({"model": args.model, "k": args.k, "cpu_us_per_image": best,
                      "max_abs_diff_channels_last": diff, "hardening": report,
                      "load_average_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
