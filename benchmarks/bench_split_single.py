"""One image through darknet's FrontNet and BackNet (k=10) in a tight loop, by weight layout.

Trust side: operator. The floor a single-image request's two model passes could reach inside the
service if their weights stayed in cache (`bench_serve.py` measures the same passes in the
service): `PYTHONPATH=src python benchmarks/bench_split_single.py [--k 10] [--repeats 200] [--rows 1]`.
One torch thread; prints microseconds per pass (of `--rows` images), last line one JSON object.
`back_channels_last_on_cl_ir_us` is the enclave's one-round-trip pass (serve/placement.py): the
channels-last BackNet fed the channels-last FrontNet's IR as it comes out, with no reorder.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from enclaveml.models import zoo
from enclaveml.models.split import split_model


def per_pass_us(f, x, repeats: int) -> float:
    for _ in range(20):
        f(x)
    t = time.perf_counter()
    for _ in range(repeats):
        f(x)
    return round((time.perf_counter() - t) / repeats * 1e6, 1)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rows", type=int, default=1, help="images per pass")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = zoo.load("darknet").eval()
    parts = split_model(model, args.k)
    x = torch.rand(args.rows, 3, 32, 32)
    ir = parts.front(x)
    cl = torch.channels_last
    ir_cl = copy.deepcopy(parts.front).to(memory_format=cl)(x.contiguous(memory_format=cl))
    out = {
        "whole_contiguous_us": per_pass_us(model, x, args.repeats),
        "whole_channels_last_us": per_pass_us(copy.deepcopy(model).to(memory_format=cl), x.contiguous(memory_format=cl),
                                              args.repeats),
        "front_contiguous_us": per_pass_us(parts.front, x, args.repeats),
        "front_channels_last_us": per_pass_us(copy.deepcopy(parts.front).to(memory_format=cl), x, args.repeats),
        "back_contiguous_us": per_pass_us(parts.back, ir, args.repeats),
        "back_channels_last_us": per_pass_us(copy.deepcopy(parts.back).to(memory_format=cl), ir, args.repeats),
        "back_channels_last_on_cl_ir_us": per_pass_us(copy.deepcopy(parts.back).to(memory_format=cl), ir_cl,
                                                      args.repeats),
        "k": args.k, "rows": args.rows, "threads": 1,
    }
    for k, v in out.items():
        print(f"{k:28}{v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
