"""A small DenseNet-BC (Huang et al. 2017) for 32x32 inputs.

Each dense layer returns cat(x, f(x)), so the state after any dense layer is one tensor: every
dense layer and transition is a partition point (block boundaries, as the paper's DenseNet).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import LayeredModel


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (bottleneck) then BN-ReLU-3x3 growing `growth` channels, concatenated."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.f = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.f(x)], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 compression (x0.5) then 2x2 average pooling."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def build(num_classes: int = 10, growth: int = 12, block_layers: tuple[int, ...] = (4, 4, 4)) -> LayeredModel:
    c = 2 * growth
    layers: list[tuple[str, nn.Module]] = [("stem", nn.Conv2d(3, c, 3, padding=1, bias=False))]
    for b, n in enumerate(block_layers, start=1):
        for i in range(1, n + 1):
            layers.append((f"dense{b}_{i}", DenseLayer(c, growth)))
            c += growth
        if b < len(block_layers):
            layers.append((f"trans{b}", Transition(c, c // 2)))
            c //= 2
    layers.append(("gap", nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())))
    layers.append(("fc", nn.Linear(c, num_classes)))
    return LayeredModel(layers, (3, 32, 32), num_classes)
