"""Decode and preprocess images: the exact code the enclave runs and the owner's tools run.

Trust side: both. In serving this runs *inside* the enclave on attacker-influenced bytes, so
decoding is bounded (byte size, pixel count, formats) and every failure is a `DataError`.

Two ways to the model's input, equal bit for bit: `Preprocessing(data)` gives one CHW tensor;
`decode_array` per image then `Preprocessing.batch(arrays)` gives a whole batch in a handful of
tensor operations (about half the CPU per 32x32 image: the per-image torch calls dominate), laid
out channels-last, which is what the enclave's FrontNet runs fastest on (`serve/enclave.py`).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

#: Formats the enclave agrees to decode; anything else is refused before Pillow parses it.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG"})
#: Largest encoded image accepted (bytes) and largest decoded image (pixels): decompression bombs.
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: size, normalisation and what to do with other sizes.

    `resize=False` makes mismatched images an error (data sets for assessment must already be
    the model's size); `resize=True` scales the shorter side and centre-crops (a user's photo).
    """

    size: tuple[int, int] = (32, 32)  # (height, width)
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    resize: bool = True
    allowed_formats: frozenset[str] = field(default=ALLOWED_FORMATS)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict, resize: bool = True) -> "Preprocessing":
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]), resize=resize)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Map a [0, 1] float tensor (N,C,H,W or C,H,W) to the model's input space."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalise`, back to [0, 1] pixels (for pictures and SSIM)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean

    def __call__(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> normalised CHW float tensor."""
        return self.normalise(image_to_tensor(decode_image(data, self)))

    def batch(self, arrays: "list[np.ndarray]") -> torch.Tensor:
        """`decode_array` outputs (HWC uint8, this size) -> normalised NCHW float32 batch in
        channels-last memory order, equal bit for bit to `torch.stack([self(data) ...])`: the
        same element-wise operations in the same order, once per batch instead of per image."""
        if not arrays:
            raise DataError("no images to preprocess")
        h, w = self.size
        for a in arrays:
            if a.dtype != np.uint8 or a.shape != (h, w, 3):
                raise DataError(f"expected {h}x{w} RGB uint8 pixels, got {a.dtype} {tuple(a.shape)}")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return x.sub_(_channel_values(tuple(self.mean))).div_(_channel_values(tuple(self.std)))


@functools.lru_cache(maxsize=64)
def _channel_values(values: tuple[float, ...]) -> torch.Tensor:
    """`values` as a (1, C, 1, 1) float32 tensor, built once (the enclave normalises every request's
    batch with it; only ever read). Made outside inference mode, so any caller may use it."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def decode_image(data: bytes, pre: Preprocessing, name: str = "image") -> Image.Image:
    """Decode untrusted bytes into an RGB image of `pre.size`, or raise `DataError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"{name}: expected encoded image bytes")
    if len(data) == 0:
        raise DataError(f"{name}: empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise DataError(f"{name}: {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=sorted(pre.allowed_formats))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise DataError(f"{name}: {img.width}x{img.height} is over the pixel limit")
        img.load()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: not a decodable {'/'.join(sorted(pre.allowed_formats))} image ({type(e).__name__})") from None
    h, w = pre.size
    if not pre.resize:
        if img.mode != "RGB":
            raise DataError(f"{name}: image mode {img.mode}, expected RGB (pass --resize to convert)")
        if (img.height, img.width) != (h, w):
            raise DataError(
                f"{name}: image is {img.width}x{img.height}, the model expects {w}x{h} (pass --resize to convert)"
            )
        return img
    if img.mode != "RGB":  # convert() copies even an RGB image
        img = img.convert("RGB")
    if (img.height, img.width) != (h, w):
        # Centre crop in *source* coordinates, then one resize straight to the model's size: memory
        # stays bounded by the source image even for extreme aspect ratios (1 x 1,000,000 pixels).
        scale = max(h / img.height, w / img.width)
        cw, ch = min(img.width, w / scale), min(img.height, h / scale)
        left, top = (img.width - cw) / 2, (img.height - ch) / 2
        img = img.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    return img


def decode_array(data: bytes, pre: Preprocessing, name: str = "image") -> np.ndarray:
    """Decode untrusted bytes into `pre.size` RGB pixels (HWC uint8, for `Preprocessing.batch`),
    or raise `DataError`."""
    return np.asarray(decode_image(data, pre, name), dtype=np.uint8)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW tensor in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image_bytes(path) -> bytes:
    """Read an image file, turning I/O failures into `DataError`."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
