"""Assess models and print the figures, with where the time went (owner-side benchmark).

Run: `make bench-assess` or `python benchmarks/bench_assess.py [darknet ...] [--samples 64]`.
Models: the zoo's (CIFAR-10; skipped without trained weights), `cnn26` (a 26-point user CNN,
benchmarks/user_cnn.py, CIFAR-10) and `lite0` (EfficientNet-Lite0 at 224x224 on the packaged
ImageNet photos). Writes out/bench/assess/<model>/{assessment.json,report.html}, prints per model a
per-point table, the KL verdicts with their confidence intervals, the per-phase wall and process
CPU seconds and the load average, and with `--baseline DIR` (a folder of earlier
<model>/assessment.json, e.g. from main's code) the SSIM of every point against that run's. The
LAST line is one JSON object: per model the recommended point, SSIM at the first and recommended
points, wall and CPU seconds, and the largest SSIM change against the baseline. Speed targets on 2
cores: darknet (64 samples) < 60 s, cnn26 (16 samples) < 2 min, lite0 (16 samples) < 10 min; the
SSIM curve within 0.05 of the baseline's at every point.
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
EXTRA = ("cnn26", "lite0")  # user models: not in the zoo, named here


def load(name: str, data: Path):
    """(model, preprocessing, classes or None, data folder) for a zoo name or one of EXTRA."""
    from enclaveml.models.loading import load_model

    if name == "cnn26":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        m, pre, classes = load_model("user_cnn:cnn26")
        return m, pre, classes, data
    if name == "lite0":
        from enclaveml.data.packaged import packaged_imagefolder

        m, pre, classes = load_model("enclaveml.models.efficientnet:lite0", input_size="3x224x224", resize=True)
        return m, pre, classes, Path(packaged_imagefolder("foolbox-imagenet"))
    e = zoo.entry(name)
    return zoo.load(name), replace(e.preprocessing, resize=False), list(e.classes), data


def compare(rec: dict, base: dict) -> tuple[str, float]:
    """Per-point SSIM now vs the baseline record (strongest attack, decoder, rMLE) and the largest |change|."""
    old = {p["index"]: p for p in base["points"]}
    rows = [f"{'k':>3} {'SSIM base':>9} {'SSIM now':>8} {'change':>7} {'dec base':>8} {'dec now':>7} {'rmle base':>9} "
            f"{'rmle now':>8} {'dec steps':>9}"]
    worst = 0.0
    for p in rec["points"]:
        q = old.get(p["index"])
        if q is None or not p.get("inversion") or not q.get("inversion"):
            continue
        a, b = p["inversion"]["attacks"], q["inversion"]["attacks"]
        d = p["inversion"]["ssim"] - q["inversion"]["ssim"]
        worst = max(worst, abs(d))
        g = lambda r, t: r.get(t, {}).get("ssim", float("nan"))  # noqa: E731
        rows.append(f"{p['index']:>3} {q['inversion']['ssim']:>9.3f} {p['inversion']['ssim']:>8.3f} {d:>+7.3f} "
                    f"{g(b, 'decoder'):>8.3f} {g(a, 'decoder'):>7.3f} {g(b, 'rmle'):>9.3f} {g(a, 'rmle'):>8.3f} "
                    f"{a.get('decoder', {}).get('steps', '-'):>9}")
    return "\n".join(rows), worst


def kl_table(rec: dict) -> str:
    rows = [f"{'k':>3} {'own':>5} {'ctrl':>5} {'diff':>6} {'95% CI':>15} {'verdict':>10} {'samples needed':>14}"]
    for p in rec["points"]:
        ci = (p.get("kl") or {}).get("ci")
        if ci:
            rows.append(f"{p['index']:>3} {p['kl']['leak_fraction']:>5.0%} {p['kl']['chance_fraction']:>5.0%} "
                        f"{ci['difference']:>+6.2f} {ci['lower']:>+7.2f}..{ci['upper']:>+5.2f} {ci['verdict']:>10} "
                        f"{str(ci['samples_needed']):>14}")
    return "\n".join(rows)


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
    ap.add_argument("--baseline", type=Path, default=None, help="folder of <model>/assessment.json to compare SSIM with")
    ap.add_argument("--decoder-steps", type=int, default=AssessConfig.decoder_steps)
    ap.add_argument("--rmle-steps", type=int, default=AssessConfig.rmle_steps)
    ap.add_argument("--no-early-stop", action="store_true", help="train every decoder for the whole step budget")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    summary = {}
    for name in a.names:
        if name not in EXTRA and not zoo.entry(name).weights_path.exists():
            print(f"[{name}] skipped: no trained weights (run `make zoo`)", flush=True)
            continue
        model, pre, classes, data = load(name, a.data)
        cfg = AssessConfig(samples=a.samples, decoder_steps=a.decoder_steps, rmle_steps=a.rmle_steps,
                           decoder_early_stop=not a.no_early_stop)
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_assessment(model, pre, data, cfg, name, classes,
                             progress=lambda msg, n=name: print(f"[{n}] {msg}", file=sys.stderr, flush=True))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rec = res.record
        out = a.out / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "assessment.json").write_text(json.dumps(rec, indent=2) + "\n")
        (out / "report.html").write_text(render(rec, res.images, res.originals))
        acc = rec["sample_accuracy"]
        print(f"\n## {name}: {len(rec['points'])} points, {rec['samples']} samples, top-1 on them "
              f"{'-' if acc is None else f'{acc:.0%}'}, wall {wall:.1f} s, CPU {cpu:.1f} s, threads {a.threads}, "
              f"load average {rec['load_average']['start']} -> {rec['load_average']['end']}")
        print(table(rec))
        print(f"recommended: {rec['recommended']} - {rec['recommendation']['reason']}")
        print("KL verdicts:\n" + kl_table(rec))
        print("time (wall s / CPU s / share of wall): " + ", ".join(
            f"{k} {v['wall_s']:.1f}/{v['cpu_s']:.1f}/{v['share']:.0%}" for k, v in rec["time_breakdown"].items()), flush=True)
        by_index = {p["index"]: p for p in rec["points"]}
        r = rec["recommended"]
        summary[name] = {
            "recommended": r,
            "ssim_first": round(rec["points"][0]["inversion"]["ssim"], 4),
            "ssim_recommended": round(by_index[r]["inversion"]["ssim"], 4) if r is not None else None,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "phases_cpu_s": {k: v["cpu_s"] for k, v in rec["time_breakdown"].items()},
            "load_average": rec["load_average"],
        }
        base_path = a.baseline / name / "assessment.json" if a.baseline else None
        if base_path is not None and base_path.exists():
            base = json.loads(base_path.read_text())
            text, worst = compare(rec, base)
            print(f"SSIM against the baseline ({base_path}):\n{text}\nlargest |change| {worst:.3f} "
                  f"({'within' if worst <= 0.05 else 'OUTSIDE'} 0.05); baseline recommended {base['recommended']}", flush=True)
            summary[name]["ssim_max_change"] = round(worst, 4)
            summary[name]["baseline_recommended"] = base["recommended"]
            bt = base.get("time_breakdown")
            if bt:
                summary[name]["cpu_ratio_vs_baseline"] = {k: round(v["cpu_s"] / bt[k]["cpu_s"], 3)
                                                          for k, v in rec["time_breakdown"].items()
                                                          if k in bt and bt[k]["cpu_s"] > 0}
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
