"""Darknet-Reference-like model for 32x32 inputs: a plain stack of conv and max-pool layers.

Like Darknet Reference (the paper's shallowest ImageNet model): 3x3 convolutions with batch norm
and leaky ReLU, each followed by 2x2 max pooling, then a 1x1 conv to classes and global average
pooling. Here the classifier is written as GAP + Linear (the same maths), so the last layer is a
Linear whose rows the class mapping permutes. Every layer is a partition point.
"""

from __future__ import annotations

from torch import nn

from ..layers import LayeredModel


def conv_bn_leaky(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)
    )


def build(num_classes: int = 10, width: int = 32) -> LayeredModel:
    w = width
    layers = [
        ("conv1", conv_bn_leaky(3, w)),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", conv_bn_leaky(w, 2 * w)),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", conv_bn_leaky(2 * w, 4 * w)),
        ("conv4", conv_bn_leaky(4 * w, 4 * w)),
        ("pool3", nn.MaxPool2d(2)),
        ("conv5", conv_bn_leaky(4 * w, 8 * w)),
        ("conv6", conv_bn_leaky(8 * w, 8 * w)),
        ("pool4", nn.MaxPool2d(2)),
        ("conv7", conv_bn_leaky(8 * w, 16 * w)),
        ("gap", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())),
        ("fc", nn.Linear(16 * w, num_classes)),
    ]
    return LayeredModel(layers, (3, 32, 32), num_classes)
