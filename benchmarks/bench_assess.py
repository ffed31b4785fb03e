"""Assess the zoo models on CIFAR-10 and print the figures (owner-side benchmark).

Run: `make bench-assess` or `python benchmarks/bench_assess.py [darknet ...] [--samples 64]`.
Writes out/bench/assess/<model>/{assessment.json,report.html}, prints a per-point table per model
and, as its LAST line, one JSON object: for each model its recommended point, the SSIM at the
first point and at the recommended point, and the wall time (the speed target: darknet with 64
samples in under 3 minutes on 2 CPU cores). Models without trained weights are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from enclaveml.assess import AssessConfig, run_assessment
from enclaveml.assess.report import render
from enclaveml.models import zoo

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"


def table(rec: dict) -> str:
    rows = [f"{'k':>3} {'layer':<10} {'IR shape':<12} {'KL delta':>9} {'uniform':>8} {'beats':>6} {'chance':>6} "
            f"{'SSIM dec':>8} {'SSIM rmle':>9} {'SSIM':>6} {'PSNR':>6} {'MFLOPs':>8} {'MiB':>7} {'ms':>7}"]
    for p in rec["points"]:
        kl, inv, c = p["kl"] or {}, p["inversion"] or {}, p["cost"]
        att = inv.get("attacks", {})
        mark = "*" if p["index"] == rec["recommended"] else " "
        rows.append(f"{p['index']:>2}{mark} {p['name']:<10} {'x'.join(map(str, p['ir_shape'])):<12} {kl.get('min', float('nan')):>9.3g} "
                    f"{kl.get('uniform', float('nan')):>8.3g} {kl.get('leak_fraction', float('nan')):>6.0%} {kl.get('chance_fraction', float('nan')):>6.0%} "
                    f"{att.get('decoder', {}).get('ssim', float('nan')):>8.3f} {att.get('rmle', {}).get('ssim', float('nan')):>9.3f} "
                    f"{inv.get('ssim', float('nan')):>6.3f} {inv.get('psnr', float('nan')):>6.1f} {c['flops'] / 1e6:>8.1f} "
                    f"{c['enclave_bytes'] / 2**20:>7.2f} {c['latency_ms']:>7.3f}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(zoo.ZOO))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "assess")
    ap.add_argument("--decoder-steps", type=int, default=AssessConfig.decoder_steps)
    ap.add_argument("--rmle-steps", type=int, default=AssessConfig.rmle_steps)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    summary = {}
    for name in a.names:
        e = zoo.entry(name)
        if not e.weights_path.exists():
            print(f"[{name}] skipped: no trained weights (run `make zoo`)", flush=True)
            continue
        model = zoo.load(name)
        pre = replace(e.preprocessing, resize=False)
        cfg = AssessConfig(samples=a.samples, decoder_steps=a.decoder_steps, rmle_steps=a.rmle_steps)
        t0 = time.perf_counter()
        res = run_assessment(model, pre, a.data, cfg, name, list(e.classes),
                             progress=lambda msg, n=name: print(f"[{n}] {msg}", file=sys.stderr, flush=True))
        wall = time.perf_counter() - t0
        rec = res.record
        out = a.out / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "assessment.json").write_text(json.dumps(rec, indent=2) + "\n")
        (out / "report.html").write_text(render(rec, res.images, res.originals))
        print(f"\n## {name}: {len(rec['points'])} points, {rec['samples']} samples, top-1 on them "
              f"{rec['sample_accuracy']:.0%}, wall {wall:.1f} s, threads {a.threads}")
        print(table(rec))
        print(f"recommended: {rec['recommended']} - {rec['recommendation']['reason']}")
        print("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rec["timings_s"].items()), flush=True)
        by_index = {p["index"]: p for p in rec["points"]}
        r = rec["recommended"]
        summary[name] = {
            "recommended": r,
            "ssim_first": round(rec["points"][0]["inversion"]["ssim"], 4),
            "ssim_recommended": round(by_index[r]["inversion"]["ssim"], 4) if r is not None else None,
            "wall_s": round(wall, 1),
        }
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
