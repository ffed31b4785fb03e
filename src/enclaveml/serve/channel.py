"""A local channel between a host process and its enclave worker process: JSON + bytes + tensors.

Trust side: both (host and enclave each hold one end). Generic: Infenclave serving and the
CalTrain training enclave both use it; it knows nothing about models or cryptography.

Why not `multiprocessing` queues: they pickle, and unpickling bytes from the other trust side runs
code. Here a message is a JSON header, named raw byte blobs, and named tensors whose bytes travel
through shared memory (only name, dtype, shape and place travel on the socket).

Frame on the socket (one `socket.socketpair`, SOCK_STREAM, inherited by the worker as an fd):

    u32 big-endian  n = length of the meta JSON
    n bytes         meta = {"h": header, "b": [[name, nbytes]...],
                            "t": [[name, dtype, shape, segment, offset, nbytes]...],
                            "f": [[segment, offset]...]}        # "f": slots the peer may reuse
    sum(nbytes)     the blobs' bytes, in the order of "b"

Tensors: each side owns one shared-memory *arena* (created on its first tensor send) that it writes
outgoing tensors into (first-fit allocation, 64-byte aligned). The receiver copies a tensor out in
`recv()` and at once sends a small control frame ("f") so the sender can reuse the slot. If the
arena is full (or a tensor is larger than it) the sender uses a one-off segment that the receiver
maps, copies and drops, so a send never blocks waiting for the peer. Received tensors are private
copies: the sender may overwrite its arena at once, and the receiver validates after copying, so
the peer cannot change a tensor under the receiver's feet.

Segments are anonymous (`memfd_create`), never names in /dev/shm: their fds travel with the
frame that first refers to them (SCM_RIGHTS ancillary data on the socket; an arena's once, a
one-off's with its frame), in the order the tensor descriptors first name them, so a segment's
memory goes when the last process mapping it exits, however it exits (SIGKILL included; security
review F-34). The sender seals each segment (no shrink, no grow); the receiver maps only sealed
memfds, read-only, so the peer cannot make a read fault by truncating it. Segment names in
descriptors ("emla_..." arenas, "emlo_..." one-offs) are labels within the channel.

Without shared memory (`Channel(use_shm=False)`: enclaves that cannot map host memory, reached
over a socket path with `spawn_enclave_worker_at`), a tensor's segment is "" and its bytes follow
the blobs on the socket, in descriptor order. A receiver accepts both forms. With shared memory,
a tensor under `inline_below` bytes (default `INLINE_BELOW`, 64 KiB: a request's IR rows and
scores) travels inline too: the same two copies, and no slot to free, so no control frame back.

Every field from the peer is checked (sizes, dtypes, segment names, bounds); a malformed frame
raises `ChannelError` and the channel should be closed.

Request/reply: `ChannelClient.call()` tags a header with an id and returns a Future resolved by a
reader thread, so many requests can be in flight; `serve_channel()` is the worker-side loop that
runs a handler on a thread pool and replies with the same id. An `EnclaveMLError` raised by the
handler travels back as {"error": class name, "message": text} and is raised again by the caller's
Future as the same class (only classes of `enclaveml.errors`; anything else is "InternalError",
whose message is not sent).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import array
import fcntl
import mmap
import stat
from typing import Any, Callable

import numpy as np
import torch

from .. import errors as _errors
from ..crypto import loads_untrusted

#: Largest meta JSON and largest total of blob bytes accepted in one frame.
MAX_META_BYTES = 1 << 20
MAX_BLOB_BYTES = 64 << 20
#: Largest tensor accepted in one frame (bytes).
MAX_TENSOR_BYTES = 1 << 30
DEFAULT_ARENA_BYTES = 16 << 20
#: Tensors smaller than this travel inline on the socket even with shared memory: the same two
#: copies, but no arena slot and no "free" control frame back (an extra wake-up of the peer).
INLINE_BELOW = 64 << 10
#: Segment name of a tensor whose bytes follow the blobs on the socket (no shared memory).
INLINE = ""
#: Largest total of inline tensor bytes accepted in one frame.
MAX_INLINE_BYTES = 256 << 20
ALIGN = 64

_LEN = struct.Struct(">I")
_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)
_SEGMENT_NAME = re.compile(r"eml[0-9a-z_]{1,60}\Z")  # \Z: "$" would let a trailing newline in
#: Largest tensor dimension accepted from the peer.
MAX_DIM = 2**31
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

Header = dict[str, Any]
Message = tuple[Header, dict[str, torch.Tensor], dict[str, bytes]]


class ChannelError(ConnectionError):
    """The peer sent a malformed frame, or the channel is closed."""


class ChannelClosed(ChannelError):
    """The other end closed the channel (or its process died)."""


# ---------------------------------------------------------------------------------------------
# Shared memory: attach without the resource tracker, and the sender's arena.


def _segment_name(kind: str) -> str:
    return f"eml{kind}_{os.getpid()}_{os.urandom(6).hex()}"


#: Seals a segment must carry before the receiver maps it: it can never shrink under the reader
#: (a shrunk mapping would fault, SIGBUS, on read) nor have its seals removed.
_REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
#: File descriptors one frame may carry (its one-off segments and at most one arena).
MAX_FDS_PER_FRAME = 64
#: Distinct arenas a peer may announce over a channel's life (an honest peer has one).
MAX_PEER_ARENAS = 4


class Segment:
    """An anonymous shared-memory segment (memfd): it has no name in /dev/shm, so nothing
    outlives the processes that map it, whichever of them is killed. Its fd travels to the peer
    over the Unix socket (SCM_RIGHTS), sealed against shrinking and growing."""

    def __init__(self, size: int, kind: str):
        self.name = _segment_name(kind)  # a label inside frames only, never a file name
        self.size = max(int(size), 1)
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.buf = memoryview(self.map)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        self.buf.release()
        try:
            self.map.close()
        except BufferError:  # a view is still exported: the mapping goes with it
            pass


def _map_peer_fd(fd: int) -> mmap.mmap:
    """Map a segment fd from the peer read-only, after checking it is a sealed regular file."""
    try:
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # EINVAL for anything but a memfd
        except OSError:
            raise ChannelError("peer's shared-memory segment is not a memfd") from None
        if not stat.S_ISREG(st.st_mode) or seals & _REQUIRED_SEALS != _REQUIRED_SEALS or st.st_size < 1:
            raise ChannelError("peer's shared-memory segment is not a sealed memfd")
        try:
            return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError:
            raise ChannelError("peer's shared-memory segment cannot be mapped") from None
    finally:
        os.close(fd)


class _Arena:
    """One shared-memory segment the sender carves tensor slots from (first-fit, coalescing)."""

    def __init__(self, size: int):
        self.size = size
        self.shm = Segment(size, "a")
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()
        #: Whether the peer has this arena's fd (it travels with the first frame that uses it).
        self.announced = False

    @property
    def name(self) -> str:
        return self.shm.name

    def alloc(self, n: int) -> int | None:
        n = max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                if length >= n:
                    if length == n:
                        del self._free[i]
                    else:
                        self._free[i] = (off + n, length - n)
                    self._used[off] = n
                    return off
        return None

    def free(self, off: int) -> None:
        with self._lock:
            n = self._used.pop(off, None)
            if n is None:
                return  # unknown or already freed: ignore (the peer cannot make us double-free)
            self._free.append((off, n))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for o, length in self._free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + length)
                else:
                    merged.append((o, length))
            self._free = merged

    def in_use(self) -> int:
        with self._lock:
            return sum(self._used.values())

    def close(self) -> None:
        self.shm.close()


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 numpy array (no copy when already so)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------
# Pure framing.


def encode_meta(header: Header, blobs: dict[str, bytes], tensor_descs: list[list], frees: list[list]) -> bytes:
    """The length-prefixed meta JSON of one frame (blob bytes follow it on the wire)."""
    meta: dict[str, Any] = {"h": header}
    if blobs:
        meta["b"] = [[name, len(b)] for name, b in blobs.items()]
    if tensor_descs:
        meta["t"] = tensor_descs
    if frees:
        meta["f"] = frees
    raw = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_META_BYTES:
        raise ChannelError("frame header is too large")
    return _LEN.pack(len(raw)) + raw


def decode_meta(raw: bytes) -> tuple[Header, list[tuple[str, int]], list[list], list[tuple[str, int]]]:
    """Parse and validate a meta JSON from the peer: (header, blob sizes, tensor descs, frees)."""
    try:
        meta = loads_untrusted(raw, max_bytes=MAX_META_BYTES)
    except ValueError:
        raise ChannelError("frame header is not JSON") from None
    if (not isinstance(meta, dict) or not isinstance(meta.get("h", {}), dict)
            or not all(isinstance(meta.get(k, []), list) for k in ("b", "t", "f"))):
        raise ChannelError("frame header has the wrong shape")
    blobs = []
    total = 0
    for item in meta.get("b", []):
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or type(item[1]) is not int or item[1] < 0):
            raise ChannelError("bad blob descriptor")
        total += item[1]
        blobs.append((item[0], item[1]))
    if total > MAX_BLOB_BYTES:
        raise ChannelError("frame blobs are too large")
    tensors = []
    for d in meta.get("t", []):
        if not isinstance(d, list) or len(d) != 6:
            raise ChannelError("bad tensor descriptor")
        name, dtype, shape, seg, off, nbytes = d
        if (not isinstance(name, str) or not isinstance(dtype, str) or dtype not in _DTYPES
                or not isinstance(shape, list) or len(shape) > 8
                or not all(type(s) is int and 0 <= s < MAX_DIM for s in shape)
                or not isinstance(seg, str) or type(off) is not int or off < 0
                or not (_SEGMENT_NAME.match(seg) or (seg == INLINE and off == 0))
                or type(nbytes) is not int or nbytes < 0 or nbytes > MAX_TENSOR_BYTES):
            raise ChannelError("bad tensor descriptor")
        numel, span = 1, 1
        for s in shape:
            numel *= s
            span *= max(s, 1)  # bounds the shape even when a zero dim makes numel 0
        elsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if numel * elsize != nbytes:
            raise ChannelError("tensor descriptor size does not match its shape")
        if span * elsize > MAX_TENSOR_BYTES:
            raise ChannelError("tensor descriptor shape is too large")
        tensors.append(d)
    frees = []
    for f in meta.get("f", []):
        if not isinstance(f, list) or len(f) != 2 or not isinstance(f[0], str) or type(f[1]) is not int:
            raise ChannelError("bad free descriptor")
        frees.append((f[0], f[1]))
    return meta.get("h", {}), blobs, tensors, frees


# ---------------------------------------------------------------------------------------------
# The channel: moves frames over a socket, tensors through shared memory.


class Channel:
    """One end of a host <-> enclave channel. `send` is thread-safe; call `recv` from one thread."""

    def __init__(self, sock: socket.socket, arena_bytes: int = DEFAULT_ARENA_BYTES, use_shm: bool = True,
                 inline_below: int = INLINE_BELOW):
        self.sock = sock
        self.use_shm = bool(use_shm)
        self.inline_below = int(inline_below)
        self.arena_bytes = int(arena_bytes)
        self._arena: _Arena | None = None
        self._peer_segments: dict[str, mmap.mmap] = {}  # the peer's arenas, mapped read-only
        self._fds: list[int] = []  # segment fds received with the frame being read
        self._send_lock = threading.Lock()
        self._arena_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_fd(cls, fd: int, arena_bytes: int = DEFAULT_ARENA_BYTES, use_shm: bool = True) -> "Channel":
        """The worker's end: wrap the socket fd inherited from `spawn_enclave_worker`."""
        return cls(socket.socket(fileno=fd), arena_bytes, use_shm)

    @classmethod
    def connect(cls, path: str, arena_bytes: int = DEFAULT_ARENA_BYTES, use_shm: bool = True) -> "Channel":
        """The worker's end when it cannot inherit an fd (e.g. under Gramine): connect to `path`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, arena_bytes, use_shm)

    # -- sending --------------------------------------------------------------------------------

    def _get_arena(self) -> _Arena:
        with self._arena_lock:
            if self._arena is None:
                self._arena = _Arena(self.arena_bytes)
            return self._arena

    def _place(self, name: str, t: torch.Tensor, one_offs: dict[str, Segment]) -> list:
        if t.dtype not in _DTYPE_NAMES:
            raise ChannelError(f"tensor {name!r}: dtype {t.dtype} cannot travel on the channel")
        src = _tensor_bytes(t)
        n = src.nbytes
        arena = self._get_arena()
        off = arena.alloc(n) if n <= arena.size else None
        if off is not None:
            arena.shm.buf[off:off + n] = src
            seg = arena.name
        else:  # arena full: a one-off segment that travels with this frame only
            one = Segment(n, "o")
            try:
                one.buf[:n] = src
            except BaseException:
                one.close()
                raise
            one_offs[one.name] = one
            seg, off = one.name, 0
        return [name, _DTYPE_NAMES[t.dtype], list(t.shape), seg, off, n]

    def send(self, header: Header, tensors: dict[str, torch.Tensor] | None = None,
             blobs: dict[str, bytes] | None = None) -> None:
        """Send one message. Tensors go through shared memory; blobs and header on the socket."""
        blobs = {k: (v if isinstance(v, (bytes, bytearray, memoryview)) else bytes(v)) for k, v in (blobs or {}).items()}
        if self.use_shm:
            one_offs: dict[str, Segment] = {}
            try:
                descs, inline = [], []
                for name, t in (tensors or {}).items():
                    if t.dtype in _DTYPE_NAMES and t.numel() * t.element_size() < self.inline_below:
                        src = _tensor_bytes(t)
                        descs.append([name, _DTYPE_NAMES[t.dtype], list(t.shape), INLINE, 0, src.nbytes])
                        inline.append(src)
                    else:
                        descs.append(self._place(name, t, one_offs))
                self._send_frame(encode_meta(header, blobs, descs, []), list(blobs.values()) + inline, descs, one_offs)
            finally:
                for one in one_offs.values():  # the peer has its own fd (or never will): unmap ours
                    one.close()
            return
        descs, inline = [], []  # no shared memory: tensor bytes follow the blobs on the socket
        for name, t in (tensors or {}).items():
            if t.dtype not in _DTYPE_NAMES:
                raise ChannelError(f"tensor {name!r}: dtype {t.dtype} cannot travel on the channel")
            src = _tensor_bytes(t)
            descs.append([name, _DTYPE_NAMES[t.dtype], list(t.shape), INLINE, 0, src.nbytes])
            inline.append(src)
        self._send_frame(encode_meta(header, blobs, descs, []), list(blobs.values()) + inline)

    def _send_frame(self, meta: bytes, blobs: list, descs: list | None = None,
                    one_offs: "dict[str, Segment] | None" = None) -> None:
        """Meta and blobs in as few syscalls as the kernel allows (scatter-gather `sendmsg`); the
        fds of the segments the peer does not have yet ride on the first call (SCM_RIGHTS), in
        the order the descriptors first name them (`_bind_fds` on the other side)."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        views = [memoryview(meta)] + [memoryview(b).cast("B") for b in blobs if len(b)]
        with self._send_lock:
            fds: list[int] = []
            for seg in dict.fromkeys(d[3] for d in descs or ()):
                if one_offs and seg in one_offs:
                    fds.append(one_offs[seg].fd)
                elif self._arena is not None and seg == self._arena.name and not self._arena.announced:
                    fds.append(self._arena.shm.fd)
                    self._arena.announced = True  # under the send lock: the first frame to go carries it
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            try:
                while views:
                    try:
                        sent = self.sock.sendmsg(views[:_IOV_MAX], anc)
                        anc = []
                    except BlockingIOError:  # an event loop polling this socket made it non-blocking
                        select.select([], [self.sock], [], 1.0)
                        continue
                    while sent and views:
                        if sent >= len(views[0]):
                            sent -= len(views[0])
                            views.pop(0)
                        else:
                            views[0] = views[0][sent:]
                            sent = 0
            except OSError as e:
                raise ChannelClosed(f"channel send failed ({type(e).__name__})") from None

    # -- receiving ------------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        anc_size = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4)
        while got < n:
            try:
                k, anc, flags, _ = self.sock.recvmsg_into([view[got:]], anc_size, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:  # non-blocking (polled by an event loop): the rest is coming
                select.select([self.sock], [], [], 1.0)
                continue
            except OSError as e:
                raise ChannelClosed(f"channel receive failed ({type(e).__name__})") from None
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise ChannelError("peer sent more file descriptors than a frame may carry")
            if k == 0:
                raise ChannelClosed("the peer closed the channel")
            got += k
        return buf

    def _drop_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _bind_fds(self, tdescs: list) -> dict[str, mmap.mmap]:
        """Map the segments this frame brought: each segment the descriptors name (in order of
        first mention) that is not a known arena takes the next fd. Returns the one-offs."""
        one_offs: dict[str, mmap.mmap] = {}
        for seg in dict.fromkeys(d[3] for d in tdescs if d[3] != INLINE):
            if seg in self._peer_segments:
                continue
            if not self._fds:
                raise ChannelError("tensor refers to a missing shared-memory segment")
            m = _map_peer_fd(self._fds.pop(0))
            if seg.startswith("emla"):
                if len(self._peer_segments) >= MAX_PEER_ARENAS:
                    m.close()
                    raise ChannelError("peer announced too many arenas")
                self._peer_segments[seg] = m
            else:
                one_offs[seg] = m
        return one_offs

    def _take_tensor(self, desc: list, one_offs: dict[str, mmap.mmap]) -> torch.Tensor:
        name, dtype, shape, seg, off, nbytes = desc
        m = self._peer_segments.get(seg) or one_offs.get(seg)
        if m is None:
            raise ChannelError("tensor refers to a missing shared-memory segment")
        if off + nbytes > len(m):
            raise ChannelError("tensor lies outside its shared-memory segment")
        out = torch.empty(shape, dtype=_DTYPES[dtype])
        if nbytes:
            dst = out.reshape(-1).view(torch.uint8).numpy()
            dst[:] = np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=off)
        return out

    def recv(self) -> Message:
        """Receive the next message: (header, tensors, blobs). Raises `ChannelClosed` at EOF."""
        while True:
            msg = self.recv_frame()
            if msg is not None:
                return msg

    def recv_frame(self) -> Message | None:
        """Receive one frame: a message, or None for a pure control frame (freed slots).

        For an event loop that reads when the socket is readable: one call per readiness event
        never waits for a second frame."""
        try:
            return self._recv_frame()
        finally:
            self._drop_fds()  # fds this frame carried but did not use (or a refused frame's)

    def _recv_frame(self) -> Message | None:
        (n,) = _LEN.unpack(self._recv_exact(_LEN.size))
        if n > MAX_META_BYTES:
            raise ChannelError("frame header is too large")
        header, blob_sizes, tdescs, frees = decode_meta(bytes(self._recv_exact(n)))
        for seg, off in frees:
            if self._arena is not None and seg == self._arena.name:
                self._arena.free(off)
        raw = memoryview(self._recv_exact(sum(size for _, size in blob_sizes)))  # one read for all
        blobs, pos = {}, 0
        for name, size in blob_sizes:
            blobs[name] = bytes(raw[pos:pos + size])
            pos += size
        if not tdescs:
            if frees and not header and not blobs:
                return None  # a pure control frame
            return header, {}, blobs
        inline_total = sum(d[5] for d in tdescs if d[3] == INLINE)
        if inline_total > MAX_INLINE_BYTES:
            raise ChannelError("frame tensors are too large")
        inline = memoryview(self._recv_exact(inline_total)) if inline_total else None
        tensors, ipos = {}, 0
        one_offs: dict[str, mmap.mmap] = {}
        try:
            one_offs = self._bind_fds(tdescs)
            for d in tdescs:
                if d[3] == INLINE:
                    out = torch.empty(d[2], dtype=_DTYPES[d[1]])
                    if d[5]:
                        out.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(inline, np.uint8, d[5], ipos)
                    ipos += d[5]
                    tensors[d[0]] = out
                else:
                    tensors[d[0]] = self._take_tensor(d, one_offs)
        finally:
            for m in one_offs.values():
                m.close()
            done = [[d[3], d[4]] for d in tdescs if d[3].startswith("emla")]
            if done:
                try:
                    self._send_frame(encode_meta({}, {}, [], done), [])
                except ChannelClosed:
                    pass
        return header, tensors, blobs

    # -- lifetime -------------------------------------------------------------------------------

    def arena_in_use(self) -> int:
        """Bytes of this side's arena still waiting for the peer to copy them (for tests/metrics)."""
        return self._arena.in_use() if self._arena is not None else 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for m in self._peer_segments.values():
            try:
                m.close()
            except BufferError:
                pass
        self._peer_segments.clear()
        self._drop_fds()
        if self._arena is not None:
            self._arena.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn_enclave_worker(module: str, args: list[str], env: dict[str, str] | None = None,
                         arena_bytes: int = DEFAULT_ARENA_BYTES) -> tuple[subprocess.Popen, Channel]:
    """Start `python -m module --channel-fd FD *args` connected to the returned Channel.

    The worker finds its end with `Channel.from_fd(int(fd))` (see `channel_fd_from_argv`). The
    worker is a separate process (its own address space), never a fork of the host.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = child.fileno()
        proc = subprocess.Popen([sys.executable, "-m", module, "--channel-fd", str(fd), *args],
                                pass_fds=(fd,), env=env, close_fds=True)
    finally:
        child.close()
    return proc, Channel(parent, arena_bytes)


def spawn_enclave_worker_at(path: str, argv: list[str] | None = None, env: dict[str, str] | None = None,
                            launch=None, timeout_s: float = 120.0, use_shm: bool = False
                            ) -> tuple[subprocess.Popen, Channel]:
    """Listen on the Unix socket `path`, start the worker, accept its connection.

    For workers that cannot inherit an fd (Gramine: its manifest fixes argv and the worker runs
    `--channel-path PATH`). Either `argv` (run as a subprocess) or `launch()` (returns a Popen,
    e.g. `tee.gramine.build_and_launch`). Shared memory is off by default here: an enclave that
    cannot inherit fds usually cannot map host shared memory either, so tensors go inline.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path):
            os.unlink(path)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.settimeout(timeout_s)
        proc = launch() if launch is not None else subprocess.Popen(list(argv or []), env=env, close_fds=True)
        try:
            conn, _ = listener.accept()
        except OSError:
            proc.kill()
            raise ChannelClosed(f"the enclave worker did not connect to {path} in {timeout_s:.0f} s") from None
        conn.settimeout(None)
        return proc, Channel(conn, use_shm=use_shm)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def worker_channel_from_argv(argv: list[str]) -> tuple[Channel, list[str]]:
    """A worker's channel from `--channel-fd FD` or `--channel-path PATH` (`--no-shm`: inline
    tensors), and the other arguments."""
    argv = list(argv)
    shm = "--no-shm" not in argv
    argv = [a for a in argv if a != "--no-shm"]
    if "--channel-path" in argv:
        i = argv.index("--channel-path")
        return Channel.connect(argv[i + 1], use_shm=shm), argv[:i] + argv[i + 2:]
    fd, rest = channel_fd_from_argv(argv)
    return Channel.from_fd(fd, use_shm=shm), rest


# ---------------------------------------------------------------------------------------------
# Request/reply on top of a channel.


def _error_reply(rid: Any, e: BaseException) -> Header:
    if isinstance(e, _errors.EnclaveMLError):
        return {"id": rid, "error": type(e).__name__, "message": str(e)}
    return {"id": rid, "error": "InternalError", "message": "internal error in the worker"}


class RemoteError(RuntimeError):
    """The worker failed with an error that is not one of `enclaveml.errors` (details withheld)."""


def raise_remote(header: Header) -> None:
    """Re-raise the error a reply carries as its own `enclaveml.errors` class."""
    kind = header.get("error")
    if kind is None:
        return
    cls = getattr(_errors, str(kind), None)
    msg = str(header.get("message", ""))[:500]
    if isinstance(cls, type) and issubclass(cls, _errors.EnclaveMLError):
        raise cls(msg)
    raise RemoteError(msg or str(kind))


class ChannelClient:
    """Caller side: `call()` sends a request and returns a Future of the reply (many in flight).

    Replies are read by a thread of its own, or, given `loop`, by that asyncio event loop when the
    socket is readable: a reply then reaches the coroutine awaiting it without waking another
    thread first (one hand-off less per call on the serving path; blocking `request()` from
    other threads still works).
    """

    def __init__(self, channel: Channel, on_unsolicited: Callable[[Message], None] | None = None,
                 loop: "asyncio.AbstractEventLoop | None" = None):
        self.channel = channel
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._on_unsolicited = on_unsolicited
        self.closed: BaseException | None = None
        self._loop = loop
        self._reader: threading.Thread | None = None
        if loop is None:
            self._reader = threading.Thread(target=self._read_loop, name="channel-reader", daemon=True)
            self._reader.start()
        else:
            loop.call_soon_threadsafe(loop.add_reader, channel.sock.fileno(), self._on_readable)

    def call(self, header: Header, tensors: dict[str, torch.Tensor] | None = None,
             blobs: dict[str, bytes] | None = None) -> "Future[Message]":
        fut: Future = Future()
        rid = next(self._ids)
        with self._lock:
            if self.closed is not None:
                fut.set_exception(ChannelClosed("the enclave channel is closed"))
                return fut
            self._pending[rid] = fut
        try:
            self.channel.send({**header, "id": rid}, tensors, blobs)
        except BaseException as e:
            with self._lock:
                self._pending.pop(rid, None)
            fut.set_exception(e)
        return fut

    def request(self, header: Header, tensors: dict[str, torch.Tensor] | None = None,
                blobs: dict[str, bytes] | None = None, timeout: float | None = 60.0) -> Message:
        """Blocking `call`: the reply, or the worker's error raised as its own class."""
        return self.call(header, tensors, blobs).result(timeout)

    def _dispatch(self, msg: Message) -> None:
        rid = msg[0].get("id")
        with self._lock:
            fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if fut is None:
            if self._on_unsolicited is not None:
                self._on_unsolicited(msg)
            return
        if fut.done():  # the caller gave up on it (cancelled): nothing to deliver
            return
        try:
            raise_remote(msg[0])
            fut.set_result(msg)
        except BaseException as e:
            fut.set_exception(e)

    def _fail_all(self, e: BaseException) -> None:
        with self._lock:
            self.closed = e
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("the enclave channel closed before replying"))

    def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(self.channel.recv())
        except BaseException as e:
            self._fail_all(e)

    def _on_readable(self) -> None:
        """Loop mode: one frame per readiness event (the loop calls again while more is queued)."""
        try:
            msg = self.channel.recv_frame()
        except BaseException as e:
            self._stop_reading()
            self._fail_all(e)
            return
        if msg is not None:
            self._dispatch(msg)

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.channel.sock.fileno())
            except (ValueError, OSError):  # already closed
                pass

    def close(self) -> None:
        if self._loop is None or self._loop.is_closed() or not self._loop.is_running():
            self.channel.close()
            return
        done = threading.Event()

        def close_in_loop() -> None:
            try:
                self._stop_reading()
                self.channel.close()
            finally:
                done.set()

        if _running_loop() is self._loop:
            close_in_loop()
        else:
            self._loop.call_soon_threadsafe(close_in_loop)
            if not done.wait(5.0):
                self.channel.close()
        if self.closed is None:
            self._fail_all(ChannelClosed("the enclave channel is closed"))


def _running_loop() -> "asyncio.AbstractEventLoop | None":
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


Handler = Callable[[Header, dict[str, torch.Tensor], dict[str, bytes]],
                   "tuple[Header, dict[str, torch.Tensor] | None, dict[str, bytes] | None]"]


def serve_channel(channel: Channel, handler: Handler, max_workers: int = 4,
                  inline: Callable[[Header], bool] | None = None) -> None:
    """Worker side: run `handler` for each request on a thread pool, reply with the same id.

    Returns (after closing the channel, which unlinks this side's arena) when the peer closes it.
    `inline(header)` may say that a request must run on the reading thread (e.g. a cheap one).
    """
    def run(header: Header, tensors, blobs) -> None:
        rid = header.get("id")
        try:
            h, t, b = handler(header, tensors, blobs)
            reply = ({**h, "id": rid}, t, b)
        except BaseException as e:  # every failure becomes a reply; the loop goes on
            reply = (_error_reply(rid, e), None, None)
        try:
            channel.send(*reply)
        except ChannelClosed:
            pass
        except ChannelError as e:  # e.g. a tensor dtype that cannot travel
            try:
                channel.send(_error_reply(rid, e))
            except ChannelError:
                pass

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="enclave") as pool:
        while True:
            try:
                header, tensors, blobs = channel.recv()
            except ChannelClosed:
                break
            if inline is not None and inline(header):
                run(header, tensors, blobs)
            else:
                pool.submit(run, header, tensors, blobs)
    channel.close()


def channel_fd_from_argv(argv: list[str]) -> tuple[int, list[str]]:
    """Split `--channel-fd FD` off a worker's argv: (fd, the other arguments)."""
    if "--channel-fd" not in argv:
        raise SystemExit("this module is an enclave worker: start it with spawn_enclave_worker()")
    i = argv.index("--channel-fd")
    return int(argv[i + 1]), argv[:i] + argv[i + 2:]
