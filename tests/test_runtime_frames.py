"""The runtime's frame codec, without sockets: bytes in, events out (in the manner of h11's tests)."""

from __future__ import annotations

import json
import struct

import pytest

from enclaveml.runtime import frames as F
from enclaveml.runtime.errors import ChannelError


def _wire(header, blobs=None, tensors=None, frees=None, inline=None) -> bytes:
    return b"".join(bytes(b) for b in F.encode_frame(header, blobs, tensors, frees, inline))


def _raw(meta: dict, tail: bytes = b"") -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack(">I", len(raw)) + raw + tail


def test_one_frame_fed_whole():
    r = F.FrameReader()
    assert r.next_event() is F.NEED_DATA and r.bytes_wanted() == 4
    r.receive_data(_wire({"op": "x", "n": 1}, {"a": b"12", "e": b""}))
    ev = r.next_event()
    assert isinstance(ev, F.Frame) and ev.header == {"op": "x", "n": 1} and ev.blobs == {"a": b"12", "e": b""}
    assert ev.tensors == [] and ev.frees == [] and not ev.is_control
    assert r.next_event() is F.NEED_DATA


def test_partial_bytes_one_at_a_time_and_two_frames_in_one_buffer():
    t = [["x", "float32", [2], F.INLINE, 0, 8], ["s", "uint8", [3], "emla_1_ab", 64, 3]]
    data = _wire({"op": "a"}, {"b": b"xyz"}, t, None, [b"\x00" * 8]) + _wire({"op": "b"})
    r = F.FrameReader()
    events = []
    for i in range(len(data)):  # one byte at a time: every split point of both frames
        r.receive_data(data[i:i + 1])
        while (ev := r.next_event()) is not F.NEED_DATA:
            events.append(ev)
    assert [e.header["op"] for e in events] == ["a", "b"]
    a = events[0]
    assert a.blobs == {"b": b"xyz"} and bytes(a.inline) == b"\x00" * 8
    assert a.tensors[0] == F.TensorDesc("x", "float32", [2], "", 0, 8) and a.tensors[1].segment == "emla_1_ab"
    r2 = F.FrameReader()  # and all at once
    r2.receive_data(data)
    assert r2.next_event().header == {"op": "a"} and r2.next_event().header == {"op": "b"}


def test_bytes_wanted_names_each_part_and_a_whole_part_is_not_copied():
    """What the transport relies on: read exactly `bytes_wanted()`, and the codec keeps that buffer."""
    blob = bytearray(b"q" * 1000)
    parts = F.encode_frame({"op": "x"}, {"big": blob})
    meta = parts[0]
    r = F.FrameReader()
    wanted = []
    for chunk in (meta[:4], meta[4:], bytes(blob)):
        assert r.next_event() is F.NEED_DATA
        wanted.append(r.bytes_wanted())
        r.receive_data(chunk)
    assert wanted == [4, len(meta) - 4, 1000]
    assert r.next_event().blobs == {"big": bytes(blob)}
    inline = bytearray(64)
    r = F.FrameReader()
    r.receive_data(_wire({}, None, [["t", "uint8", [64], "", 0, 64]]))
    assert r.bytes_wanted() == 0 and r.next_event() is F.NEED_DATA and r.bytes_wanted() == 64
    r.receive_data(inline)
    assert r.next_event().inline.obj is inline  # the buffer as it came, no copy


def test_a_control_frame_is_told_apart():
    r = F.FrameReader()
    r.receive_data(F.free_frame([["emla_1_ab", 0], ["emla_1_ab", 64]]))
    ev = r.next_event()
    assert ev.is_control and ev.frees == [("emla_1_ab", 0), ("emla_1_ab", 64)]


@pytest.mark.parametrize("frame,why", [
    (struct.pack(">I", F.MAX_META_BYTES + 1), "too large"),
    (_raw({"h": {}, "b": [["a", -1]]}), "blob descriptor"),
    (_raw({"b": [["a", F.MAX_BLOB_BYTES + 1]]}), "blobs are too large"),
    (_raw({"t": [["x", "float32", [4], "emla_x", 0, 15]]}), "does not match"),
    (_raw({"t": [["x", "complex64", [4], "emla_x", 0, 32]]}), "tensor descriptor"),
    (_raw({"t": [["x", "float32", [4], "eml/../../etc", 0, 16]]}), "tensor descriptor"),
    (_raw({"t": [["x", "float32", [2**40, 2**40, 0], "emla_x", 0, 0]]}), "tensor descriptor"),
    (_raw({"t": [["x", "uint8", [4], "", 8, 4]]}), "tensor descriptor"),  # inline tensors have offset 0
    (_raw({"t": [["x", "uint8", [2**30], "", 0, 2**30]] * 2}), "tensors are too large"),
    (_raw({"f": [["emla_x"]]}), "free descriptor"),
    (struct.pack(">I", 2) + b"[]", "wrong shape"),
    (struct.pack(">I", 3) + b"\xff\xfe{", "not JSON"),
])
def test_malformed_frames_raise_a_clear_error_and_the_reader_stays_broken(frame, why):
    r = F.FrameReader()
    r.receive_data(frame)
    with pytest.raises(F.FrameError, match=why) as ei:
        r.next_event()
    assert isinstance(ei.value, ChannelError)
    r.receive_data(_wire({"op": "honest"}))  # a stream with a bad frame in it cannot be resynchronised
    with pytest.raises(F.FrameError, match=why):
        r.next_event()
    with pytest.raises(F.FrameError, match=why):  # the pull parser refuses it the same way
        F.read_frame(_Pull(frame + b"\x00" * 64))


class _Pull:
    """`read_exact` over a byte string, recording what was asked for."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.asked = data, 0, []

    def __call__(self, n: int) -> bytes:
        self.asked.append(n)
        if self.pos + n > len(self.data):
            raise EOFError
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def test_the_pull_parser_reads_each_part_once_and_agrees_with_the_reader():
    t = [["x", "float32", [2], F.INLINE, 0, 8], ["s", "uint8", [3], "emla_1_ab", 64, 3]]
    data = _wire({"op": "a"}, {"b": b"xyz", "c": b"!"}, t, [["emla_2_cd", 0]], [b"\x01" * 8]) + _wire({"op": "b"})
    pull = _Pull(data)
    a, b = F.read_frame(pull), F.read_frame(pull)
    r = F.FrameReader()
    r.receive_data(data)
    for got, want in ((a, r.next_event()), (b, r.next_event())):
        assert (got.header, got.blobs, got.tensors, got.frees) == (want.header, want.blobs, want.tensors, want.frees)
        assert bytes(got.inline or b"") == bytes(want.inline or b"")
    meta_a = len(F.encode_meta({"op": "a"}, {"b": b"xyz", "c": b"!"}, t, [["emla_2_cd", 0]])) - 4
    assert pull.asked == [4, meta_a, 4, 8, 4, len(data) - pull.asked[1] - 4 - 4 - 8 - 4]
    assert a.blobs == {"b": b"xyz", "c": b"!"} and bytes(a.inline) == b"\x01" * 8 and b.blobs == {}


def test_encoding_refuses_what_cannot_travel():
    with pytest.raises(F.FrameError, match="too large"):
        F.encode_meta({"x": "y" * F.MAX_META_BYTES}, {}, [], [])
    with pytest.raises(ValueError):
        F.encode_meta({"x": float("nan")}, {}, [], [])


def test_decode_meta_round_trip_is_pure():
    raw = F.encode_meta({"op": "x", "n": 1}, {"a": b"12"}, [["t", "float32", [2], "emla_1_ab", 0, 8]], [])
    header, blobs, tensors, frees = F.decode_meta(raw[4:])
    assert header == {"op": "x", "n": 1} and blobs == [("a", 2)] and tensors[0].name == "t" and frees == []
