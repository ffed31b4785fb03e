"""Decode and preprocess images: the exact code the enclave runs and the owner's tools run.

Trust side: both. In serving this runs *inside* the enclave on attacker-influenced bytes, so
decoding is bounded (byte size, pixel count, formats) and every failure is a `DataError`.

Two ways to the model's input, equal bit for bit: `Preprocessing(data)` gives one CHW tensor;
`decode_array` per image then `Preprocessing.batch(arrays)` gives a whole batch in a handful of
tensor operations (about half the CPU per 32x32 image: the per-image torch calls dominate), laid
out channels-last, which is what the enclave's FrontNet runs fastest on (`serve/enclave.py`).

`decode_array` decodes a colour (YCbCr) JPEG with libjpeg-turbo's TurboJPEG API (simplejpeg)
rather than Pillow: the same library and the same settings (accurate integer IDCT, smooth chroma
upsampling), so the same pixels bit for bit (checked on all 10,000 CIFAR-10 test JPEGs, on every
subsampling, progressive and restart-marker variant in tests/test_data_decode.py, and once per
process on a few encodings before the first use: `_turbo_agrees`), without Pillow's header
parsing in Python: a 32x32 JPEG takes ~10 us instead of ~100, and the decoder releases the GIL,
so the enclave's pool threads no longer queue on each other's decoding (docs/benchmarks.md,
session 8). Every image Pillow decodes, `decode_array` decodes to the same pixels, unless the
structure walk below refuses it first (on both paths); every image Pillow refuses, it refuses
too, except a few that libjpeg-turbo reads without a warning but Pillow's own Python header
parser does not (a TEM marker, an APP segment shorter than its signature): those are decoded. Every other image (PNG, grey or CMYK JPEG, 4:4:1 and other rare
subsamplings, anything libjpeg-turbo warns about, a large photo to resize) goes through Pillow.
Before either decoder runs, `_structure` walks a JPEG's segments or a PNG's chunks in a bounded
number of steps (Pillow's own header loops run in Python, holding the GIL), stricter than Pillow
in one way: bytes between a JPEG's segments, which Pillow skips, are refused; a JPEG may then have
at most `MAX_JPEG_SCANS` scans in its first image and scans x pixels of at most
`MAX_JPEG_SCAN_PIXELS` (each progressive scan visits every block of its component: thousands of
tiny scans, or a hundred refinement scans of a large image, would cost seconds of enclave CPU).
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

try:  # libjpeg-turbo without Pillow's Python-level JPEG parsing (a dependency; Pillow alone without it)
    import simplejpeg as _turbo
except ImportError:  # pragma: no cover
    _turbo = None

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
        return self.normalise(array_to_tensor(decode_array(data, self)))

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


#: Most scans (SOS segments) a JPEG's first image may have. Encoders write about 10; libjpeg-turbo's
#: own TJFLAG_LIMITSCANS stops at 500. Counted by the structure walk (`_structure`), which skips
#: other segments (an EXIF thumbnail's scans among them) by their lengths and stops at the end of
#: the first image.
MAX_JPEG_SCANS = 100
#: Most segments (markers with a length: APPn, DQT, DHT, SOF, SOS, ...) before a JPEG's end, most
#: fill bytes (0xFF) before one marker, and most chunks of a PNG: encoders write a few dozen
#: segments (a 64 KB-split ICC profile in an 8 MB file: about 130) and PNG chunks of 8-64 KB.
MAX_JPEG_SEGMENTS = 1024
MAX_JPEG_FILL = 64
MAX_PNG_CHUNKS = 16384
#: Most scans x pixels a JPEG may cost: a progressive scan visits every block of its component,
#: so 100 refinement scans of a 4096x4096 image cost 1.5 s (review R8b). 2**28 allows the usual
#: ~10 scans up to the pixel limit, 16 at the limit, all 100 up to about 2.7M pixels; checked
#: from the header, before any pixel is decoded.
MAX_JPEG_SCAN_PIXELS = 1 << 28
#: The start of every JPEG file (SOI marker, then the next marker's 0xFF).
_JPEG_SOI = b"\xff\xd8\xff"
#: A colour JPEG of more pixels than this that must be resized goes through Pillow: otherwise
#: libjpeg-turbo's array and Pillow's copy of it for the resize would be held at once.
_TURBO_RESIZE_MAX_PIXELS = 1 << 20
#: JPEG colour spaces the fast path decodes: those Pillow opens as mode "RGB" by the same
#: conversion. Grey, CMYK and YCCK (Adobe) JPEGs go through Pillow and its own conversions.
_TURBO_SPACES = frozenset({"YCbCr"})


def _checked_bytes(data, name: str) -> "tuple[bytes, int]":
    """(`data` as one immutable copy (the same object for bytes), a JPEG's scans), its size and
    structure checked (`_structure`): what is checked is what gets decoded, and a memoryview's
    size is its bytes, not its items."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"{name}: expected encoded image bytes")
    try:
        raw = data if type(data) is bytes else bytes(data)
    except (ValueError, TypeError):  # a released view
        raise DataError(f"{name}: expected encoded image bytes") from None
    if len(raw) == 0:
        raise DataError(f"{name}: empty file")
    if len(raw) > MAX_IMAGE_BYTES:
        raise DataError(f"{name}: {len(raw)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
    return raw, _structure(raw, name)


#: A marker outside entropy-coded data: fill bytes (0xFF), then its code (not 0x00, not 0xFF).
_MARKER = re.compile(rb"\xff(\xff*)([^\x00\xff])")
#: The end of a scan's entropy-coded data: the first 0xFF that is neither a stuffed byte (FF 00)
#: nor a restart marker (FF D0-D7) nor fill.
_SCAN_END = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _structure(raw: bytes, name: str) -> int:
    """Walk a JPEG's segments or a PNG's chunks by their lengths, with a bounded number of steps,
    before any decoder runs: Pillow's own header loops run in Python, byte by byte over junk and
    fill and once per empty segment or chunk, holding the GIL (8 MB of them: about 4 CPU s, review
    R8b). Returns the scans of a JPEG's first image (0 for anything else). A JPEG may have at most
    `MAX_JPEG_SEGMENTS` segments and `MAX_JPEG_SCANS` scans before its end (EOI; what follows it,
    such as a phone's motion-photo video, is not counted), no bytes between its segments and at
    most `MAX_JPEG_FILL` fill bytes before a marker; a PNG at most `MAX_PNG_CHUNKS` chunks. A
    file cut short ends the walk: the decoders then refuse it."""
    if raw[:3] == _JPEG_SOI:
        return _jpeg_walk(raw, name)
    if raw[:8] == _PNG_SIGNATURE:
        _png_walk(raw, name)
    return 0


def _jpeg_walk(raw: bytes, name: str) -> int:
    n, i, scans, segments = len(raw), 2, 0, 0
    scan_end = _SCAN_END.search
    while i + 1 < n:
        if raw[i] != 0xFF:
            raise DataError(f"{name}: not a decodable JPEG/PNG image (bytes between its segments)")
        code = raw[i + 1]
        if code == 0xFF or code == 0x00:  # fill bytes before the code (rare): the bounded slow way
            m = _MARKER.match(raw, i)
            if m is None:
                raise DataError(f"{name}: not a decodable JPEG/PNG image (bytes between its segments)")
            if len(m.group(1)) > MAX_JPEG_FILL:
                raise DataError(f"{name}: a JPEG with more than {MAX_JPEG_FILL} fill bytes before a marker is refused")
            code, i = m.group(2)[0], m.end()
        else:
            i += 2
        if code == 0xD9:  # EOI: the first image ends here
            break
        if code == 0x01 or 0xD0 <= code <= 0xD7:  # TEM, RSTn: no segment
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise DataError(f"{name}: a JPEG of more than {MAX_JPEG_SEGMENTS} segments is refused")
        if i + 2 > n:
            break
        length = (raw[i] << 8) | raw[i + 1]
        if length < 2:
            raise DataError(f"{name}: not a decodable JPEG/PNG image (a segment of length {length})")
        i += length
        if code == 0xDA:  # SOS: its entropy-coded data follows, up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise DataError(f"{name}: a JPEG of more than {MAX_JPEG_SCANS} scans is refused")
            end = scan_end(raw, i)
            if end is None:
                break
            i = end.start()
    return scans


def _png_walk(raw: bytes, name: str) -> None:
    n, i, chunks = len(raw), 8, 0
    while i + 8 <= n:
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise DataError(f"{name}: a PNG of more than {MAX_PNG_CHUNKS} chunks is refused")
        if raw[i + 4:i + 8] == b"IEND":
            return
        i += 12 + int.from_bytes(raw[i:i + 4], "big")


def _pixel_limit(width: int, height: int, name: str, scans: int = 0) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{name}: {width}x{height} is over the pixel limit")
    if scans * width * height > MAX_JPEG_SCAN_PIXELS:
        raise DataError(f"{name}: a {width}x{height} JPEG of {scans} scans is over the decoding limit")


def _fit(img: Image.Image, pre: Preprocessing, name: str) -> Image.Image:
    """A decoded RGB image at `pre.size`: as it is, resized (`pre.resize`), or a `DataError`."""
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


def decode_image(data: bytes, pre: Preprocessing, name: str = "image") -> Image.Image:
    """Decode untrusted bytes into an RGB image of `pre.size` with Pillow, or raise `DataError`."""
    return _pillow(*_checked_bytes(data, name), pre, name)


def _pillow(raw: bytes, scans: int, pre: Preprocessing, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(raw), formats=sorted(pre.allowed_formats))
        _pixel_limit(img.width, img.height, name, scans)
        img.load()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: not a decodable {'/'.join(sorted(pre.allowed_formats))} image ({type(e).__name__})") from None
    return _fit(img, pre, name)


def _turbo_agrees() -> bool:
    """Whether the fast path may be used (`_turbo_check`, run until it gives a verdict: a failure
    to run it, say a MemoryError under load, is not cached as a disagreement)."""
    verdict = _TURBO_VERDICT.get("agrees")
    if verdict is None:
        verdict = _turbo_check()
        if verdict is not None:
            _TURBO_VERDICT["agrees"] = verdict
    return bool(verdict)


_TURBO_VERDICT: dict = {}


def _turbo_check() -> "bool | None":
    """Does this process's libjpeg-turbo (simplejpeg) decode to this process's Pillow's pixels?
    Checked once, on a few encodings of a small noisy gradient (each subsampling, progressive,
    restart markers): another Pillow build (say, one linked against IJG libjpeg) or a future
    simplejpeg that differs switches the fast path off, and every image goes through Pillow. None: it could not run (try again later)."""
    if _turbo is None:
        return False
    y, x = np.mgrid[0:24, 0:40]
    noise = (np.arange(24 * 40 * 3).reshape(24, 40, 3) * 7919) % 61
    arr = np.clip(np.stack([x * 6, y * 10, (x + y) * 4], -1) + noise - 30, 0, 255).astype(np.uint8)
    variants = ({"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"subsampling": 2, "progressive": True},
                {"subsampling": 2, "restart_marker_blocks": 2})
    try:
        for kw in variants:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
            data = buf.getvalue()
            with Image.open(io.BytesIO(data)) as img:
                want = np.asarray(img.convert("RGB"), dtype=np.uint8)
            got = _turbo.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
            if got.shape != want.shape or not np.array_equal(got, want):
                return False
    except (MemoryError, OSError):  # could not run now: no verdict yet
        return None
    except Exception:  # simplejpeg refused its own check: never use it
        return False
    return True


def _turbo_pixels(data: bytes, pre: Preprocessing, name: str, scans: "int | None" = None) -> "np.ndarray | None":
    """A colour JPEG's pixels (HWC uint8, its own size) from libjpeg-turbo, or None: Pillow decides.

    The header is read first; an image over the pixel limit, or a large one to resize, is left to
    Pillow before any pixel is decoded (Pillow reads only its header before refusing it, and
    gives its own error text). `strict`: a recoverable error (a truncated or corrupt file, which
    libjpeg-turbo would fill in) raises, and Pillow gives its own verdict; so does any other
    failure of simplejpeg (e.g. a subsampling it has no name for)."""
    if _turbo is None or "JPEG" not in pre.allowed_formats or data[:3] != _JPEG_SOI:
        return None
    try:
        height, width, space, _ = _turbo.decode_jpeg_header(data, strict=True)
    except Exception:
        return None
    if (space not in _TURBO_SPACES or width * height > MAX_IMAGE_PIXELS
            or (_structure(data, name) if scans is None else scans) * width * height > MAX_JPEG_SCAN_PIXELS):
        return None
    if (height, width) != tuple(pre.size) and width * height > _TURBO_RESIZE_MAX_PIXELS:
        return None
    if not _turbo_agrees():
        return None
    try:
        px = _turbo.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except Exception:
        return None
    return px if px.shape == (height, width, 3) else None


def decode_array(data: bytes, pre: Preprocessing, name: str = "image") -> np.ndarray:
    """Decode untrusted bytes into `pre.size` RGB pixels (HWC uint8, for `Preprocessing.batch`),
    or raise `DataError`: `decode_image`'s pixels wherever Pillow decodes the image (colour JPEGs
    through libjpeg-turbo directly; what else it accepts: the module doc)."""
    data, scans = _checked_bytes(data, name)  # bytes: simplejpeg reads a buffer's memory as laid out
    px = _turbo_pixels(data, pre, name, scans)
    if px is None:
        return np.asarray(_pillow(data, scans, pre, name), dtype=np.uint8)
    if px.shape[:2] == tuple(pre.size):
        return px
    return np.asarray(_fit(Image.fromarray(px), pre, name), dtype=np.uint8)


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB pixels -> float32 CHW tensor in [0, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW tensor in [0, 1]."""
    return array_to_tensor(np.asarray(img, dtype=np.uint8))


def load_image_bytes(path) -> bytes:
    """Read an image file, turning I/O failures into `DataError`."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
