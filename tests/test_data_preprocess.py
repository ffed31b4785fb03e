"""Decoding and preprocessing: the code the enclave runs on untrusted bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from enclaveml.data import Preprocessing, decode_array, decode_image, load_image_folder
from enclaveml.data.folder import to_model_input
from enclaveml.errors import DataError


def _png(mode="RGB", size=(32, 32), fmt="PNG") -> bytes:
    img = Image.new(mode, size, color=(10, 200, 30) if mode == "RGB" else 128)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_bytes_and_folder_paths_agree_bit_for_bit(cifar10_dir):
    pre = Preprocessing(resize=False)
    ds = load_image_folder(cifar10_dir / "test", pre, limit_per_class=2, cache=False)
    assert len(ds) == 20 and ds.classes[0] == "airplane"
    from_folder = to_model_input(ds.images, pre)
    for i, path in enumerate(ds.paths[:5]):
        with open(path, "rb") as f:
            assert torch.equal(pre(f.read()), from_folder[i])


def test_batch_equals_per_image_bit_for_bit(cifar10_dir):
    """The enclave's batched path (decode_array per image, one `batch`) gives the model exactly
    the tensors `Preprocessing(data)` gives: real JPEGs, a photo to resize and a grey PNG."""
    pre = Preprocessing()
    images = [p.read_bytes() for p in sorted((cifar10_dir / "test" / "dog").glob("*.jpg"))[:20]]
    images += [_png(size=(50, 37)), _png(mode="L", size=(32, 32)), _png(size=(64, 64))]
    x = pre.batch([decode_array(b, pre) for b in images])
    assert x.shape == (len(images), 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)  # what the enclave's FrontNet runs on
    assert torch.equal(x, torch.stack([pre(b) for b in images]))


def test_batch_refuses_pixels_of_another_shape():
    pre = Preprocessing()
    with pytest.raises(DataError, match="no images"):
        pre.batch([])
    with pytest.raises(DataError, match="32x32 RGB uint8"):
        pre.batch([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)])
    with pytest.raises(DataError, match="32x32 RGB uint8"):
        pre.batch([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(DataError, match="not a decodable"):
        decode_array(b"junk", pre)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"not an image at all", "not a decodable"),
        (_png()[:40], "not a decodable"),
        (_png(fmt="GIF"), "not a decodable"),
    ],
)
def test_bad_bytes_raise_data_error(data, match):
    with pytest.raises(DataError, match=match):
        decode_image(data, Preprocessing())


def test_strict_mode_rejects_wrong_size_and_mode():
    strict = Preprocessing(resize=False)
    with pytest.raises(DataError, match="expects 32x32"):
        decode_image(_png(size=(64, 48)), strict)
    with pytest.raises(DataError, match="mode L"):
        decode_image(_png(mode="L"), strict)


def test_resize_mode_converts_any_photo():
    img = decode_image(_png(mode="L", size=(100, 60)), Preprocessing(resize=True))
    assert img.size == (32, 32) and img.mode == "RGB"


def test_normalise_roundtrip():
    pre = Preprocessing()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(pre.denormalise(pre.normalise(x)), x, atol=1e-6)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "nope", Preprocessing())
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no .jpg/.png"):
        load_image_folder(tmp_path, Preprocessing())


def test_unreadable_image_in_folder_names_the_file(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.jpg"):
        load_image_folder(tmp_path, Preprocessing(), cache=False)


def test_cache_roundtrip(cifar10_dir):
    pre = Preprocessing(resize=False)
    a = load_image_folder(cifar10_dir / "test", pre, limit_per_class=1)
    b = load_image_folder(cifar10_dir / "test", pre, limit_per_class=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert np.asarray(a.images).dtype == np.uint8
