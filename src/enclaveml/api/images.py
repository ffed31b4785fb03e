"""What a client may send as an image: bytes, a file path, a PIL image, a tensor or an array (client side).

Everything becomes encoded image bytes on the client's machine (files are read, pixels are PNG
encoded, losslessly); the enclave then decodes and preprocesses them as it does any upload.
"""

from __future__ import annotations

import io
import os
from typing import Any, Union

from ..errors import UserInputError

#: One image as the API accepts it.
ImageLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", Any]


def _png(array: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def to_image_bytes(image: ImageLike) -> bytes:
    """Encoded bytes for one image: bytes as they are, a path's file, pixels as PNG.

    Pixels: a PIL image; a (3, H, W) tensor, uint8 or float in [0, 1]; an (H, W, 3) uint8 array.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        from ..data.preprocess import load_image_bytes

        return load_image_bytes(image)
    if hasattr(image, "convert") and hasattr(image, "save"):  # a PIL image
        import numpy as np

        return _png(np.asarray(image.convert("RGB")))
    import numpy as np

    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise UserInputError(f"an image tensor of shape {tuple(t.shape)}: expected (3, H, W)")
        if t.dtype.is_floating_point:
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise UserInputError(f"an image tensor of dtype {t.dtype}: expected uint8, or float in [0, 1]")
        return _png(np.ascontiguousarray(t.permute(1, 2, 0).numpy()))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserInputError(f"an image array of shape {image.shape} and dtype {image.dtype}: expected (H, W, 3) uint8")
        return _png(np.ascontiguousarray(image))
    raise UserInputError(f"cannot send a {type(image).__name__} as an image: give bytes, a file path, a PIL image, "
                         "a (3, H, W) tensor or an (H, W, 3) uint8 array")
