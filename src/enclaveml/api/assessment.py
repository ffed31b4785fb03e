"""`enclaveml.assess`: where a model can be split, as a typed result (owner side).

Runs the same assessment as `enclaveml assess` (`assess.runner.run_assessment`) and wraps its
record: the recommended point, one `PointResult` per assessed point, `to_json()` (exactly the
CLI's assessment.json) and `report(path)` (the CLI's report.html). `data` is an image-folder
root or an indexable dataset of `(image, label)` pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from ..errors import UserInputError
from .models import ModelLike

if TYPE_CHECKING:
    import torch

    from ..assess.data import AssessData
    from ..data.preprocess import Preprocessing


@dataclass(frozen=True)
class PointResult:
    """The findings at one partition point k (the FrontNet is layers 0..k-1)."""

    index: int
    name: str  # the last FrontNet layer
    ir_shape: tuple[int, ...]
    kl_leaks: bool | None  # KL test verdict (None: not run)
    ssim: float | None  # best inversion attack's mean SSIM (None: no attack run)
    psnr: float | None
    attack: str | None  # which attack reached `ssim`
    params: int
    flops: int
    enclave_bytes: int
    latency_ms: float
    fits: bool  # within the enclave memory budget
    failures: tuple[str, ...]  # why this point fails the recommendation rule (empty: it passes)
    record: Mapping[str, Any]  # the point's full record in assessment.json

    @property
    def passes(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class Recommendation:
    index: int | None  # None: no assessed point passes
    reason: str
    overridden: bool  # chosen with point=K rather than by the rule


class Assessment:
    """The result of `assess`: read it, save it as JSON, render its HTML report."""

    def __init__(self, record: Mapping[str, Any], images: "dict[int, dict[str, torch.Tensor]] | None" = None,
                 originals: "torch.Tensor | None" = None):
        from ..assess.recommend import point_verdict

        self.record: dict = json.loads(json.dumps(record))  # a private, JSON-clean copy
        self._images, self._originals = images or {}, originals
        try:
            thr = float(self.record["ssim_threshold"])
            rec = self.record["recommendation"]
            self.recommendation = Recommendation(rec["index"], str(rec["reason"]), bool(rec.get("overridden")))
            self.points: list[PointResult] = [_point(p, point_verdict(p, thr)) for p in self.record["points"]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserInputError(f"not an assessment record ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Assessment":
        """An assessment.json written by `enclaveml assess` or `Assessment.save` (no pictures)."""
        from ..models.choose import read_assessment

        return cls(read_assessment(path))

    @property
    def model(self) -> str:
        return str(self.record["model"])

    @property
    def recommended(self) -> int | None:
        """The partition point to use (`partition(..., assessment=this)` defaults to it)."""
        return self.recommendation.index

    @property
    def sample_accuracy(self) -> float | None:
        return self.record.get("sample_accuracy")

    def point(self, k: int) -> PointResult:
        for p in self.points:
            if p.index == k:
                return p
        raise UserInputError(f"point {k} was not assessed; assessed points: {[p.index for p in self.points]}")

    def __iter__(self) -> Iterator[PointResult]:
        return iter(self.points)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.record))

    def to_json(self, indent: int | None = 2) -> str:
        """Exactly what `enclaveml assess` writes to assessment.json."""
        return json.dumps(self.record, indent=indent)

    def save(self, path: "str | os.PathLike[str]") -> Path:
        """Write assessment.json (a file, or a folder that gets assessment.json); returns the file."""
        p = _target(path, "assessment.json")
        p.write_text(self.to_json() + "\n")
        return p

    def report(self, path: "str | os.PathLike[str]") -> Path:
        """Write the HTML report (a file, or a folder that gets report.html); returns the file.

        An assessment loaded from JSON has no pictures: its report shows the tables and charts only.
        """
        from ..assess.report import render

        p = _target(path, "report.html")
        p.write_text(render(self.record, self._images, self._originals))
        return p

    def __repr__(self) -> str:
        return f"Assessment(model={self.model!r}, recommended={self.recommended}, points={[p.index for p in self.points]})"


def _target(path: "str | os.PathLike[str]", default_name: str) -> Path:
    p = Path(path)
    if p.is_dir() or not p.suffix:
        p = p / default_name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _point(p: Mapping[str, Any], failures: list[str]) -> PointResult:
    kl, inv, cost = p.get("kl") or {}, p.get("inversion") or {}, p.get("cost") or {}
    return PointResult(
        index=int(p["index"]), name=str(p["name"]), ir_shape=tuple(int(v) for v in p["ir_shape"]),
        kl_leaks=None if not kl else bool(kl.get("leaks")), ssim=_opt_float(inv.get("ssim")),
        psnr=_opt_float(inv.get("psnr")), attack=inv.get("attack"), params=int(cost.get("params", 0)),
        flops=int(cost.get("flops", 0)), enclave_bytes=int(cost.get("enclave_bytes", 0)),
        latency_ms=float(cost.get("latency_ms", 0.0)), fits=bool(cost.get("fits", True)),
        failures=tuple(failures), record=p)


# ---------------------------------------------------------------------------- data sets

def _to_uint8_chw(img: Any, pre: "Preprocessing") -> "torch.Tensor":
    """One dataset image (PIL image, CxHxW tensor, HxWxC uint8 array, encoded bytes) as uint8 CxHxW.

    Another size is an error unless `pre.resize`; then it is resized as the enclave resizes a
    photo (`decode_array`, the enclave's decoder and centre crop), so that the assessment sees what
    serving will see.
    """
    import numpy as np
    import torch

    from ..data.preprocess import decode_array

    if isinstance(img, (bytes, bytearray, memoryview)):
        return torch.from_numpy(np.array(decode_array(img, pre), dtype=np.uint8)).permute(2, 0, 1)
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dtype.is_floating_point:
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise UserInputError(f"a dataset image tensor of dtype {t.dtype}: expected uint8 or float in [0, 1]")
        if t.dim() != 3 or t.shape[0] != 3:
            raise UserInputError(f"a dataset image tensor of shape {tuple(t.shape)}: expected (3, H, W)")
    else:
        if hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image
            img = np.asarray(img.convert("RGB"))
        a = np.asarray(img)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise UserInputError(f"a dataset image of shape {a.shape} and dtype {a.dtype}: expected an RGB "
                                 "PIL image, a (3, H, W) tensor or an (H, W, 3) uint8 array")
        t = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    if tuple(t.shape[1:]) != tuple(pre.size):
        if not pre.resize:
            raise UserInputError(f"a dataset image of size {tuple(t.shape[1:])}: the model takes {tuple(pre.size)} "
                                 "(pass resize=True to resize)")
        from .images import to_image_bytes

        return _to_uint8_chw(to_image_bytes(t), pre)
    return t


def dataset_data(dataset: Any, pre: "Preprocessing", samples: int, train: int, seed: int) -> "AssessData":
    """An indexable dataset of (image, label) split like one image folder: test samples first, the
    rest held out for the decoder attacker, never sharing an image."""
    import torch

    from ..assess.data import AssessData

    try:
        n = len(dataset)
    except TypeError:
        raise UserInputError("data= must be an image-folder path or a dataset with len() and [i]") from None
    if n < 2:
        raise UserInputError(f"the dataset has {n} item(s); the assessment needs at least 2 (test + held-out)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(samples, n // 2) if n < samples + 1 else samples
    xs, ys = [], []
    for i in perm[: n_test + train]:
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UserInputError("each dataset item must be an (image, label) pair")
        xs.append(_to_uint8_chw(item[0], pre))
        ys.append(int(item[1]))
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    names = getattr(dataset, "classes", None)
    classes = [str(c) for c in names] if names is not None else [str(i) for i in range(int(y.max()) + 1)]
    return AssessData(x[:n_test], y[:n_test], x[n_test:], classes,
                      f"{type(dataset).__name__} of {n} items split in {n_test} test samples and "
                      f"{len(xs) - n_test} held-out images for the decoder")


# ---------------------------------------------------------------------------- assess

def assess(model: ModelLike, data: "str | os.PathLike[str] | Any", *, samples: int = 64,
           out: "str | os.PathLike[str] | None" = None, points: Sequence[int] | None = None,
           point: int | None = None, tests: Sequence[str] = ("kl", "decoder", "rmle"),
           ssim_threshold: float = 0.3, kl_tolerance: float = 0.1, budget_mb: float = 93.0,
           decoder_steps: int = 200, decoder_train: int = 4000, decoder_batch: int = 32,
           rmle_steps: int = 150, rmle_samples: int = 8, seed: int = 0,
           progress: Callable[[str], None] | None = None, name: str | None = None,
           weights: "str | os.PathLike[str] | None" = None, input_shape: Sequence[int] | None = None,
           classes: Sequence[str] | None = None, preprocessing: Any = None, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, resize: bool = False, pretrained: bool = True) -> Assessment:
    """Assess every candidate partition point of `model` (or `points`) on `data`.

    The keyword arguments are `enclaveml assess`'s flags, with its defaults. `point=K` overrides
    the recommendation. With `out`, assessment.json and report.html are written there as the CLI
    does. `progress` gets one line per step. Returns the `Assessment`.
    """
    from ..assess import leakage
    from ..assess.config import AssessConfig
    from ..assess.data import load_assess_data
    from ..assess.runner import run_assessment, select_points
    from .models import resolve_model

    if samples < 1:
        raise UserInputError("samples must be at least 1")
    if budget_mb <= 0 or not 0 < ssim_threshold < 1:
        raise UserInputError("budget_mb must be positive and ssim_threshold between 0 and 1")
    test_names = tuple(tests)
    for t in test_names:
        leakage.get(t)
    r = resolve_model(model, name=name, weights=weights, input_shape=input_shape, classes=classes,
                      preprocessing=preprocessing, mean=mean, std=std, resize=resize, pretrained=pretrained)
    cfg = AssessConfig(samples=samples, points=tuple(int(p) for p in points) if points is not None else None,
                       tests=test_names, ssim_threshold=ssim_threshold, kl_tolerance=kl_tolerance,
                       budget_bytes=int(budget_mb * 2**20), decoder_steps=decoder_steps, decoder_train=decoder_train,
                       decoder_batch=decoder_batch, rmle_steps=rmle_steps, rmle_samples=rmle_samples, seed=seed)
    selected = [p.index for p in select_points(r.model, cfg.points)]
    if point is not None and point not in selected:
        r.model.check_point(point)  # out of range: PartitionError naming the model's range
        raise UserInputError(f"point={point} is not among the assessed points {selected}")
    if isinstance(data, (str, os.PathLike)):
        assess_data = load_assess_data(data, r.preprocessing, cfg.samples, cfg.decoder_train, cfg.seed)
    else:
        assess_data = dataset_data(data, r.preprocessing, cfg.samples, cfg.decoder_train, cfg.seed)
    result = run_assessment(r.model, r.preprocessing, assess_data, cfg, r.name, r.classes, progress=progress,
                            override=point)
    a = Assessment(result.record, result.images, result.originals)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        a.save(Path(out) / "assessment.json")
        a.report(Path(out) / "report.html")
    return a
