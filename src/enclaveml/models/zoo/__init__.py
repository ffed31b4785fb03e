"""The model zoo: three CIFAR-10 architectures of different depth, with trained weights.

Trust side: owner. Names: `darknet`, `extraction`, `densenet` (after the paper's Darknet
Reference, Extraction and DenseNet). Weights live beside this package as safetensors with a
JSON card holding the measured accuracy and the command that trained them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...data.preprocess import CIFAR10_MEAN, CIFAR10_STD, Preprocessing
from ...errors import UnknownModel, UserInputError
from ..layers import LayeredModel
from . import darknet, densenet, extraction

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], LayeredModel]
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    description: str

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"

    @property
    def card_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.json"

    def card(self) -> dict:
        """The model card (accuracy, training time, command), or {} before training."""
        try:
            return json.loads(self.card_path.read_text())
        except FileNotFoundError:
            return {}


_CIFAR_PRE = Preprocessing(size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD)

ZOO: dict[str, ZooEntry] = {
    "darknet": ZooEntry("darknet", darknet.build, _CIFAR_PRE, tuple(CIFAR10_CLASSES),
                        "Darknet-Reference-like conv/max-pool stack (13 layers)"),
    "extraction": ZooEntry("extraction", extraction.build, _CIFAR_PRE, tuple(CIFAR10_CLASSES),
                           "Extraction/GoogLeNet-like stack of 1x1 and 3x3 convs (15 layers)"),
    "densenet": ZooEntry("densenet", densenet.build, _CIFAR_PRE, tuple(CIFAR10_CLASSES),
                         "DenseNet-BC, growth 12, blocks (4, 4, 4) (17 layers)"),
}


def entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownModel(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}") from None


def load(name: str, pretrained: bool = True) -> LayeredModel:
    """Build a zoo model in eval mode, with its trained weights unless `pretrained=False`."""
    e = entry(name)
    model = e.build()
    if pretrained:
        from safetensors.torch import load_file

        if not e.weights_path.exists():
            raise UserInputError(f"zoo model {name!r} has no trained weights yet: run `make zoo`")
        model.load_state_dict(load_file(str(e.weights_path)))
    return model.eval()
