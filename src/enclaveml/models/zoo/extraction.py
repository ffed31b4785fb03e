"""Extraction-like model (Darknet's GoogLeNet-style "Extraction") for 32x32 inputs.

Alternating 1x1 reductions and 3x3 convolutions, as in Extraction/GoogLeNet's stem without the
inception branches; deeper than `darknet` with fewer parameters per layer. Every layer is a
partition point.
"""

from __future__ import annotations

from torch import nn

from ..layers import LayeredModel
from .darknet import conv_bn_leaky


def build(num_classes: int = 10, width: int = 32) -> LayeredModel:
    w = width
    layers = [
        ("conv1", conv_bn_leaky(3, 2 * w)),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", conv_bn_leaky(2 * w, 4 * w)),
        ("pool2", nn.MaxPool2d(2)),
        ("red3", conv_bn_leaky(4 * w, 2 * w, 1)),
        ("conv3", conv_bn_leaky(2 * w, 4 * w)),
        ("red4", conv_bn_leaky(4 * w, 4 * w, 1)),
        ("conv4", conv_bn_leaky(4 * w, 8 * w)),
        ("pool3", nn.MaxPool2d(2)),
        ("red5", conv_bn_leaky(8 * w, 4 * w, 1)),
        ("conv5", conv_bn_leaky(4 * w, 8 * w)),
        ("red6", conv_bn_leaky(8 * w, 4 * w, 1)),
        ("conv6", conv_bn_leaky(4 * w, 8 * w)),
        ("gap", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())),
        ("fc", nn.Linear(8 * w, num_classes)),
    ]
    return LayeredModel(layers, (3, 32, 32), num_classes)
