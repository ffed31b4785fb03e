"""A model card: the few facts about a user's model that would otherwise be flags (owner side).

`model.json` beside the weights (or the .onnx file), read by `assess`, `partition` and `serve`:

    {"input_size": [3, 224, 224],          # or "3x224x224"
     "pixels": "0-255",                    # the scale mean/std are given in: "0-1" (default) or "0-255"
     "mean": [127, 127, 127], "std": [128, 128, 128],
     "classes": ["tench", "goldfish", ...], # or "classes_file": "classes.txt" (one name a line, beside the card)
     "factory": "mypkg.nets:build"}        # the architecture a server must allow (serve, attest policy)

Every field is optional; a flag given on the command line wins over the card. A model that takes
raw 0..255 pixels is `"pixels": "0-255", "mean": [0, 0, 0], "std": [1, 1, 1]`. Pure parsing, no
model code runs; the card is the owner's own file, still parsed strictly (one error line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserInputError

CARD_NAME = "model.json"
MAX_CARD_BYTES = 4 << 20
_FIELDS = {"input_size", "pixels", "mean", "std", "classes", "classes_file", "factory", "name", "description"}


@dataclass(frozen=True)
class ModelCard:
    """What a card says; `mean`/`std` already on the [0, 1] pixel scale enclaveml uses."""

    path: Path
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    classes: tuple[str, ...] | None = None
    factory: str | None = None

    @property
    def input_size_text(self) -> str | None:
        return "x".join(map(str, self.input_size)) if self.input_size else None


def find_card(*beside: "str | Path | None") -> Path | None:
    """`model.json` in the folder of the first given file that has one."""
    for f in beside:
        if f is None:
            continue
        p = Path(f)
        cand = (p if p.is_dir() else p.parent) / CARD_NAME
        if cand.is_file():
            return cand
    return None


def _three(v: Any, what: str, path: Path) -> tuple[float, float, float]:
    if (not isinstance(v, list) or len(v) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        raise UserInputError(f"{path}: {what} must be a list of three numbers")
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def read_card(path: "str | Path") -> ModelCard:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CARD_BYTES:
            raise UserInputError(f"{p}: a model card is at most {MAX_CARD_BYTES >> 20} MiB")
        d = json.loads(p.read_text())
    except OSError as e:
        raise UserInputError(f"{p}: cannot read model card ({e.strerror})") from None
    except ValueError as e:
        raise UserInputError(f"{p}: not a JSON model card ({e})") from None
    if not isinstance(d, dict):
        raise UserInputError(f"{p}: a model card is a JSON object")
    unknown = set(d) - _FIELDS
    if unknown:
        raise UserInputError(f"{p}: unknown model card field(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_FIELDS))})")
    size = d.get("input_size")
    if isinstance(size, str):
        from .loading import parse_input_size

        size = parse_input_size(size)
    elif size is not None:
        if not isinstance(size, list) or len(size) != 3 or not all(type(v) is int and v > 0 for v in size) or size[0] != 3:
            raise UserInputError(f"{p}: input_size must be [3, H, W] or '3xHxW'")
        size = tuple(size)
    scale = d.get("pixels", "0-1")
    if scale not in ("0-1", "0-255"):
        raise UserInputError(f"{p}: pixels must be '0-1' or '0-255'")
    div = 255.0 if scale == "0-255" else 1.0
    mean = std = None
    if ("mean" in d) != ("std" in d):
        raise UserInputError(f"{p}: mean and std go together")
    if "mean" in d:
        mean = tuple(v / div for v in _three(d["mean"], "mean", p))
        std = tuple(v / div for v in _three(d["std"], "std", p))
        if min(std) <= 0:
            raise UserInputError(f"{p}: std must be positive")
    classes = d.get("classes")
    if "classes_file" in d:
        if classes is not None or not isinstance(d["classes_file"], str):
            raise UserInputError(f"{p}: give classes or classes_file (a file name beside the card), not both")
        cf = p.parent / d["classes_file"]
        try:
            classes = [ln.strip() for ln in cf.read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise UserInputError(f"{cf}: cannot read class names ({e.strerror})") from None
    if classes is not None and (not isinstance(classes, list) or not classes
                                or not all(isinstance(c, str) for c in classes)):
        raise UserInputError(f"{p}: classes must be a non-empty list of names")
    factory = d.get("factory")
    if factory is not None:
        from .bundle import check_arch

        check_arch({"factory": factory})  # 'package.module:function' or a UserInputError
    return ModelCard(p, size, mean, std, tuple(classes) if classes is not None else None, factory)
