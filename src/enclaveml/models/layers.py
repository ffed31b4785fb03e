"""A model as an ordered list of named layers, and its split into FrontNet and BackNet.

Trust side: owner (pure model maths, no I/O). Partition point k means: layers[0:k] form the
FrontNet (runs in the enclave), layers[k:] the BackNet (runs on the host). Candidate points are
1..n-1, every boundary between two layers; for residual or dense models a "layer" is a whole
block, so every boundary is a place where the whole state of the computation is one tensor.
A model with its own `forward()` becomes a LayeredModel whose layers are the stages of its traced
graph between such places (`models/graph.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import PartitionError


@dataclass(frozen=True)
class PartitionPoint:
    """Boundary after layer `index - 1`: the FrontNet holds `index` layers."""

    index: int
    name: str  # name of the last FrontNet layer
    out_shape: tuple[int, ...]  # IR shape for one input, without the batch dimension


class LayeredModel(nn.Module):
    """An `nn.Module` that is a sequence of named layers with known input shape and classes."""

    def __init__(self, layers: "Sequence[tuple[str, nn.Module]] | OrderedDict[str, nn.Module]",
                 input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        items = list(layers.items()) if isinstance(layers, dict) else list(layers)
        if len(items) < 2:
            raise PartitionError("a model needs at least two layers to be partitioned")
        self.layers = nn.Sequential(OrderedDict(items))
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)

    @classmethod
    def from_sequential(cls, seq: "nn.Sequential | Iterable[nn.Module]", input_shape, num_classes: int) -> "LayeredModel":
        """Wrap a user's `nn.Sequential` (names kept) or plain list of blocks (named layer0...)."""
        if isinstance(seq, LayeredModel):
            return seq
        if isinstance(seq, nn.Sequential):
            items = list(seq.named_children())
        else:
            items = [(f"layer{i}", m) for i, m in enumerate(seq)]
        return cls(items, input_shape, num_classes)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.layers.named_children()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run layers[start:stop] on x (the IR at point `start`)."""
        for layer in list(self.layers)[start:stop]:
            x = layer(x)
        return x

    @torch.no_grad()
    def partition_points(self) -> list[PartitionPoint]:
        """Every candidate point 1..n-1 with the IR shape it exposes."""
        was = self.training
        self.eval()
        try:
            x = torch.zeros(1, *self.input_shape)
            points = []
            for i, (name, layer) in enumerate(self.layers.named_children()):
                x = layer(x)
                if i + 1 < len(self.layers):
                    points.append(PartitionPoint(i + 1, name, tuple(x.shape[1:])))
            return points
        finally:
            self.train(was)

    def check_point(self, k: int) -> int:
        if not isinstance(k, int) or not 1 <= k <= len(self) - 1:
            raise PartitionError(f"partition point {k} is out of range: this model has points 1..{len(self) - 1}")
        return k

    def split(self, k: int) -> tuple["FrontNet", "BackNet"]:
        """FrontNet = layers[:k], BackNet = layers[k:]; they share the parameters with self."""
        self.check_point(k)
        items = list(self.layers.named_children())
        return FrontNet(OrderedDict(items[:k]), k), BackNet(OrderedDict(items[k:]), k)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the last layer (the classifier), flattened: the CalTrain fingerprint basis."""
        return self.run(x, 0, len(self) - 1).flatten(1)


class FrontNet(nn.Sequential):
    """The first `k` layers: runs inside the enclave on decrypted inputs."""

    def __init__(self, layers: "OrderedDict[str, nn.Module]", k: int | None = None):
        # k is None for slices: nn.Sequential slicing rebuilds the class from an OrderedDict alone.
        super().__init__(layers)
        self.k = k


class BackNet(nn.Sequential):
    """Layers k..n-1: runs on the untrusted host (GPU if any) on IR tensors."""

    def __init__(self, layers: "OrderedDict[str, nn.Module]", k: int | None = None):
        super().__init__(layers)
        self.k = k


def layer_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, detached copies of a module's tensors, ready for safetensors."""
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
