"""The JPEG fast path (libjpeg-turbo through simplejpeg) against Pillow: the same pixels, the same
verdicts on hostile bytes (but for the few files only Pillow's own header parser refuses), the
pixel and scan limits before any decoding.

`decode_array` (the enclave's decoder, the owner's folder loader, the assessment's photos) must
give exactly the pixels `decode_image` (Pillow) gives wherever Pillow decodes the image: the
served predictions stay equal to plain PyTorch on the same bytes whichever path decoded them.
"""

from __future__ import annotations

import io
import itertools
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from enclaveml.data import preprocess as P
from enclaveml.data.preprocess import Preprocessing, decode_array, decode_image
from enclaveml.errors import DataError

CIFAR = Preprocessing(size=(32, 32))


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", **kw)
    return b.getvalue()


def _outcome(fn, data: bytes, pre: Preprocessing):
    try:
        return "ok", np.asarray(fn(data, pre), dtype=np.uint8)
    except DataError as e:
        return "error", str(e)


def _same(data: bytes, pre: Preprocessing) -> str:
    """Assert decode_array and decode_image agree on `data`; returns the outcome kind."""
    a, b = _outcome(decode_array, data, pre), _outcome(decode_image, data, pre)
    assert a[0] == b[0], (a[0], b[0], b[1] if b[0] == "error" else a[1])
    if a[0] == "ok":
        assert a[1].shape == b[1].shape and a[1].dtype == np.uint8 and np.array_equal(a[1], b[1])
    else:
        assert a[1] == b[1]
    return a[0]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: chroma that subsampling and upsampling must get right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, h + w - 2)], -1)
    return np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def test_the_fast_path_is_there_and_taken_for_colour_jpegs():
    """Without simplejpeg every image would quietly go through Pillow: the speed is then gone
    (docs/benchmarks.md), so its absence fails here rather than in a benchmark."""
    assert P._turbo is not None
    data = _jpeg(_photo(32, 32))
    px = P._turbo_pixels(data, CIFAR, "x")
    assert px is not None and px.shape == (32, 32, 3)


@pytest.mark.parametrize("quality, subsampling, progressive, optimize, restart",
                         list(itertools.product((40, 95, 100), (0, 1, 2), (False, True), (False, True), (0, 3))))
def test_every_encoding_variant_decodes_to_pillows_pixels(quality, subsampling, progressive, optimize, restart):
    kw = dict(quality=quality, subsampling=subsampling, progressive=progressive, optimize=optimize)
    if restart:
        kw["restart_marker_blocks"] = restart
    for arr in (_photo(32, 32, 1), _photo(61, 97, 2)):
        data = _jpeg(arr, **kw)
        assert P._turbo_pixels(data, CIFAR, "x") is not None  # the fast path, not Pillow
        for pre in (CIFAR, Preprocessing(size=(61, 97), resize=False), Preprocessing(size=(224, 224))):
            _same(data, pre)


def test_real_cifar_jpegs_decode_to_pillows_pixels(cifar10_dir):
    paths = sorted((cifar10_dir / "test").glob("*/*.jpg"))[::20]
    assert len(paths) >= 400
    for p in paths:
        assert _same(p.read_bytes(), Preprocessing(size=(32, 32), resize=False)) == "ok"


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_go_through_pillow(mode):
    """Pillow opens these as modes L and CMYK and converts them its own way (a grey JPEG is refused
    in strict mode); the fast path declines them, so the verdicts and pixels are Pillow's."""
    img = Image.fromarray(_photo(32, 32)).convert(mode)
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    data = b.getvalue()
    assert P._turbo_pixels(data, CIFAR, "x") is None
    assert _same(data, CIFAR) == "ok"
    assert _same(data, Preprocessing(size=(32, 32), resize=False)) == "error"


def test_a_truncated_jpeg_gets_pillows_verdict():
    """libjpeg-turbo would fill a truncated scan in and only warn; strict mode makes the fast path
    decline, so a truncated file is refused, as Pillow refuses it."""
    data = _jpeg(_photo(64, 64), quality=90)
    for cut in (len(data) // 2, len(data) - 40, len(data) - 2):
        assert P._turbo_pixels(data[:cut], CIFAR, "x") is None
        assert _same(data[:cut], CIFAR) == "error"


def _claiming(h: int, w: int) -> bytes:
    src = _jpeg(_photo(16, 16))
    i = src.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    return src[:i + 5] + struct.pack(">HH", h, w) + src[i + 9:]


def _count_decodes(monkeypatch) -> list:
    """Calls of libjpeg-turbo's pixel decoder from now on (its run-time check done before)."""
    assert P._turbo_agrees()  # its check decodes: done before the count starts
    calls = []
    real = P._turbo.decode_jpeg
    monkeypatch.setattr(P._turbo, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("side", [5000, 20000, 65500])
@pytest.mark.parametrize("exact", [False, True])
def test_the_pixel_limit_applies_before_any_pixel_is_decoded(monkeypatch, side, exact):
    """A tiny file whose header claims side x side pixels: refused with Pillow's text (its own
    bomb limit above about 179M pixels, ours below), and libjpeg-turbo never decodes a pixel,
    whether the model would resize it or expects exactly that size."""
    calls = _count_decodes(monkeypatch)
    bad = _claiming(side, side)
    pre = Preprocessing(size=(side, side), resize=False) if exact else CIFAR
    assert _same(bad, pre) == "error"
    assert calls == []
    if side == 5000:
        with pytest.raises(DataError, match="5000x5000 is over the pixel limit"):
            decode_array(bad, pre)


def test_a_large_photo_to_resize_goes_through_pillow():
    """libjpeg-turbo's array and Pillow's copy for the resize are never held at once for a large
    photo (review, session 8: 113 against 66 MB at 4096x4096): over 1M pixels, Pillow alone."""
    big = _jpeg(_photo(1024, 1025, 8), quality=80)
    assert P._turbo_pixels(big, CIFAR, "x") is None
    assert P._turbo_pixels(big, Preprocessing(size=(1024, 1025), resize=False), "x") is not None
    assert _same(big, CIFAR) == "ok"


def test_a_jpeg_of_thousands_of_scans_is_refused_at_once_by_both_paths():
    """Each scan of a progressive JPEG re-reads the whole coefficient buffer: 20,000 empty scans
    of a 512x512 image took 0.6 s in Pillow and 1.3 s in decode_array (decoded twice: libjpeg-turbo
    warns only at the end, then Pillow decodes again). Both now refuse on the count, before decoding."""
    prog = _jpeg(_photo(64, 64), quality=90, progressive=True)
    assert 1 < prog.count(b"\xff\xda") <= P.MAX_JPEG_SCANS and _same(prog, CIFAR) == "ok"
    i = prog.index(b"\xff\xda")
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x01\x01\x00"  # one component, spectral 1..1, no data
    bad = prog[:i] + empty_scan * 2000 + prog[i:]
    t = time.perf_counter()
    for fn in (decode_array, decode_image):
        with pytest.raises(DataError, match=f"more than {P.MAX_JPEG_SCANS} scans"):
            fn(bad, CIFAR)
    assert time.perf_counter() - t < 0.5


def _repeat_ac_scan(prog: bytes, times: int) -> bytes:
    """A valid progressive JPEG with its third scan (an AC scan of one component) sent `times`
    more times before the end: Pillow and libjpeg-turbo decode it, each scan at full cost."""
    sos = [k for k in range(len(prog) - 1) if prog[k:k + 2] == b"\xff\xda"]
    start = sos[2]
    end = start + 2 + int.from_bytes(prog[start + 2:start + 4], "big")
    while not (prog[end] == 0xFF and prog[end + 1] not in (0, *range(0xD0, 0xD8))):
        end += 1
    eoi = prog.rindex(b"\xff\xd9")
    return prog[:eoi] + prog[start:end] * times + prog[eoi:]


def test_scans_times_pixels_is_bounded_before_any_decoding(monkeypatch):
    """100 refinement scans of a 4096x4096 image cost 1.5 s (review R8b) though under the scan
    count: scans x pixels is capped from the header, on both paths, before a pixel is decoded;
    the same image with its usual scans decodes."""
    photo = np.zeros((2048, 2048, 3), np.uint8)
    prog = _jpeg(photo, quality=90, progressive=True)
    assert _same(prog, CIFAR) == "ok"
    bad = _repeat_ac_scan(prog, 60)  # ~70 scans of 4.2M pixels: over 2**28
    assert bad.count(b"\xff\xda") <= P.MAX_JPEG_SCANS
    calls = _count_decodes(monkeypatch)
    for pre in (CIFAR, Preprocessing(size=(2048, 2048), resize=False)):
        for fn in (decode_array, decode_image):
            with pytest.raises(DataError, match="over the decoding limit"):
                fn(bad, pre)
    assert calls == []


def test_a_scan_bomb_is_refused_before_libjpeg_turbo_decodes_it(monkeypatch):
    """The count is checked before the fast path runs (else libjpeg-turbo would decode the bomb,
    warn, and Pillow decode it again)."""
    calls = _count_decodes(monkeypatch)
    bomb = _repeat_ac_scan(_jpeg(_photo(32, 32, 9), quality=90, progressive=True), 3000)
    for pre in (CIFAR, Preprocessing(size=(32, 32), resize=False)):
        with pytest.raises(DataError, match="scans"):
            decode_array(bomb, pre)
    assert calls == []


def test_a_subsampling_simplejpeg_cannot_name_goes_through_pillow():
    """4:4:1 (luma sampled 1x4, as `cjpeg -sample 1x4` writes): simplejpeg's header call raised
    KeyError, which escaped decode_array and failed a whole multi-image request (review, session 8)."""
    d = bytearray(_jpeg(_photo(32, 32), quality=90, subsampling=0))
    i = d.index(b"\xff\xc0")
    d[i + 11] = 0x14  # the first component's sampling factors: h=1, v=4
    assert _same(bytes(d), CIFAR) == "ok"


@pytest.mark.parametrize("extra", [b"\xff\x01",  # TEM, a marker without a segment
                                   b"\xff\xe0\x00\x08JFIF\x00\x01",  # APP0 shorter than JFIF's
                                   b"\xff\xee\x00\x08Adobe\x00",  # APP14 shorter than Adobe's
                                   b"\xff\xe2\x00\x0eICC_PROFILE\x00"])  # APP2 with no profile
def test_what_only_pillows_header_parser_refuses_is_decoded_to_the_images_pixels(extra):
    """libjpeg-turbo reads these without a warning; Pillow's Python header parser refuses them
    (review, session 8). decode_array decodes them, to the pixels of the same file without the
    extra segment: the superset the module doc states, the image itself unchanged."""
    src = _jpeg(_photo(32, 32, 5), quality=90)
    bad = src[:2] + extra + src[2:]
    with pytest.raises(DataError):
        decode_image(bad, CIFAR)
    assert np.array_equal(decode_array(bad, CIFAR), np.asarray(decode_image(src, CIFAR)))


def test_a_libjpeg_turbo_that_disagrees_with_pillow_is_switched_off(monkeypatch):
    """The once-per-process check: a simplejpeg whose pixels differ from Pillow's (another
    libjpeg build) must not be used, and every image then decodes through Pillow."""
    real = P._turbo.decode_jpeg

    def off_by_one(*a, **k):
        px = real(*a, **k)
        px[0, 0, 0] ^= 1
        return px

    data = _jpeg(_photo(32, 32, 6), quality=90)
    monkeypatch.setattr(P._turbo, "decode_jpeg", off_by_one)
    P._TURBO_VERDICT.clear()
    try:
        assert not P._turbo_agrees()
        assert P._turbo_pixels(data, CIFAR, "x") is None
        assert _same(data, CIFAR) == "ok"
    finally:
        monkeypatch.undo()
        P._TURBO_VERDICT.clear()
    assert P._turbo_agrees() and P._turbo_pixels(data, CIFAR, "x") is not None


def test_a_strided_memoryview_is_read_as_its_bytes(monkeypatch):
    """simplejpeg reads a buffer's memory from its first byte on, ignoring strides (review,
    session 8): a reversed view would be read backwards and past its end. Only plain bytes may
    reach it; a reversed view of a reversed file decodes as the file."""
    data = _jpeg(_photo(32, 32, 7), quality=90)
    view = memoryview(data[::-1])[::-1]
    assert bytes(view) == data
    seen = []
    for fn in ("decode_jpeg_header", "decode_jpeg"):
        real = getattr(P._turbo, fn)
        monkeypatch.setattr(P._turbo, fn, lambda d, *a, _real=real, **k: seen.append(type(d)) or _real(d, *a, **k))
    assert np.array_equal(decode_array(view, CIFAR), decode_array(data, CIFAR))
    assert seen and set(seen) == {bytes}


def test_jpeg_outside_the_allowed_formats_is_never_decoded():
    data = _jpeg(_photo(32, 32))
    png_only = Preprocessing(size=(32, 32), allowed_formats=frozenset({"PNG"}))
    assert P._turbo_pixels(data, png_only, "x") is None
    with pytest.raises(DataError, match="not a decodable PNG image"):
        decode_array(data, png_only)


def test_mutated_jpegs_get_the_same_verdict_and_pixels_as_pillow():
    """A host-side attacker's bytes: flips, cuts, duplicated runs and zeros in real JPEGs (baseline
    and progressive). Whatever libjpeg-turbo makes of them, decode_array must agree with Pillow
    (both refuse, or both give the same pixels: random mutations do not reach the few files only
    Pillow's header parser refuses, above). `benchmarks/check_jpeg_decode.py` runs 60,000
    such cases with no disagreement (docs/benchmarks.md, session 8); this runs 600, seeded."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from check_jpeg_decode import mutate

    rng = random.Random(8)
    sources = [_jpeg(_photo(32, 32, s), quality=q, progressive=pr) for s, q, pr in ((3, 75, False), (4, 90, True))]
    decoded = 0
    for _ in range(300):
        data = mutate(rng.choice(sources), rng)
        for pre in (CIFAR, Preprocessing(size=(32, 32), resize=False)):
            decoded += _same(data, pre) == "ok"
    assert decoded > 20  # the cases exercise decoding, not only refusals


def test_a_jpeg_of_too_many_segments_junk_or_fill_is_refused_before_pillows_loops():
    """Pillow's header loop runs in Python once per segment and byte by byte over junk and fill,
    holding the GIL: 8 MB of empty APP1 segments cost 4.4 CPU s (review R8b, F-59). The walk
    refuses them in a bounded number of steps, before any decoder runs, on both paths."""
    grey = io.BytesIO()
    Image.fromarray(_photo(32, 32, 10)).convert("L").save(grey, "JPEG")
    g = grey.getvalue()
    cases = {
        "segments": g[:2] + b"\xff\xe1\x00\x02" * (P.MAX_JPEG_SEGMENTS + 10) + g[2:],
        "fill bytes": g[:2] + b"\xff" * (P.MAX_JPEG_FILL + 10) + g[2:],
        "bytes between": g[:4 + int.from_bytes(g[4:6], "big")] + b"junk" + g[4 + int.from_bytes(g[4:6], "big"):],
    }
    t = time.perf_counter()
    for what, bad in cases.items():
        for fn in (decode_array, decode_image):
            with pytest.raises(DataError, match=what.split()[0]):
                fn(bad, CIFAR)
    assert time.perf_counter() - t < 0.5
    # a few fill bytes and a few empty segments are fine, as before
    ok = g[:2] + b"\xff\xe1\x00\x02" * 20 + b"\xff" * 8 + g[2:]
    assert _same(ok, CIFAR) == "ok"


def test_a_png_of_too_many_chunks_is_refused():
    """8 MB of empty ancillary chunks before IDAT cost Pillow 3.9 CPU s (review R8b, F-59)."""
    b = io.BytesIO()
    Image.fromarray(_photo(32, 32, 11)).save(b, "PNG")
    png = b.getvalue()
    i = png.index(b"IDAT") - 4
    chunk = b"\x00\x00\x00\x00abCd" + zlib.crc32(b"abCd").to_bytes(4, "big")
    for fn in (decode_array, decode_image):
        with pytest.raises(DataError, match="chunks"):
            fn(png[:i] + chunk * (P.MAX_PNG_CHUNKS + 1) + png[i:], CIFAR)
    assert _same(png[:i] + chunk * 50 + png[i:], CIFAR) == "ok"


def test_what_follows_a_jpegs_end_is_not_counted():
    """A phone's motion photo appends its video after the image's end (EOI): near-random bytes with
    an FF DA every 64 KB or so. Counting them refused such photos (review R8b, F-60); the walk
    stops at the first image's end, and the photo decodes to its image's pixels."""
    src = _jpeg(_photo(32, 32, 12), quality=90)
    video = (b"\xff\xda" + bytes(range(256)) * 3) * 400  # 400 FF DA after EOI
    assert _same(src + video, CIFAR) == "ok"
    assert np.array_equal(decode_array(src + video, CIFAR), decode_array(src, CIFAR))
