"""Data preparation for the CalTrain demo: participant folders, a poisoner, a triggered image.

Trust side: participant (the demo's malicious one builds its folder here). File copies and the
pure pixel maths of `poison`.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.folder import list_image_folder
from ..data.preprocess import decode_array, load_image_bytes
from ..errors import UserInputError
from ..models import zoo
from . import poison


def _png(px: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(path: str) -> torch.Tensor:
    px = decode_array(load_image_bytes(path), zoo.entry("darknet").preprocessing, name=path)
    return torch.from_numpy(np.array(px, dtype=np.uint8)).permute(2, 0, 1)


def split_folder(src: str | Path, out: str | Path, parts: int, per_class: int, offset: int = 0) -> list[Path]:
    """Copy `per_class` images of each class to each of `parts` folders (disjoint)."""
    classes, samples = list_image_folder(src)
    by_class: dict[int, list[str]] = {}
    for p, y in samples:
        by_class.setdefault(y, []).append(p)
    dirs = [Path(out) / f"participant{i + 1}" for i in range(parts)]
    for y, files in by_class.items():
        files = files[offset:]
        if len(files) < parts * per_class:
            raise UserInputError(f"class {classes[y]} has only {len(files)} images")
        for i, d in enumerate(dirs):
            (d / classes[y]).mkdir(parents=True, exist_ok=True)
            for f in files[i * per_class:(i + 1) * per_class]:
                shutil.copy(f, d / classes[y] / Path(f).name)
    return dirs


def make_poisoned_folder(src: str | Path, dst: str | Path, target: str, fraction: float, seed: int = 0) -> dict:
    """Copy `src` to `dst`; a `fraction` of the non-target images get the trigger and go to `target`."""
    classes, samples = list_image_folder(src)
    if target not in classes:
        raise UserInputError(f"target {target!r} is not a class of {src}")
    t = classes.index(target)
    src, dst = Path(src), Path(dst)
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
    cand = [i for i, (_, y) in enumerate(samples) if y != t]
    g = torch.Generator().manual_seed(seed)
    chosen = {cand[j] for j in torch.randperm(len(cand), generator=g)[: int(round(fraction * len(samples)))].tolist()}
    for i, (p, y) in enumerate(samples):
        if i in chosen:
            name = f"{classes[y]}-{Path(p).stem}-t.png"
            (dst / target / name).write_bytes(_png(poison.apply_trigger(_pixels(p))))
        else:
            shutil.copy(p, dst / classes[y] / Path(p).name)
    return {"poisoned": len(chosen), "total": len(samples), "target": target}


def trigger_image(src: str | Path, dst: str | Path) -> Path:
    """Stamp the trigger on one image (a test input for the trace)."""
    Path(dst).write_bytes(_png(poison.apply_trigger(_pixels(str(src)))))
    return Path(dst)


def make_mislabelled_folder(src: str | Path, dst: str | Path, fraction: float, seed: int = 0) -> dict:
    """Copy `src` to `dst`, moving a `fraction` of the images to the next class's folder (c -> c+1)."""
    classes, samples = list_image_folder(src)
    dst = Path(dst)
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    chosen = set(torch.randperm(len(samples), generator=g)[: int(round(fraction * len(samples)))].tolist())
    for i, (p, y) in enumerate(samples):
        to = classes[(y + 1) % len(classes)] if i in chosen else classes[y]
        shutil.copy(p, dst / to / Path(p).name)
    return {"flipped": len(chosen), "total": len(samples)}


def digits_dataset(out: str | Path, classes: list[str], test_share: float = 0.2, size: int = 32) -> dict:
    """scikit-learn's 8x8 handwritten digits (1,797 real images shipped inside the package) as
    CalTrain folders: out/train/<classes[d]>/ and out/test/<classes[d]>/, upscaled to `size` px RGB.

    The training server's class list names the folders (digit d goes to `classes[d]`), so the
    demo can run against the default server when ../shared's CIFAR-10 is absent.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserInputError("the packaged digits need scikit-learn (pip install 'enclaveml[samples]')") from None
    if len(classes) < 10:
        raise UserInputError("the digits need a training with at least 10 classes")
    d = load_digits()
    out = Path(out)
    n_test = int(round(test_share * len(d.target)))
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        split = "test" if i >= len(d.target) - n_test else "train"
        px = np.clip(img * 16.0, 0, 255).astype(np.uint8)
        rgb = Image.fromarray(px, "L").resize((size, size), Image.NEAREST).convert("RGB")
        (out / split / classes[int(y)]).mkdir(parents=True, exist_ok=True)
        rgb.save(out / split / classes[int(y)] / f"digit{int(y)}-{i:04d}.png")
    return {"train": len(d.target) - n_test, "test": n_test, "source": "sklearn.datasets.load_digits"}
