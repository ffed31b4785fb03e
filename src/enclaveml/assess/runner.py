"""Run an assessment: every test at every candidate point, the cost, the recommendation (owner side).

Data flows one way: samples -> IRs point by point (each IR is the previous one pushed through one
more layer, so the whole sweep costs one forward pass per set) -> registered leakage tests and the
cost model -> one JSON-ready record per point -> the recommendation. Pictures for the report are
returned beside the JSON, never inside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.preprocess import Preprocessing
from ..errors import PartitionError
from ..models.layers import LayeredModel
from . import leakage
from .config import AssessConfig
from .cost import frontnet_cost
from .data import AssessData, load_assess_data
from .leakage import AssessContext, PointData
from .recommend import recommend

Progress = Callable[[str], None]


@dataclass
class Assessment:
    record: dict  # exactly what goes to assessment.json
    images: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # point -> name -> images
    originals: torch.Tensor | None = None  # test samples in [0, 1] shown beside reconstructions


def select_points(model: LayeredModel, wanted: tuple[int, ...] | None):
    points = model.partition_points()
    if wanted is None:
        return points
    by_index = {p.index: p for p in points}
    for k in wanted:
        if k not in by_index:
            raise PartitionError(f"partition point {k} is out of range: this model has points 1..{len(model) - 1}")
    return [by_index[k] for k in sorted(set(wanted))]


@torch.no_grad()
def _forward_batched(layer: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([layer(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def run_assessment(model: LayeredModel, pre: Preprocessing, data_dir: "str | Path | AssessData", config: AssessConfig,
                   model_name: str, classes: list[str] | None = None, progress: Progress | None = None,
                   override: int | None = None) -> Assessment:
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    model.eval()
    # channels-last weights: the same values, ~20% faster CPU convolutions for the oracle and the attacks
    model.to(memory_format=torch.channels_last)
    points = select_points(model, config.points)
    tests = [leakage.get(name)(config) for name in config.tests]

    say("loading data")
    t0 = time.perf_counter()
    data = data_dir if isinstance(data_dir, AssessData) else load_assess_data(
        data_dir, pre, config.samples, config.decoder_train, config.seed)
    x_test = data.x_test.float().div(255.0)
    x_train = data.x_train.float().div(255.0)
    timings["data"] = time.perf_counter() - t0

    with torch.no_grad():
        logits = _forward_batched(model, pre.normalise(x_test))
    probs = torch.softmax(logits.float(), dim=-1)
    accuracy = _sample_accuracy(logits, data.y_test, data.classes, classes)
    ctx = AssessContext(model, pre, x_test, x_train, probs, config)

    layers = list(model.layers)
    ir_test, ir_train = pre.normalise(x_test), pre.normalise(x_train)
    wanted = {p.index: p for p in points}
    records, images = [], {}
    for k in range(1, max(wanted) + 1):
        t0 = time.perf_counter()
        ir_test = _forward_batched(layers[k - 1], ir_test)
        ir_train = _forward_batched(layers[k - 1], ir_train)
        timings["forward"] = timings.get("forward", 0.0) + time.perf_counter() - t0
        if k not in wanted:
            continue
        point = wanted[k]
        front, _ = model.split(k)
        pt = PointData(point, front, ir_test, ir_train)
        rec: dict = {"index": k, "name": point.name, "ir_shape": list(point.out_shape), "kl": None,
                     "inversion": None, "cost": None}
        attacks, point_images = {}, {}
        for test in tests:
            say(f"point {k} ({point.name}): {test.name}")
            t0 = time.perf_counter()
            res = test.evaluate(ctx, pt)
            dt = time.perf_counter() - t0
            timings[test.name] = timings.get(test.name, 0.0) + dt
            res.summary["seconds"] = round(dt, 3)
            for name, img in res.images.items():
                point_images[f"{test.name}.{name}"] = img
            if test.kind == "kl":
                rec["kl"] = res.summary
            else:
                attacks[test.name] = res.summary
        if attacks:
            best = max(attacks, key=lambda a: attacks[a]["ssim"])
            rec["inversion"] = {"ssim": attacks[best]["ssim"], "psnr": attacks[best]["psnr"], "attack": best,
                                "attacks": attacks}
        say(f"point {k} ({point.name}): cost")
        t0 = time.perf_counter()
        rec["cost"] = frontnet_cost(front, model.input_shape, config.budget_bytes, config.latency_repeats)
        timings["cost"] = timings.get("cost", 0.0) + time.perf_counter() - t0
        records.append(rec)
        images[k] = point_images

    rec_choice = recommend(records, config.ssim_threshold, override)
    timings["total"] = time.perf_counter() - t_start
    record = {
        "model": model_name,
        "input_shape": list(model.input_shape),
        "classes": int(model.num_classes),
        "data": data.source,
        "samples": int(x_test.shape[0]),
        "sample_accuracy": accuracy,
        "ssim_threshold": config.ssim_threshold,
        "budget_bytes": config.budget_bytes,
        "points": records,
        "recommended": rec_choice["index"],
        "recommendation": rec_choice,
        "config": config.to_dict(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    return Assessment(record, images, x_test[: config.report_images])


def _sample_accuracy(logits: torch.Tensor, y: torch.Tensor, folder_classes: list[str],
                     model_classes: list[str] | None) -> float | None:
    """Top-1 on the test samples when the folder's labels can be matched to the model's outputs:
    same class names, or folders named by class index (ImageNet photos: `243/`, `559/`...)."""
    if folder_classes == ["unlabelled"]:
        return None
    if model_classes is not None and list(model_classes) == list(folder_classes):
        target = y
    elif model_classes is None and all(c.isdigit() for c in folder_classes):
        target = torch.tensor([int(folder_classes[int(i)]) for i in y])
    else:
        return None
    return float((logits.argmax(1) == target).float().mean())
