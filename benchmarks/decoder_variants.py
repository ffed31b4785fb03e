"""Decoder attacker variants on darknet: SSIM per point against their cost (owner-side benchmark).

Trains every point's decoder the way the assessment does (shared forward batches, early stop) with
one setting, scores each on the 64 test samples, and prints one JSON line: the SSIM and steps per
point, wall and process CPU seconds, the load average. How the defaults (width 256, 200 steps,
lr 4e-3, SSIM weight 0.05) were chosen: docs/benchmarks.md.

    python benchmarks/decoder_variants.py NAME --steps 200 --lr 4e-3 --width 256 --ssim-weight 0.05 [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from enclaveml.assess import decoder_training as dt
from enclaveml.assess.data import load_assess_data
from enclaveml.assess.forward import PointForward
from enclaveml.assess.metrics import ssim
from enclaveml.models import zoo

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ssim-weight", type=float, default=0.05)
    ap.add_argument("--bf16", action="store_true", help="decoder forward under bfloat16 autocast (loss, weights, Adam in float32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = zoo.load("darknet").eval().to(memory_format=torch.channels_last)
    pre = replace(zoo.entry("darknet").preprocessing, resize=False)
    d = load_assess_data(a.data, pre, 64, 4000, 0)
    x_test, x_train = d.x_test.float() / 255, d.x_train.float() / 255
    fwd = PointForward(m, [p.index for p in m.partition_points()])
    irs_test, _ = fwd(pre.normalise(x_test))
    shapes = {k: tuple(v.shape[1:]) for k, v in irs_test.items()}
    t0, c0 = time.perf_counter(), time.process_time()
    res = dt.train_decoders(lambda idx, upto: fwd(pre.normalise(x_train[idx]), upto=upto)[0], x_train, shapes,
                            a.steps, a.batch, a.lr, 0, workers=a.threads, width=a.width, ssim_weight=a.ssim_weight,
                            bf16=a.bf16)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    points = {}
    for k, dec in res.decoders.items():
        with torch.no_grad():
            y = dec(irs_test[k]).float()
        points[k] = (round(float(ssim(y, x_test).mean()), 4), res.info[k]["steps"])
    print(json.dumps({"variant": a.name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                      "load": [round(v, 2) for v in os.getloadavg()], "points": points}), flush=True)


if __name__ == "__main__":
    main()
