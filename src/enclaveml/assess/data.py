"""The assessment's samples: test inputs and the attacker's held-out set (owner side).

`--data DIR` is an image-folder root. With `train/` and `test/` splits the decoder attacker gets
(part of) `train` and the tests run on `test`; a single folder is shuffled and split, the test
samples first and the rest held out for the attacker, so the two never share an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.folder import list_image_folder, load_image_folder
from ..data.preprocess import Preprocessing
from ..errors import DataError


@dataclass
class AssessData:
    x_test: torch.Tensor  # uint8 (N, 3, H, W)
    y_test: torch.Tensor
    x_train: torch.Tensor  # uint8 (M, 3, H, W), disjoint from x_test
    classes: list[str]
    source: str  # how the split was made, for the report


def _per_class(root: Path, want: int) -> int:
    classes, _ = list_image_folder(root)
    return max(1, math.ceil(want / len(classes)))


def load_assess_data(root: str | Path, pre: Preprocessing, samples: int, train: int, seed: int = 0) -> AssessData:
    """Load `samples` test images and up to `train` held-out images, checked against `pre`."""
    try:
        return _load(Path(root), pre, samples, train, seed)
    except OSError as e:  # an unreadable folder (permissions, a broken mount): one line, not a traceback
        raise DataError(f"{root}: cannot read ({e.strerror or type(e).__name__})") from None


def _load(root: Path, pre: Preprocessing, samples: int, train: int, seed: int) -> AssessData:
    if samples < 1:
        raise DataError("--samples must be at least 1")
    gen = torch.Generator().manual_seed(seed)
    if (root / "train").is_dir() and (root / "test").is_dir():
        te = load_image_folder(root / "test", pre, limit_per_class=_per_class(root / "test", samples))
        tr = load_image_folder(root / "train", pre, limit_per_class=_per_class(root / "train", train))
        ti = torch.randperm(len(te), generator=gen)[:samples]
        ri = torch.randperm(len(tr), generator=gen)[:train]
        return AssessData(te.images[ti], te.labels[ti], tr.images[ri], te.classes,
                          f"{root}/test ({len(ti)} samples), decoder trained on {root}/train ({len(ri)} images)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    allf = load_image_folder(root, pre, limit_per_class=_per_class(root, samples + train))
    if len(allf) < 2:
        raise DataError(f"{root}: {len(allf)} image(s); the assessment needs at least 2 (test + held-out)")
    perm = torch.randperm(len(allf), generator=gen)
    n_test = min(samples, len(allf) // 2) if len(allf) < samples + 1 else samples
    ti, ri = perm[:n_test], perm[n_test:n_test + train]
    return AssessData(allf.images[ti], allf.labels[ti], allf.images[ri], allf.classes,
                      f"{root} split in {len(ti)} test samples and {len(ri)} held-out images for the decoder")
