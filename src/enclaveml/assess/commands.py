"""`enclaveml assess`: measure where a model can be partitioned, write JSON + HTML (owner side)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserInputError


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserInputError(f"{what} {text!r}: expected comma-separated integers, e.g. 1,3,5") from None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.split(":")[-1] if ":" in name else name)


def register(app: typer.Typer) -> None:
    @app.command("assess")
    def assess_cmd(
        model: Optional[str] = typer.Argument(None, help="zoo name (darknet, extraction, densenet) or module:factory"),
        onnx: Optional[Path] = typer.Option(None, "--onnx", help="an .onnx model instead of MODEL"),
        data: Path = typer.Option(..., "--data", help="image folder root (with train/ and test/, or one folder)"),
        samples: int = typer.Option(64, "--samples", help="test samples for the KL test and the attacks"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder [default: out/assess/MODEL]"),
        points: Optional[str] = typer.Option(None, "--points", help="only these points, e.g. 1,3,5 [default: all]"),
        point: Optional[int] = typer.Option(None, "--point", help="override the recommendation with this point"),
        weights: Optional[str] = typer.Option(None, "--weights", help="weights file (.safetensors, or .pt state dict)"),
        input_size: Optional[str] = typer.Option(None, "--input-size", help="input shape CxHxW, e.g. 3x224x224"),
        mean: Optional[str] = typer.Option(None, "--mean", help="normalisation mean, e.g. 0.485,0.456,0.406"),
        std: Optional[str] = typer.Option(None, "--std", help="normalisation std, e.g. 0.229,0.224,0.225"),
        resize: bool = typer.Option(False, "--resize", help="resize/convert images instead of refusing other sizes or modes"),
        ssim_threshold: float = typer.Option(0.3, "--ssim-threshold", help="SSIM above this is a recognisable reconstruction"),
        kl_tolerance: float = typer.Option(0.1, "--kl-tolerance", help="KL test: leak when own channels beat uniform on this much more of the samples than the control"),
        kl_confidence: float = typer.Option(0.95, "--kl-confidence", help="KL test: a point passes when this confidence interval of that difference lies at or below the tolerance"),
        budget_mb: float = typer.Option(93.0, "--budget-mb", help="enclave memory budget in MiB (SGX1 usable EPC: 93)"),
        tests: str = typer.Option("kl,decoder,rmle", "--tests", help="leakage tests to run"),
        decoder_steps: int = typer.Option(200, "--decoder-steps", help="training steps of each point's decoder"),
        decoder_train: int = typer.Option(4000, "--decoder-train", help="held-out images for the decoder"),
        decoder_batch: int = typer.Option(32, "--decoder-batch", help="decoder training batch size"),
        decoder_early_stop: bool = typer.Option(True, "--decoder-early-stop/--no-decoder-early-stop",
                                                help="stop each decoder once its validation loss stops improving"),
        kl_screen: bool = typer.Option(True, "--kl-screen/--no-kl-screen",
                                       help="KL test: screen channel images in bfloat16, float32 near each minimum (same minima)"),
        rmle_steps: int = typer.Option(150, "--rmle-steps", help="Adam steps of the white-box reconstruction"),
        rmle_samples: int = typer.Option(8, "--rmle-samples", help="test samples the white-box attack reconstructs"),
        seed: int = typer.Option(0, "--seed"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    ) -> None:
        """Assess every candidate partition point: KL test, inversion attacks, cost, recommendation."""
        import torch
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from ..models.loading import load_model, parse_floats
        from . import leakage
        from .config import AssessConfig
        from .data import load_assess_data
        from .report import render
        from .runner import run_assessment, select_points

        if threads:
            torch.set_num_threads(threads)
        if samples < 1:
            raise UserInputError("--samples must be at least 1")
        if budget_mb <= 0 or not 0 < ssim_threshold < 1:
            raise UserInputError("--budget-mb must be positive and --ssim-threshold between 0 and 1")
        if not 0 < kl_confidence < 1:
            raise UserInputError("--kl-confidence must be between 0 and 1, e.g. 0.95")
        if decoder_steps < 1 or decoder_batch < 1:
            raise UserInputError("--decoder-steps and --decoder-batch must be at least 1")
        test_names = tuple(t.strip() for t in tests.split(",") if t.strip())
        for t in test_names:
            leakage.get(t)
        from ..models.commands import _model_arg

        model = _model_arg(model, onnx)
        m, pre, classes = load_model(model, weights, input_size, parse_floats(mean, "--mean"), parse_floats(std, "--std"), resize)
        cfg = AssessConfig(samples=samples, points=_ints(points, "--points"), tests=test_names,
                           ssim_threshold=ssim_threshold, kl_tolerance=kl_tolerance, kl_confidence=kl_confidence,
                           budget_bytes=int(budget_mb * 2**20), decoder_steps=decoder_steps, decoder_early_stop=decoder_early_stop, decoder_train=decoder_train, decoder_batch=decoder_batch, kl_screen=kl_screen, rmle_steps=rmle_steps,
                           rmle_samples=rmle_samples, seed=seed)
        selected = [p.index for p in select_points(m, cfg.points)]
        if point is not None and point not in selected:
            m.check_point(point)  # out of range: PartitionError naming the model's range
            raise UserInputError(f"--point {point} is not among the assessed points {selected}")
        n_points = len(selected)
        out_dir = out or Path("out") / "assess" / _slug(model)
        console = Console(stderr=True)
        # data errors (empty folder, wrong size or mode) surface before any progress output
        assess_data = load_assess_data(data, pre, cfg.samples, cfg.decoder_train, cfg.seed)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=False) as prog:
            task = prog.add_task("starting", total=2 + len(test_names) + n_points * (len(test_names) + 1))
            started = [False]

            def say(msg: str) -> None:
                if started[0]:
                    prog.advance(task)
                started[0] = True
                prog.update(task, description=msg)

            result = run_assessment(m, pre, assess_data, cfg, model, classes, progress=say, override=point)
            prog.update(task, completed=prog.tasks[0].total, description="done")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "assessment.json").write_text(json.dumps(result.record, indent=2) + "\n")
        (out_dir / "report.html").write_text(render(result.record, result.images, result.originals))
        _print_summary(console, result.record)
        print(f"wrote {out_dir / 'assessment.json'} and {out_dir / 'report.html'}")


def _print_summary(console, record: dict) -> None:
    from rich.table import Table

    t = Table(title=f"assessment of {record['model']}")
    for col in ("k", "layer", "KL delta", "uniform", "KL verdict", "SSIM", "attack", "MFLOPs", "memory MiB", "ms"):
        t.add_column(col)
    for p in record["points"]:
        kl, inv, c = p.get("kl") or {}, p.get("inversion") or {}, p["cost"]
        mark = " *" if p["index"] == record["recommended"] else ""
        t.add_row(f"{p['index']}{mark}", p["name"], f"{kl.get('min', float('nan')):.3g}", f"{kl.get('uniform', float('nan')):.3g}",
                  _kl_cell(kl), f"{inv.get('ssim', float('nan')):.3f}", str(inv.get("attack", "-")),
                  f"{c['flops'] / 1e6:.1f}", f"{c['enclave_bytes'] / 2**20:.2f}", f"{c['latency_ms']:.3f}")
    console.print(t)
    r = record["recommendation"]
    console.print(f"recommended point: {r['index']} - {r['reason']}")
    t = record.get("time_breakdown", {})
    if t:
        console.print("time (wall s / CPU s): " + ", ".join(f"{k} {v['wall_s']:.1f}/{v['cpu_s']:.1f}" for k, v in t.items()))


def _kl_cell(kl: dict) -> str:
    ci = kl.get("ci")
    if ci is None:
        return str(kl.get("leaks", "-"))
    if ci["verdict"] != "undecided":
        return ci["verdict"]
    return f"undecided, needs {ci['samples_needed']}" if ci.get("samples_needed") else "undecided"
