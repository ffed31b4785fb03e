"""The channel's frame codec with no I/O (in the manner of h11): bytes in, events out; encode -> bytes.

Trust side: both (host and enclave each parse what the other sends). Pure: no socket, no shared
memory, no process. `transport.Channel` moves the bytes and file descriptors; this module says
what they mean and refuses any frame that does not parse, with `FrameError` (a `ChannelError`:
after one, the channel should be closed).

A frame on the wire:

    u32 big-endian  n = length of the meta JSON
    n bytes         meta = {"h": header, "b": [[name, nbytes]...],
                            "t": [[name, dtype, shape, segment, offset, nbytes]...],
                            "f": [[segment, offset]...]}        # "f": slots the peer may reuse
    sum(nbytes)     the blobs' bytes, in the order of "b"
    sum(nbytes)     the bytes of the inline tensors (segment ""), in the order of "t"

Receiving: `FrameReader.receive_data(bytes)` then `next_event()` -> a `Frame` or `NEED_DATA`.
`bytes_wanted()` says how many bytes finish the part being read; fed whole, a part is kept as it
is (no copy). A reader that raised `FrameError` stays broken (every later call raises again): a
stream with a bad frame in it cannot be resynchronised. `read_frame(read_exact)` is the same parse
pulled part by part from a function that returns exactly the bytes asked for: the transport's hot
path (one call per frame, no buffering, no copy beyond the blobs' own).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from ..crypto import loads_untrusted
from .errors import ChannelError

#: Largest meta JSON and largest total of blob bytes accepted in one frame.
MAX_META_BYTES = 1 << 20
MAX_BLOB_BYTES = 64 << 20
#: Largest tensor accepted in one frame (bytes).
MAX_TENSOR_BYTES = 1 << 30
#: Segment name of a tensor whose bytes follow the blobs on the socket (no shared memory).
INLINE = ""
#: Largest total of inline tensor bytes accepted in one frame.
MAX_INLINE_BYTES = 256 << 20
#: Largest tensor dimension and rank accepted from the peer.
MAX_DIM = 2**31
MAX_RANK = 8

LEN = struct.Struct(">I")
SEGMENT_NAME = re.compile(r"eml[0-9a-z_]{1,60}\Z")  # \Z: "$" would let a trailing newline in
#: Segment-name prefixes: a sender's arena (its fd travels once) and one-off segments (per frame).
ARENA_PREFIX = "emla"
ONE_OFF_PREFIX = "emlo"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ELSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

Header = dict[str, Any]


class FrameError(ChannelError):
    """The peer sent bytes that are not a valid frame (the message says which rule failed)."""


class TensorDesc(NamedTuple):
    """Where a tensor's bytes are: a shared-memory segment and offset, or inline (segment "")."""

    name: str
    dtype: str
    shape: list
    segment: str
    offset: int
    nbytes: int


@dataclass
class Frame:
    """One frame from the peer. `blobs` are bytes; `inline` holds the inline tensors' bytes (in
    descriptor order), `tensors` their descriptors; `frees` are slots of our arena the peer copied."""

    header: Header
    blobs: dict[str, bytes] = field(default_factory=dict)
    tensors: list[TensorDesc] = field(default_factory=list)
    frees: list[tuple[str, int]] = field(default_factory=list)
    inline: "memoryview | None" = None

    @property
    def is_control(self) -> bool:
        """A pure control frame: freed slots only, no message for the application."""
        return bool(self.frees) and not self.header and not self.blobs and not self.tensors


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: `FrameReader.next_event()` when more bytes must arrive first.
NEED_DATA = _NeedData()


# ---------------------------------------------------------------------------------------------
# Encoding.


def encode_meta(header: Header, blobs: dict[str, Any], tensor_descs: list, frees: list) -> bytes:
    """The length-prefixed meta JSON of one frame (blob bytes, then inline tensor bytes, follow it)."""
    meta: dict[str, Any] = {"h": header}
    if blobs:
        meta["b"] = [[name, len(b)] for name, b in blobs.items()]
    if tensor_descs:
        meta["t"] = tensor_descs
    if frees:
        meta["f"] = frees
    raw = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_META_BYTES:
        raise FrameError("frame header is too large")
    return LEN.pack(len(raw)) + raw


def encode_frame(header: Header, blobs: "dict[str, Any] | None" = None, tensor_descs: list | None = None,
                 frees: list | None = None, inline: list | None = None) -> list:
    """A whole frame as the buffers to write in order (meta, blobs, inline tensor bytes): for a
    scatter-gather send, so the payload is never joined into one copy."""
    blobs = blobs or {}
    return [encode_meta(header, blobs, tensor_descs or [], frees or []), *blobs.values(), *(inline or [])]


def free_frame(slots: list) -> bytes:
    """A control frame handing arena slots [[segment, offset]...] back to their sender."""
    return encode_meta({}, {}, [], slots)


# ---------------------------------------------------------------------------------------------
# Decoding.


def _check_tensor(d: Any) -> TensorDesc:
    if not isinstance(d, list) or len(d) != 6:
        raise FrameError("bad tensor descriptor")
    name, dtype, shape, seg, off, nbytes = d
    if (not isinstance(name, str) or not isinstance(dtype, str) or dtype not in DTYPES
            or not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(s) is int and 0 <= s < MAX_DIM for s in shape)
            or not isinstance(seg, str) or type(off) is not int or off < 0
            or not (SEGMENT_NAME.match(seg) or (seg == INLINE and off == 0))
            or type(nbytes) is not int or nbytes < 0 or nbytes > MAX_TENSOR_BYTES):
        raise FrameError("bad tensor descriptor")
    numel, span = 1, 1
    for s in shape:
        numel *= s
        span *= max(s, 1)  # bounds the shape even when a zero dim makes numel 0
    elsize = _ELSIZE[dtype]
    if numel * elsize != nbytes:
        raise FrameError("tensor descriptor size does not match its shape")
    if span * elsize > MAX_TENSOR_BYTES:
        raise FrameError("tensor descriptor shape is too large")
    return TensorDesc(name, dtype, shape, seg, off, nbytes)


def decode_meta(raw: "bytes | bytearray | memoryview"
                ) -> tuple[Header, list[tuple[str, int]], list[TensorDesc], list[tuple[str, int]]]:
    """Parse and validate a meta JSON from the peer: (header, blob sizes, tensor descs, frees)."""
    try:
        meta = loads_untrusted(raw, max_bytes=MAX_META_BYTES)
    except ValueError:
        raise FrameError("frame header is not JSON") from None
    if (not isinstance(meta, dict) or not isinstance(meta.get("h", {}), dict)
            or not all(isinstance(meta.get(k, []), list) for k in ("b", "t", "f"))):
        raise FrameError("frame header has the wrong shape")
    blobs = []
    total = 0
    for item in meta.get("b", []):
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or type(item[1]) is not int or item[1] < 0):
            raise FrameError("bad blob descriptor")
        total += item[1]
        blobs.append((item[0], item[1]))
    if total > MAX_BLOB_BYTES:
        raise FrameError("frame blobs are too large")
    tensors = [_check_tensor(d) for d in meta.get("t", [])]
    if sum(d.nbytes for d in tensors if d.segment == INLINE) > MAX_INLINE_BYTES:
        raise FrameError("frame tensors are too large")
    frees = []
    for f in meta.get("f", []):
        if not isinstance(f, list) or len(f) != 2 or not isinstance(f[0], str) or type(f[1]) is not int:
            raise FrameError("bad free descriptor")
        frees.append((f[0], f[1]))
    return meta.get("h", {}), blobs, tensors, frees


def frame_length(prefix: "bytes | bytearray | memoryview") -> int:
    """The meta length a frame's 4-byte prefix announces (checked against the limit)."""
    (n,) = LEN.unpack(prefix)
    if n > MAX_META_BYTES:
        raise FrameError("frame header is too large")
    return n


def split_blobs(raw: "bytes | bytearray | memoryview", sizes: list[tuple[str, int]]) -> dict[str, bytes]:
    """The named blobs out of their concatenated bytes (one copy each, into `bytes`)."""
    view, blobs, pos = memoryview(raw), {}, 0
    for name, size in sizes:
        blobs[name] = bytes(view[pos:pos + size])
        pos += size
    return blobs


def inline_bytes(tensors: list[TensorDesc]) -> int:
    """How many bytes of inline tensors follow the blobs."""
    return sum(d.nbytes for d in tensors if d.segment == INLINE)


def read_frame(read_exact: "Callable[[int], bytes | bytearray | memoryview]") -> Frame:
    """One frame, pulled part by part from `read_exact(n)` (which returns exactly n bytes, or
    raises). The same parse as `FrameReader`, for a transport that reads exactly what each part
    needs: each part is one buffer, kept as it came (no copy beyond the blobs' own)."""
    n = frame_length(read_exact(LEN.size))
    header, sizes, tensors, frees = decode_meta(read_exact(n))
    need = sum(size for _, size in sizes)
    blobs = split_blobs(read_exact(need), sizes) if need else {name: b"" for name, _ in sizes}
    need = inline_bytes(tensors)
    return Frame(header, blobs, tensors, frees, memoryview(read_exact(need)) if need else None)


# States of the reader: which part of a frame it reads next.
_PREFIX, _META, _BLOBS, _INLINE, _BROKEN = range(5)


class FrameReader:
    """Incremental frame parser: `receive_data` bytes as they come, `next_event` for frames."""

    def __init__(self) -> None:
        self._parts: list = []  # received bytes not yet consumed, in order
        self._have = 0
        self._state = _PREFIX
        self._error: FrameError | None = None
        self._frame: Frame | None = None
        self._blob_sizes: list[tuple[str, int]] = []
        self._need = LEN.size

    def receive_data(self, data: "bytes | bytearray | memoryview") -> None:
        """More bytes from the peer (kept by reference: do not reuse the buffer)."""
        if len(data):
            self._parts.append(data)
            self._have += len(data)

    def bytes_wanted(self) -> int:
        """Bytes still missing before `next_event` can make progress (0 once it can)."""
        return max(0, self._need - self._have)

    def _take(self, n: int) -> "bytes | bytearray | memoryview":
        """The next `n` received bytes; the first part as it is when it is exactly that long."""
        if n == 0:
            return b""
        self._have -= n
        first = self._parts[0]
        if len(first) == n:
            return self._parts.pop(0)
        if len(first) > n:
            view = memoryview(first)
            self._parts[0] = view[n:]
            return view[:n]
        out = bytearray(n)
        got = 0
        while got < n:
            part = self._parts[0]
            k = min(len(part), n - got)
            out[got:got + k] = memoryview(part)[:k]
            got += k
            if k == len(part):
                self._parts.pop(0)
            else:
                self._parts[0] = memoryview(part)[k:]
        return out

    def next_event(self) -> "Frame | _NeedData":
        """The next complete frame, or NEED_DATA. Raises `FrameError` for a malformed frame."""
        if self._error is not None:
            raise self._error
        try:
            return self._advance()
        except FrameError as e:
            self._state, self._error = _BROKEN, e
            self._parts, self._have = [], 0
            raise

    def _advance(self) -> "Frame | _NeedData":
        while self._have >= self._need:
            if self._state == _PREFIX:
                self._state, self._need = _META, frame_length(self._take(LEN.size))
            elif self._state == _META:
                header, self._blob_sizes, tensors, frees = decode_meta(self._take(self._need))
                self._frame = Frame(header, {}, tensors, frees)
                self._state, self._need = _BLOBS, sum(n for _, n in self._blob_sizes)
            elif self._state == _BLOBS:
                frame = self._frame
                assert frame is not None
                frame.blobs = split_blobs(self._take(self._need), self._blob_sizes)
                self._state, self._need = _INLINE, inline_bytes(frame.tensors)
            elif self._state == _INLINE:
                frame = self._frame
                assert frame is not None
                if self._need:
                    frame.inline = memoryview(self._take(self._need))
                self._frame, self._blob_sizes = None, []
                self._state, self._need = _PREFIX, LEN.size
                return frame
        return NEED_DATA
