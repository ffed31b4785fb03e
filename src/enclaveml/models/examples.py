"""Graph models written the way users write them: their own `forward()`, residual, dense and
inverted-residual blocks, functional calls (owner side; also built by an enclave that allows them).

Not zoo models: they have no trained weights. They exist to show (and test) that any ordinary
PyTorch model partitions from its graph (`models/graph.py`), and as ready factories:

    enclaveml assess enclaveml.models.examples:resnet18 --data PHOTOS --input-size 3x224x224 --resize
    enclaveml partition enclaveml.models.examples:resnet18 --weights W.safetensors --at 8 --out b

`resnet18` is the ImageNet ResNet-18 architecture (torchvision's layout and parameter names,
so torchvision's state dict loads into it with `--weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a skip connection (1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout (stem, layer1..4, avgpool, fc) with basic blocks."""

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, width: int = 64, imagenet_stem: bool = True):
        super().__init__()
        w = width
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        chans, cin, stages = [w, 2 * w, 4 * w, 8 * w], w, []
        for i, (n, c) in enumerate(zip(layers, chans)):
            blocks = [BasicBlock(cin, c, 1 if i == 0 else 2)] + [BasicBlock(c, c) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _sized(model: nn.Module, size: int, imagenet: bool = False) -> nn.Module:
    """Attach what `load_user_model` reads when no flag or card says it: input shape, preprocessing."""
    model.input_shape = (3, size, size)
    if imagenet:
        model.preprocessing = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return model.eval()


def resnet18(num_classes: int = 1000) -> ResNet:
    """ImageNet ResNet-18 (11.7 M parameters, 224x224 inputs, torchvision's normalisation), random weights."""
    return _sized(ResNet((2, 2, 2, 2), num_classes), 224, imagenet=True)


def resnet_cifar(num_classes: int = 10, width: int = 16) -> ResNet:
    """A small CIFAR-sized ResNet (3x3 stem, no max-pool; 32x32 inputs)."""
    return _sized(ResNet((1, 1, 1, 1), num_classes, width, imagenet_stem=False), 32)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)  # the input travels on: no cut inside


class DenseNet(nn.Module):
    """Dense blocks (each layer concatenates its input) with transitions between them."""

    def __init__(self, num_classes: int = 10, growth: int = 8, blocks=(2, 2)):
        super().__init__()
        c = 2 * growth
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        feats = []
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            feats.append(nn.Sequential(*layers))
            if i + 1 < len(blocks):
                feats.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                           nn.AvgPool2d(2)))
                c //= 2
        self.features = nn.Sequential(*feats)
        self.norm = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.features(self.stem(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def densenet(num_classes: int = 10) -> DenseNet:
    return _sized(DenseNet(num_classes), 32)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNet(nn.Module):
    """A small MobileNetV2: conv stem, inverted residual blocks, 1x1 head, dropout + linear."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        cfg = [(w, 1, 1), (w, 1, 4), (2 * w, 2, 4), (2 * w, 1, 4)]  # (out, stride, expand)
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                                 nn.ReLU6(inplace=True))]
        cin = w
        for cout, s, t in cfg:
            layers.append(InvertedResidual(cin, cout, s, t))
            cin = cout
        layers.append(nn.Sequential(nn.Conv2d(cin, 4 * w, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet(num_classes: int = 10) -> MobileNet:
    return _sized(MobileNet(num_classes), 32)


class FunctionalCNN(nn.Module):
    """Only convolutions and a linear layer are modules; everything else is a functional call."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.log_softmax(self.fc(x), dim=1)


def functional_cnn(num_classes: int = 10) -> FunctionalCNN:
    return _sized(FunctionalCNN(num_classes), 32)


class AllConv(nn.Module):
    """A fully convolutional classifier: a 1x1 convolution to the classes, global pooling, log-softmax."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.classifier(self.body(x)), 1)
        return F.log_softmax(torch.flatten(x, 1), dim=1)


def allconv(num_classes: int = 10) -> AllConv:
    return _sized(AllConv(num_classes), 32)
