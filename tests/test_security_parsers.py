"""Security review (engineer F): hostile bytes into image decoding, bundles, the serve wire formats,
the host <-> enclave channel and CalTrain uploads.

Each parser must raise only its documented error types (DataError, TamperedMessage,
PolicyViolation, UserInputError, ChannelError) and must never hand back data from altered input.
Bugs found here are `xfail(strict=True)` with the reason; see docs/security-review.md.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from enclaveml.crypto import HpkeKeyPair, SigningKey, seal_request
from enclaveml.data.preprocess import MAX_IMAGE_BYTES, Preprocessing, decode_array, decode_image
from enclaveml.errors import (DataError, EnclaveMLError, PolicyViolation, TamperedMessage, UserInputError)
from enclaveml.models import zoo
from enclaveml.models import bundle as B
from enclaveml.models.classmap import ClassMapping
from enclaveml.runtime import arena, frames, transport
from enclaveml.runtime.errors import ChannelError
from enclaveml.protocol import deploy, infer as protocol

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
PRE = Preprocessing(size=(32, 32))


def _only(allowed, fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except allowed:
        return None
    except Exception as e:
        pytest.fail(f"{getattr(fn, '__name__', fn)} raised undocumented {type(e).__name__}: {e}")
    return out


# ------------------------------------------------------------------------------------------- images


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    b = io.BytesIO()
    Image.new(mode, (w, h)).save(b, "PNG")
    return b.getvalue()


def _jpeg(w: int = 40, h: int = 30) -> bytes:
    b = io.BytesIO()
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    img.save(b, "JPEG", quality=80)
    return b.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(w: int, h: int, idat: bytes = b"", extra: bytes = b"") -> bytes:
    """A tiny PNG whose header claims w x h RGB pixels (valid CRCs), with an almost empty IDAT."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra
            + _chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def _decoded_or_data_error(data, pre=PRE):
    """Pillow's decoder and the enclave's (`decode_array`: colour JPEGs through libjpeg-turbo)
    raise only DataError, and what they give back has the model's size."""
    img = _only((DataError,), decode_image, data, pre)
    if img is not None:
        assert img.mode == "RGB" and (img.height, img.width) == pre.size
    for view in (data, bytearray(data), memoryview(data)):
        px = _only((DataError,), decode_array, view, pre)
        if px is not None:
            assert px.dtype == np.uint8 and px.shape == (*pre.size, 3)


@FUZZ
@given(st.binary(max_size=400))
def test_decode_image_on_random_bytes(data):
    _decoded_or_data_error(data)


SOURCES = {"png": _png(20, 12), "jpeg": _jpeg(), "png-gray": _png(9, 40, "L"), "png-p": _png(33, 33, "P")}


@FUZZ
@given(st.sampled_from(sorted(SOURCES)), st.data())
def test_decode_image_on_mutated_png_and_jpeg(kind, data):
    src = SOURCES[kind]
    b = bytearray(src)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "dup", "zero"]))
        if op == "flip":
            b[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del b[i:]
            if not b:
                b = bytearray(b"\x89")
        elif op == "dup":
            b[i:i] = b[i:i + data.draw(st.integers(1, 32))]
        else:
            b[i] = 0
    _decoded_or_data_error(bytes(b))
    _decoded_or_data_error(bytes(b), Preprocessing(size=(32, 32), resize=False))


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (4097, 4096), (2**31 - 1, 1), (1, 2**31 - 1), (65_535, 65_535)])
def test_png_decompression_bomb_header_is_refused_before_decoding(w, h):
    data = _png_claiming(w, h)
    assert len(data) < 200
    for decode in (decode_image, decode_array):
        with pytest.raises(DataError):
            decode(data, PRE)


def test_jpeg_claiming_65500_square_is_refused():
    src = _jpeg(16, 16)
    i = src.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    bad = src[: i + 5] + struct.pack(">HH", 65500, 65500) + src[i + 9:]
    for decode in (decode_image, decode_array):
        with pytest.raises(DataError):
            decode(bad, PRE)


def test_png_text_chunk_bomb_is_refused_or_ignored():
    """zTXt/iCCP chunks that inflate to 64 MiB: Pillow's text limits must hold (or the chunk be ignored)."""
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)
    ztxt = _chunk(b"zTXt", b"Comment\x00\x00" + bomb)
    iccp = _chunk(b"iCCP", b"icc\x00\x00" + bomb)
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * 3 * 8 for _ in range(8)))
    for extra in (ztxt, iccp):
        _decoded_or_data_error(_png_claiming(8, 8, raw, extra))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    b = io.BytesIO()
    Image.new("RGB", (32, 32)).save(b, fmt)
    for decode in (decode_image, decode_array):
        with pytest.raises(DataError):
            decode(b.getvalue(), PRE)


def test_oversized_and_non_bytes_inputs_are_data_errors():
    for decode in (decode_image, decode_array):
        with pytest.raises(DataError):
            decode(b"\x00" * (MAX_IMAGE_BYTES + 1), PRE)
        for bad in (None, "a string", 5, [1, 2]):
            with pytest.raises(DataError):
                decode(bad, PRE)


ASPECT_BOMB = textwrap.dedent("""
    import io, resource, sys
    from PIL import Image
    from enclaveml.data.preprocess import decode_image, Preprocessing
    from enclaveml.errors import DataError
    b = io.BytesIO(); Image.new("RGB", (1_000_000, 1)).save(b, "PNG"); data = b.getvalue()
    assert len(data) < 10_000  # a few KB on the wire, 1 Mpx: well under MAX_IMAGE_PIXELS
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), resource.RLIM_INFINITY))
    try:
        img = decode_image(data, Preprocessing(size=(32, 32)))
        print("ok", img.size)
    except DataError:
        print("ok refused")
    except MemoryError:
        print("MemoryError")
""")


def test_extreme_aspect_ratio_image_is_decoded_in_bounded_memory():
    r = subprocess.run([sys.executable, "-c", ASPECT_BOMB], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("ok"), r.stdout + r.stderr[-500:]


# ------------------------------------------------------------------------------------------- bundles


class _Bundle:
    """One real darknet bundle per session; a plain object so hypothesis does not print its bytes."""

    owner = SigningKey.generate()
    _cache: "tuple[dict[str, bytes], bytes] | None" = None

    @classmethod
    def get(cls, tmp_path_factory) -> "tuple[dict[str, bytes], bytes]":
        if cls._cache is None:
            torch.manual_seed(0)
            m = zoo.load("darknet", pretrained=False).eval()
            e = zoo.entry("darknet")
            d = tmp_path_factory.mktemp("bundle") / "b"
            _, key = B.make_bundle(m, 4, d, {"zoo": "darknet"}, e.preprocessing, list(e.classes), cls.owner)
            cls._cache = (B.bundle_files(d), key)
        return cls._cache

    def __repr__(self) -> str:
        return "<bundle>"


@pytest.fixture(scope="module")
def owner():
    return _Bundle.owner


class _Handle(tuple):
    def __repr__(self) -> str:
        return "<bundle files, key>"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _Handle(_Bundle.get(tmp_path_factory))


def _sign(signer: SigningKey, manifest: bytes) -> bytes:
    return json.dumps({"alg": "Ed25519", "owner": signer.public_key().to_bytes().hex(),
                       "signature": signer.sign(B.MANIFEST_LABEL + manifest).hex()}).encode()


@FUZZ
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["alg", "owner", "signature", "x"]), c, max_size=4),
    max_leaves=8).map(lambda v: json.dumps(v).encode()))
def test_manifest_signature_file_garbage_is_tampered(bundle, owner, sig):
    files, _ = bundle
    _only((TamperedMessage,), B.load_manifest, {**files, B.SIGNATURE: sig})
    _only((TamperedMessage,), B.load_manifest, {**files, B.SIGNATURE: sig}, owner.public_key())


def test_deeply_nested_signature_file_is_tampered(bundle):
    files, _ = bundle
    with pytest.raises(TamperedMessage):
        B.load_manifest({**files, B.SIGNATURE: b"[" * 4000})


def test_manifest_byte_flips_fail_authentication(bundle, owner):
    files, key = bundle
    raw = files[B.MANIFEST]
    for i in range(0, len(raw), max(1, len(raw) // 80)):
        bad = bytearray(raw)
        bad[i] ^= 0x20
        _only((TamperedMessage,), B.load_manifest, {**files, B.MANIFEST: bytes(bad)})
        _only((TamperedMessage,), B.open_enclave_parts, {**files, B.MANIFEST: bytes(bad)}, key)


@pytest.mark.parametrize("part", [B.FRONTNET, B.CLASSMAP])
def test_sealed_part_mutations_and_swaps_fail(bundle, owner, part):
    files, key = bundle
    tok = files[part]
    for bad in (tok[:-1], tok + b"\x00", tok[:13], b"", tok[:1] + bytes(12) + tok[13:], files[B.BACKNET]):
        _only((TamperedMessage,), B.open_enclave_parts, {**files, part: bad}, key, owner.public_key())
    other = B.CLASSMAP if part == B.FRONTNET else B.FRONTNET
    _only((TamperedMessage,), B.open_enclave_parts, {**files, part: files[other], other: files[part]}, key)


def test_host_resigning_the_manifest_with_its_own_key_cannot_open_the_parts(bundle):
    """Even with expected_owner=None, the sealed parts are bound to the owner named in the manifest."""
    files, key = bundle
    mallory = SigningKey.generate()
    d = json.loads(files[B.MANIFEST])
    d["owner"] = mallory.public_key().to_bytes().hex()
    raw = json.dumps(d).encode()
    forged = {**files, B.MANIFEST: raw, B.SIGNATURE: _sign(mallory, raw)}
    _only((TamperedMessage,), B.open_enclave_parts, forged, key)
    # and a manifest that keeps the owner field but is signed by mallory is refused outright
    forged2 = {**files, B.SIGNATURE: _sign(mallory, files[B.MANIFEST])}
    _only((TamperedMessage,), B.open_enclave_parts, forged2, key)


def test_manifest_with_changed_k_or_preprocessing_cannot_open_the_parts(bundle, owner):
    """The part AAD covers the manifest core, so a re-signed core (owner key stolen aside) changes the AAD."""
    files, key = bundle
    for field, value in (("k", 5), ("num_classes", 11), ("preprocessing", {"size": [64, 64], "mean": [0, 0, 0], "std": [1, 1, 1]})):
        d = json.loads(files[B.MANIFEST])
        d[field] = value
        raw = json.dumps(d).encode()
        _only((TamperedMessage,), B.open_enclave_parts, {**files, B.MANIFEST: raw, B.SIGNATURE: _sign(owner, raw)}, key)


MANIFEST_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.text(max_size=6)
                             | st.floats(allow_nan=False, allow_infinity=False),
                             lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                             max_leaves=8)


@FUZZ
@given(st.sampled_from(["format", "bundle_id", "name", "arch", "k", "layers", "input_shape", "ir_shape",
                        "preprocessing", "num_classes", "parts"]), MANIFEST_JSON)
def test_self_signed_manifest_with_any_field_value_is_refused_cleanly(bundle, field, value):
    """A manifest signed by whoever uploads it (the host path checks no owner): any field value must
    give TamperedMessage or UserInputError, never a crash, and never load foreign parts."""
    files, key = bundle
    mallory = SigningKey.generate()
    d = json.loads(files[B.MANIFEST])
    d["owner"] = mallory.public_key().to_bytes().hex()
    d[field] = value
    raw = json.dumps(d).encode()
    forged = {**files, B.MANIFEST: raw, B.SIGNATURE: _sign(mallory, raw)}
    _only((TamperedMessage, UserInputError), B.load_manifest, forged)
    _only((TamperedMessage, UserInputError), B.open_enclave_parts, forged, key)


@pytest.mark.parametrize("value", [None, "zz", 5, "00" * 31, "00" * 32])
def test_manifest_owner_field_that_is_not_the_signer_is_tampered(bundle, value):
    files, _ = bundle
    d = json.loads(files[B.MANIFEST])
    d["owner"] = value
    raw = json.dumps(d).encode()
    with pytest.raises((TamperedMessage, UserInputError)):
        B.load_manifest({**files, B.MANIFEST: raw, B.SIGNATURE: _sign(_Bundle.owner, raw)})


def test_self_signed_manifest_with_infinite_number_is_tampered(bundle):
    files, _ = bundle
    mallory = SigningKey.generate()
    d = json.loads(files[B.MANIFEST])
    d["owner"] = mallory.public_key().to_bytes().hex()
    raw = json.dumps(d).encode().replace(b'"k": 4', b'"k": 1e999')
    assert b"1e999" in raw
    with pytest.raises((TamperedMessage, UserInputError)):
        B.load_manifest({**files, B.MANIFEST: raw, B.SIGNATURE: _sign(mallory, raw)})


def test_host_side_bundle_reader_does_not_run_code_named_by_an_uploaded_manifest(tmp_path):
    target = tmp_path / "pwned"
    mallory = SigningKey.generate()
    back = b"anything"
    man = {"format": 1, "bundle_id": "x", "name": "x",
           "arch": {"factory": "os:makedirs", "kwargs": {"name": str(target)}},
           "k": 1, "layers": ["a", "b"], "input_shape": [3, 32, 32], "ir_shape": [1], "num_classes": 2,
           "preprocessing": {"size": [32, 32], "mean": [0, 0, 0], "std": [1, 1, 1]},
           "owner": mallory.public_key().to_bytes().hex(),
           "parts": {B.BACKNET: __import__("hashlib").sha256(back).hexdigest(), B.FRONTNET: "00", B.CLASSMAP: "00"}}
    raw = json.dumps(man).encode()
    try:
        B.read_public_bundle({B.MANIFEST: raw, B.SIGNATURE: _sign(mallory, raw), B.BACKNET: back})
    except Exception:
        pass
    assert not target.exists(), "the uploaded manifest made the host call os.makedirs"


@FUZZ
@given(st.binary(max_size=200) | st.recursive(
    st.none() | st.booleans() | st.integers(-2, 12) | st.text(max_size=4),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.sampled_from(["v", "permutation", "labels"]), c, max_size=3),
    max_leaves=12).map(lambda v: json.dumps(v).encode()))
def test_classmap_from_bytes_is_a_mapping_or_tampered(data):
    cm = _only((TamperedMessage,), ClassMapping.from_bytes, data)
    if cm is not None:
        assert sorted(cm.permutation) == list(range(cm.num_classes)) and len(cm.labels) == cm.num_classes


# ------------------------------------------------------------------------------------------- serve wire formats


@FUZZ
@given(st.binary(max_size=120) | st.builds(lambda n, opts, img: struct.pack(">H", n) + opts + img,
                                            st.integers(0, 70000).map(lambda n: n & 0xFFFF),
                                            st.sampled_from([b"{}", b'{"top_k":5}', b'{"top_k":0}', b'{"top_k":1e999}',
                                                             b'{"top_k":true}', b'{"top_k":"5"}', b"[]", b"null",
                                                             b'{"logits":[1]}', b"\xff", b'{"top_k":101}']),
                                            st.binary(max_size=20)))
def test_decode_payload_raises_only_documented_errors(payload):
    out = _only((TamperedMessage, DataError), protocol.decode_payload, payload)
    if out is not None:
        opts, img = out
        assert 1 <= opts["top_k"] <= protocol.MAX_TOP_K and isinstance(opts["logits"], bool)


def test_deeply_nested_request_options_are_a_data_error():
    with pytest.raises(DataError):
        protocol.decode_payload(struct.pack(">H", 4000) + b"[" * 4000)


@FUZZ
@given(st.binary(max_size=100) | st.builds(
    lambda idx, body: struct.pack(">I", len(idx)) + idx + body,
    st.recursive(st.none() | st.integers(-5, 20) | st.floats(allow_nan=False, allow_infinity=False)
                 | st.sampled_from(["manifest.json", "key_release", "x"]),
                 lambda c: st.lists(c, max_size=3), max_leaves=8).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=30)))
def test_unpack_parts_raises_only_data_error(body):
    allowed = {"manifest.json", "key_release"}
    parts = _only((DataError,), deploy.unpack_parts, body, allowed)
    if parts is not None:
        assert set(parts) <= allowed


def test_unpack_parts_with_infinite_size_is_a_data_error():
    idx = b'[["key_release",1e999]]'
    with pytest.raises(DataError):
        deploy.unpack_parts(struct.pack(">I", len(idx)) + idx, {"key_release"})


def test_unpack_parts_with_deep_index_is_a_data_error():
    idx = b"[" * 60000
    with pytest.raises(DataError):
        deploy.unpack_parts(struct.pack(">I", len(idx)) + idx, {"key_release"})


def test_pack_unpack_round_trip_and_reordering_attack():
    body = deploy.pack_parts({"manifest.json": b"M" * 5, "key_release": b"K" * 3})
    assert deploy.unpack_parts(body, {"manifest.json", "key_release"}) == {"manifest.json": b"M" * 5,
                                                                              "key_release": b"K" * 3}
    with pytest.raises(DataError):
        deploy.unpack_parts(body + b"x", {"manifest.json", "key_release"})
    with pytest.raises(DataError):
        deploy.unpack_parts(body, {"manifest.json"})


# ------------------------------------------------------------------------------------------- channel frames

_ATOM = (st.none() | st.booleans() | st.integers(-2, 2**31) | st.text(max_size=10)
         | st.sampled_from(["float32", "uint8", "bfloat16", "emla_1_ab", "emlo_2_cd", "../x"]))
_VALUE = st.recursive(_ATOM, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                      max_leaves=12)
_ITEMS = st.lists(st.lists(_VALUE, max_size=7) | _VALUE, max_size=4)
META = st.fixed_dictionaries({}, optional={"h": st.dictionaries(st.text(max_size=4), _VALUE, max_size=3) | _VALUE,
                                           "b": _ITEMS, "t": _ITEMS, "f": _ITEMS})


@FUZZ
@given(st.binary(max_size=200) | META.map(lambda v: json.dumps(v).encode())
       | st.builds(lambda n, shape, dtype: json.dumps({"t": [["x", dtype, shape, "emla_1_ab", 0, n]]}).encode(),
                   st.integers(0, 2**31), st.lists(st.integers(0, 2**20), max_size=9), st.sampled_from(["float32", "uint8"])))
def test_decode_meta_raises_only_channel_error(raw):
    out = _only((ChannelError,), frames.decode_meta, raw)
    if out is not None:
        header, blobs, tensors, frees = out
        assert isinstance(header, dict)
        assert sum(n for _, n in blobs) <= frames.MAX_BLOB_BYTES
        for name, dtype, shape, seg, off, nbytes in tensors:
            assert dtype in frames.DTYPES and frames.SEGMENT_NAME.match(seg) and 0 <= nbytes <= frames.MAX_TENSOR_BYTES


def test_decode_meta_deeply_nested_is_a_channel_error():
    with pytest.raises(ChannelError):
        frames.decode_meta(b"[" * 100_000)


@pytest.mark.parametrize("meta", [b'{"b":null}', b'{"t":5}', b'{"f":true}'])
def test_decode_meta_with_non_list_sections_is_a_channel_error(meta):
    with pytest.raises(ChannelError):
        frames.decode_meta(meta)


def _raw_frame(meta: dict, blob: bytes = b"") -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack(">I", len(raw)) + raw + blob


@pytest.fixture()
def pair():
    a, b = socket.socketpair()
    chan = transport.Channel(a, arena_bytes=1 << 16)
    yield chan, b
    chan.close()
    b.close()


@pytest.mark.parametrize("frame,why", [
    (struct.pack(">I", frames.MAX_META_BYTES + 1), "meta too large"),
    (_raw_frame({"t": [["x", "float32", [4], "emlo_nonexistent_1", 0, 16]]}), "missing segment"),
    (_raw_frame({"t": [["x", "float32", [4], "eml/../../etc", 0, 16]]}), "bad segment name"),
    (_raw_frame({"t": [["x", "complex64", [4], "emla_x", 0, 32]]}), "bad dtype"),
    (_raw_frame({"t": [["x", "float32", [4], "emla_x", 0, 15]]}), "size mismatch"),
    (_raw_frame({"b": [["a", -1]]}), "negative blob"),
    (_raw_frame({"b": [["a", frames.MAX_BLOB_BYTES + 1]]}), "blob too large"),
    (b"\x00\x00\x00\x02[]", "meta not an object"),
])
def test_channel_recv_refuses_malformed_frames(pair, frame, why):
    chan, peer = pair
    peer.sendall(frame)
    with pytest.raises(ChannelError):
        chan.recv()


def test_channel_recv_refuses_overflowing_shapes(pair):
    chan, peer = pair
    seg = arena.Arena(4096)
    try:
        peer.sendall(_raw_frame({"t": [["x", "float32", [2**40, 2**40, 0], seg.name, 0, 0]]}))
        with pytest.raises(ChannelError):
            chan.recv()
    finally:
        seg.close()


def test_channel_peer_cannot_read_outside_its_segment(pair):
    chan, peer = pair
    seg = arena.Arena(4096)
    try:
        peer.sendall(_raw_frame({"t": [["x", "uint8", [64], seg.name, 4096 - 32, 64]]}))
        with pytest.raises(ChannelError):
            chan.recv()
    finally:
        seg.close()


# ------------------------------------------------------------------------------------------- CalTrain uploads


@pytest.fixture(scope="module")
def ingest():
    from enclaveml.train.instances import InstanceIngest

    return InstanceIngest(HpkeKeyPair.generate(), b"d" * 32, b"t" * 32, PRE, 10)


@FUZZ
@given(st.binary(max_size=300) | st.builds(lambda body, img: b"CTI1" + body + img, st.binary(min_size=130, max_size=140),
                                             st.sampled_from([b"", b"\x89PNG", _png(4, 4)])))
def test_caltrain_upload_plaintext_garbage_is_refused(ingest, plain):
    from enclaveml.train.instances import UPLOAD_AAD, UPLOAD_INFO

    msg, _ = seal_request(ingest.hpke.public_bytes(), plain, UPLOAD_AAD, info=UPLOAD_INFO)
    _only((TamperedMessage, PolicyViolation, DataError, UserInputError), ingest.ingest, msg)
    _only((TamperedMessage,), ingest.ingest, msg[:-1])


def test_caltrain_upload_with_forged_fields_is_refused(ingest):
    from enclaveml.train.instances import make_upload

    alice, bob = SigningKey.generate(), SigningKey.generate()
    img = _png(32, 32)
    # a claimed participant id that is not the hash of the key
    from enclaveml.train.instances import participant_id

    _, up = make_upload(ingest.hpke.public_bytes(), alice, img, 3, claimed_pid=participant_id(bob.public_key()))
    with pytest.raises(PolicyViolation):
        ingest.ingest(up)
    # a label outside the model's classes, correctly signed
    _, up = make_upload(ingest.hpke.public_bytes(), alice, img, 10)
    with pytest.raises(DataError):
        ingest.ingest(up)
    # a good one goes through, and its sealed form opens only under its own tag
    _, up = make_upload(ingest.hpke.public_bytes(), alice, img, 3)
    acc = ingest.ingest(up)
    from enclaveml.train.instances import open_instance

    assert open_instance(b"d" * 32, acc.tag, acc.sealed).label == 3
    with pytest.raises(TamperedMessage):
        open_instance(b"d" * 32, "0" * 64, acc.sealed)


def test_all_documented_errors_share_the_base_class():
    for cls in (DataError, TamperedMessage, PolicyViolation, UserInputError):
        assert issubclass(cls, EnclaveMLError)


def _exif_warning_jpeg(tag: int = 0xBEEF) -> bytes:
    """A grey JPEG (Pillow decodes it) whose EXIF names tag `tag` with data past its end: Pillow
    warns "Tag data larger than file. Skipping tag 48879", a detail of the user's image."""
    g = io.BytesIO()
    Image.linear_gradient("L").resize((32, 32)).save(g, "JPEG")
    g = g.getvalue()
    i = g.index(b"\xff\xe0")
    g = g[:i] + g[i + 2 + int.from_bytes(g[i + 2:i + 4], "big"):]  # no JFIF segment
    tiff = (b"II*\x00\x08\x00\x00\x00" + (1).to_bytes(2, "little") + tag.to_bytes(2, "little") + b"\x02\x00"
            + (40).to_bytes(4, "little") + (200).to_bytes(4, "little"))
    app1 = b"Exif\x00\x00" + tiff
    return g[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + g[2:]


@pytest.mark.parametrize("quiet", [False, True])
def test_no_warning_about_a_users_image_reaches_the_enclave_workers_stderr(tmp_path, quiet):
    """An enclave worker's stderr is the host's log (review R8b): Pillow's warnings quote the
    image's EXIF tags. `runtime.enclave.main.quiet_warnings`, which every worker runs first, keeps
    them out, even under `-W error`; without it (the control) the tag number is printed."""
    path = tmp_path / "x.jpg"
    path.write_bytes(_exif_warning_jpeg())
    code = textwrap.dedent(f"""
        import sys
        from enclaveml.data.preprocess import Preprocessing, decode_array
        from enclaveml.runtime.enclave.main import quiet_warnings
        if {quiet}:
            quiet_warnings()
        data = open(sys.argv[1], "rb").read()
        print(decode_array(data, Preprocessing(size=(32, 32))).shape)
    """)
    flags = ["-W", "error"] if quiet else ["-W", "always"]
    r = subprocess.run([sys.executable, *flags, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(32, 32, 3)" in r.stdout
    assert ("48879" in r.stderr) is not quiet, r.stderr


def test_every_enclave_worker_quiets_warnings_before_it_reads_anything():
    """Serving's and CalTrain's workers both start in `run_worker`: the filter must come first."""
    import inspect

    from enclaveml.runtime.enclave import main

    src = inspect.getsource(main.run_worker)
    assert src.index("quiet_warnings()") < src.index("worker_channel_from_argv(")
    for module in ("enclaveml.serve.worker", "enclaveml.train.enclave_worker"):
        assert "run_worker(" in inspect.getsource(__import__(module, fromlist=["x"]))
