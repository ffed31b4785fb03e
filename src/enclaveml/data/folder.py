"""Image-folder data sets: the `{split}/{class}/*.jpg|png` layout any user already has.

Trust side: owner (assessment, zoo training) and participant (CalTrain contributions).
Decoded pixels are cached as plain `.npy` arrays (never pickles) so benchmarks need not decode
60,000 JPEGs each run.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import paths as _paths
from ..errors import DataError
from .preprocess import Preprocessing, decode_array, image_to_tensor, load_image_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ImageFolder:
    """A labelled image set as uint8 pixels (N, C, H, W) plus integer labels and file paths."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def float_images(self) -> torch.Tensor:
        """Pixels as float in [0, 1]."""
        return self.images.float().div_(255.0)

    def subset(self, idx) -> "ImageFolder":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageFolder(self.images[idx], self.labels[idx], self.classes, [self.paths[i] for i in idx.tolist()])


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and (path, label) pairs; raises `DataError` if empty."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        # A flat folder of images: one unlabelled class.
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root}: no class folders and no images (expected {root}/<class>/*.jpg|png)")
        return ["unlabelled"], [(str(p), 0) for p in files]
    samples = []
    for label, c in enumerate(classes):
        for p in sorted((root / c).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                samples.append((str(p), label))
    if not samples:
        raise DataError(f"{root}: class folders hold no .jpg/.png images")
    return classes, samples


def _cache_path(root: Path, samples, pre: Preprocessing, limit_key: str) -> Path:
    h = hashlib.sha256()
    h.update(str(root.resolve()).encode())
    h.update(repr((pre.size, pre.resize, limit_key, len(samples))).encode())
    for p, _ in samples[:: max(1, len(samples) // 64)]:
        st = os.stat(p)
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    base = _paths.cache()
    return base / "folders" / f"{h.hexdigest()[:24]}.npz"


def load_image_folder(
    root: str | os.PathLike,
    pre: Preprocessing,
    limit_per_class: int | None = None,
    cache: bool = True,
    workers: int = 4,
) -> ImageFolder:
    """Decode a whole image folder into memory with `pre`'s decoding rules (size checks included)."""
    root = Path(root)
    classes, samples = list_image_folder(root)
    if limit_per_class is not None:
        kept, seen = [], {}
        for p, y in samples:
            if seen.get(y, 0) < limit_per_class:
                kept.append((p, y))
                seen[y] = seen.get(y, 0) + 1
        samples = kept
    cpath = _cache_path(root, samples, pre, str(limit_per_class))
    if cache and cpath.exists():
        with np.load(cpath, allow_pickle=False) as z:
            return ImageFolder(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), classes, [p for p, _ in samples])

    def decode(item):
        path, _ = item
        return decode_array(load_image_bytes(path), pre, name=path)  # decode_image's pixels, faster

    with ThreadPoolExecutor(max_workers=workers) as ex:
        arrays = list(ex.map(decode, samples))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([y for _, y in samples], dtype=torch.long)
    if cache:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_suffix(".tmp.npz")
            np.savez(tmp, images=images.numpy(), labels=labels.numpy())
            os.replace(tmp, cpath)
        except OSError:
            pass  # a read-only home is fine: we just decode again next time
    return ImageFolder(images, labels, classes, [p for p, _ in samples])


def to_model_input(images_u8: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 NCHW pixels -> normalised float model input (the same maths as `Preprocessing`)."""
    return pre.normalise(images_u8.float().div(255.0))


__all__ = ["ImageFolder", "list_image_folder", "load_image_folder", "to_model_input", "image_to_tensor"]
