"""A 26-point CIFAR-10 CNN written the way a user writes one: a plain nn.Sequential (benchmark model).

27 children (each conv, batch norm, ReLU and pool its own layer), so `enclaveml assess` sees 26
candidate points: the size of the user model issue 11 timed. Seeded random weights: the
benchmark measures the assessment's cost, not this model's accuracy.

    enclaveml assess benchmarks.user_cnn:cnn26 --data ../shared/data/cifar10 --samples 16
"""

from __future__ import annotations

import torch
from torch import nn

input_shape = (3, 32, 32)
preprocessing = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def cnn26() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c_in = 3
    for c_out, pool in [(32, False), (32, True), (64, False), (64, True), (128, False), (128, True)]:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    layers += [nn.Conv2d(c_in, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(256, 10)]
    assert len(layers) == 27
    return nn.Sequential(*layers).eval()
