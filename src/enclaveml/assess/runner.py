"""Run an assessment: every test at every candidate point, the cost, the recommendation (owner side).

Data flows one way: samples -> one forward pass of the model per batch, which yields the IR at
every assessed point and the logits (assess/forward.py) -> each registered leakage test prepares
what it shares across points (the decoders of all points train together on shared forward
batches) and evaluates each point -> the cost model -> one JSON-ready record per point -> the
recommendation. Every phase's wall and process CPU time is recorded (`time_breakdown`), so the
record says where the time went. Pictures for the report are returned beside the JSON, never
inside it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data.preprocess import Preprocessing
from ..errors import PartitionError
from ..models.layers import LayeredModel
from . import leakage
from .config import AssessConfig
from .cost import frontnet_cost
from .data import AssessData, load_assess_data
from .forward import PointForward
from .inference import folded_layers
from .leakage import AssessContext, PointData
from .memory import keep_freed_memory
from .recommend import recommend
from .threads import Account, charging, shared_cores

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


class PhaseClock:
    """Wall and process CPU seconds per named phase (CPU time counts every thread of the process)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def record(self, name: str, wall: float, cpu: float) -> None:
        """A phase measured by its own thread (tests that run at once: their CPU from `threads.Account`)."""
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def breakdown(self) -> dict:
        """{phase: {wall_s, cpu_s, share}} plus `total`; `share` is the phase's part of the total wall time."""
        total_w, total_c = time.perf_counter() - self._wall0, time.process_time() - self._cpu0
        out = {k: {"wall_s": round(v, 3), "cpu_s": round(self.cpu[k], 3), "share": round(v / max(total_w, 1e-9), 4)}
               for k, v in self.wall.items()}
        out["total"] = {"wall_s": round(total_w, 3), "cpu_s": round(total_c, 3), "share": 1.0}
        return out


def run_assessment(model: LayeredModel, pre: Preprocessing, data_dir: "str | Path | AssessData", config: AssessConfig,
                   model_name: str, classes: list[str] | None = None, progress: Progress | None = None,
                   override: int | None = None) -> Assessment:
    say = progress or (lambda _msg: None)
    clock = PhaseClock()
    load_start = _load_average()
    keep_freed_memory()  # large inputs: no page faults on every layer's output (assess/memory.py)
    model.eval()
    # channels-last weights: the same values, ~20% faster CPU convolutions for the oracle and the attacks
    model.to(memory_format=torch.channels_last)
    points = select_points(model, config.points)
    tests = [leakage.get(name)(config) for name in config.tests]

    say("loading data")
    with clock.phase("data"):
        data = data_dir if isinstance(data_dir, AssessData) else load_assess_data(
            data_dir, pre, config.samples, config.decoder_train, config.seed)
        x_test = data.x_test.float().div(255.0)
        x_train = data.x_train.float().div(255.0)

    say("forward pass: IRs at every point")
    with clock.phase("forward"):
        forward = PointForward(model, [p.index for p in points])
        # one pass yields every point's IR and the logits; every test reuses these
        irs_test, logits = forward.batched(pre.normalise(x_test), logits=True)
        probs = torch.softmax(logits.float(), dim=-1)
        pds = [PointData(p, model.split(p.index)[0], irs_test[p.index]) for p in points]
        # batch-norm-folded inference copy: the KL oracle, and rMLE's FrontNets (its prefixes)
        oracle = folded_layers(model, tuple(model.input_shape))
    accuracy = _sample_accuracy(logits, data.y_test, data.classes, classes)
    ctx = AssessContext(model, pre, x_test, x_train, probs, config, forward=forward, oracle=oracle,
                        workers=max(1, torch.get_num_threads()))

    # every test at once, its shared work and then every point, on one pool of single-threaded cores
    # (assess/threads.py): where one test cannot fill the cores, another's items do
    with clock.phase("tests"):
        found = _run_tests(tests, ctx, pds, say, clock)

    records, images = [], {}
    for pt in pds:
        point, k = pt.point, pt.point.index
        rec: dict = {"index": k, "name": point.name, "ir_shape": list(point.out_shape), "kl": None,
                     "inversion": None, "cost": None}
        attacks, point_images = {}, {}
        for test in tests:
            res = found[test.name][k]
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
        with clock.phase("cost"):
            rec["cost"] = frontnet_cost(pt.front, model.input_shape, config.budget_bytes, config.latency_repeats)
        records.append(rec)
        images[k] = point_images

    rec_choice = recommend(records, config.ssim_threshold, override)
    breakdown = clock.breakdown()
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
        "timings_s": {k: v["wall_s"] for k, v in breakdown.items()},
        "time_breakdown": breakdown,
        "torch_threads": torch.get_num_threads(),
        "load_average": {"start": load_start, "end": _load_average()},
    }
    return Assessment(record, images, x_test[: config.report_images])


def _run_tests(tests: list, ctx: AssessContext, pds: list[PointData], say: Progress, clock: PhaseClock
               ) -> dict[str, dict[int, leakage.LeakageResult]]:
    """{test: {point: result}}: each test's `prepare` then its `evaluate` at every point, in order, the
    tests side by side (one thread each, all sending their compute to one shared pool of cores). Each
    test's wall span and CPU seconds (its thread's plus its pool items') go to `clock`."""
    found: dict[str, dict[int, leakage.LeakageResult]] = {t.name: {} for t in tests}
    spent: dict[str, tuple[float, float]] = {}

    def one(test) -> None:
        account, w0, c0 = Account(test.pool_priority), time.perf_counter(), time.thread_time()
        with charging(account):
            say(f"{test.name}: shared work for all points")
            test.prepare(ctx, pds)
            for pt in pds:
                say(f"point {pt.point.index} ({pt.point.name}): {test.name}")
                t0 = time.perf_counter()
                res = test.evaluate(ctx, pt)
                res.summary["seconds"] = round(time.perf_counter() - t0, 3)
                found[test.name][pt.point.index] = res
        spent[test.name] = (time.perf_counter() - w0, time.thread_time() - c0 + account.items_cpu)

    if len(tests) < 2:
        for test in tests:
            one(test)
    else:
        with shared_cores(ctx.cores()), ThreadPoolExecutor(max_workers=len(tests), thread_name_prefix="assess-test") as ex:
            for f in [ex.submit(one, t) for t in tests]:
                f.result()  # a test's error propagates here
    for test in tests:  # in the tests' order, whichever finished first
        clock.record(test.name, *spent[test.name])
    return found


def _load_average() -> list[float] | None:
    """The host's 1/5/15-minute load averages: timings mean little without them on a shared machine."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


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
