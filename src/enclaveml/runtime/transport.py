"""The channel between a host process and its enclave worker: frames over a Unix socket, tensors
through shared memory, segment fds passed along (SCM_RIGHTS).

Trust side: both (host and enclave each hold one end). Generic: Infenclave serving and the
CalTrain training enclave both use it; it knows nothing about models or cryptography.

Why not `multiprocessing` queues: they pickle, and unpickling bytes from the other trust side runs
code. Here a message is a JSON header, named raw byte blobs, and named tensors whose bytes travel
through shared memory (only name, dtype, shape and place travel on the socket). The frame format
and its checks are `frames.py` (pure); the segments and the arena are `arena.py`.

Segment fds travel with the frame that first refers to them (an arena's once, a one-off's with
its frame), in the order the tensor descriptors first name them. Without shared memory
(`Channel(use_shm=False)`: enclaves that cannot map host memory, reached over a socket path,
`spawn.spawn_at_path`), a tensor's segment is "" and its bytes follow the blobs on the socket, in
descriptor order. A receiver accepts both forms. With shared memory, a tensor under
`inline_below` bytes (default `INLINE_BELOW`, 64 KiB: a request's IR rows and scores) travels
inline too: the same two copies, and no slot to free, so no control frame back.

Every field from the peer is checked (sizes, dtypes, segment names, bounds, fds); a malformed
frame raises `ChannelError` and the channel should be closed.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import threading
import torch

from .arena import DEFAULT_ARENA_BYTES, Arena, Segment, copy_out, map_peer_segment, tensor_bytes
from .errors import ChannelClosed, ChannelError
from .frames import (ARENA_PREFIX, DTYPE_NAMES, INLINE, FrameError, Header, TensorDesc, encode_meta, free_frame,
                     read_frame)

Message = tuple[Header, dict[str, torch.Tensor], dict[str, bytes]]

_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)
#: File descriptors one frame may carry (its one-off segments and at most one arena).
MAX_FDS_PER_FRAME = 64
#: Distinct arenas a peer may announce over a channel's life (an honest peer has one).
MAX_PEER_ARENAS = 4
#: Tensors smaller than this travel inline on the socket even with shared memory: the same two
#: copies, but no arena slot and no "free" control frame back (an extra wake-up of the peer).
INLINE_BELOW = 64 << 10
#: `recvmsg` ancillary buffer for one frame's fds, and the truncation flag as a plain int (testing
#: an int against the IntFlag builds an enum member per call: ~0.8 us of every read).
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)


class Channel:
    """One end of a host <-> enclave channel. `send` is thread-safe; call `recv` from one thread."""

    def __init__(self, sock: socket.socket, arena_bytes: int = DEFAULT_ARENA_BYTES, use_shm: bool = True,
                 inline_below: int = INLINE_BELOW):
        self.sock = sock
        self.use_shm = bool(use_shm)
        self.inline_below = int(inline_below)
        self.arena_bytes = int(arena_bytes)
        self._arena: Arena | None = None
        self._peer_segments: dict[str, mmap.mmap] = {}  # the peer's arenas, mapped read-only
        self._fds: list[int] = []  # segment fds received with the frame being read
        self._broken: FrameError | None = None
        self._send_lock = threading.Lock()
        self._arena_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_fd(cls, fd: int, arena_bytes: int = DEFAULT_ARENA_BYTES, use_shm: bool = True) -> "Channel":
        """The worker's end: wrap the socket fd inherited from `spawn.spawn_by_fd`."""
        return cls(socket.socket(fileno=fd), arena_bytes, use_shm)

    @classmethod
    def connect(cls, path: str, arena_bytes: int = DEFAULT_ARENA_BYTES, use_shm: bool = True) -> "Channel":
        """The worker's end when it cannot inherit an fd (e.g. under Gramine): connect to `path`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, arena_bytes, use_shm)

    # -- sending --------------------------------------------------------------------------------

    def _get_arena(self) -> Arena:
        with self._arena_lock:
            if self._arena is None:
                self._arena = Arena(self.arena_bytes)
            return self._arena

    def _place(self, name: str, t: torch.Tensor, one_offs: dict[str, Segment]) -> list:
        if t.dtype not in DTYPE_NAMES:
            raise ChannelError(f"tensor {name!r}: dtype {t.dtype} cannot travel on the channel")
        src = tensor_bytes(t)
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
        return [name, DTYPE_NAMES[t.dtype], list(t.shape), seg, off, n]

    def send(self, header: Header, tensors: dict[str, torch.Tensor] | None = None,
             blobs: dict[str, bytes] | None = None) -> None:
        """Send one message. Tensors go through shared memory; blobs and header on the socket."""
        blobs = {k: (v if isinstance(v, (bytes, bytearray, memoryview)) else bytes(v)) for k, v in (blobs or {}).items()}
        if self.use_shm:
            one_offs: dict[str, Segment] = {}
            try:
                descs, inline = [], []
                for name, t in (tensors or {}).items():
                    if t.dtype in DTYPE_NAMES and t.numel() * t.element_size() < self.inline_below:
                        src = tensor_bytes(t)
                        descs.append([name, DTYPE_NAMES[t.dtype], list(t.shape), INLINE, 0, src.nbytes])
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
            if t.dtype not in DTYPE_NAMES:
                raise ChannelError(f"tensor {name!r}: dtype {t.dtype} cannot travel on the channel")
            src = tensor_bytes(t)
            descs.append([name, DTYPE_NAMES[t.dtype], list(t.shape), INLINE, 0, src.nbytes])
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
        while got < n:
            try:
                k, anc, flags, _ = self.sock.recvmsg_into([view[got:]], _ANC_SIZE, _RECV_FLAGS)
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
            if flags & _MSG_CTRUNC:
                raise ChannelError("peer sent more file descriptors than a frame may carry")
            if k == 0:
                raise ChannelClosed("the peer closed the channel")
            got += k
        return buf

    def _drop_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _bind_fds(self, tdescs: list[TensorDesc]) -> dict[str, mmap.mmap]:
        """Map the segments this frame brought: each segment the descriptors name (in order of
        first mention) that is not a known arena takes the next fd. Returns the one-offs."""
        one_offs: dict[str, mmap.mmap] = {}
        for seg in dict.fromkeys(d.segment for d in tdescs if d.segment != INLINE):
            if seg in self._peer_segments:
                continue
            if not self._fds:
                raise ChannelError("tensor refers to a missing shared-memory segment")
            m = map_peer_segment(self._fds.pop(0))
            if seg.startswith(ARENA_PREFIX):
                if len(self._peer_segments) >= MAX_PEER_ARENAS:
                    m.close()
                    raise ChannelError("peer announced too many arenas")
                self._peer_segments[seg] = m
            else:
                one_offs[seg] = m
        return one_offs

    def _take_tensor(self, desc: TensorDesc, one_offs: dict[str, mmap.mmap]) -> torch.Tensor:
        m = self._peer_segments.get(desc.segment) or one_offs.get(desc.segment)
        if m is None:
            raise ChannelError("tensor refers to a missing shared-memory segment")
        return copy_out(desc, m, desc.offset)

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
        if self._broken is not None:  # a refused frame desynchronised the stream
            raise self._broken
        try:
            frame = read_frame(self._recv_exact)  # each part read whole, exactly as long as it is
        except FrameError as e:
            self._broken = e
            raise
        for seg, off in frame.frees:
            if self._arena is not None and seg == self._arena.name:
                self._arena.free(off)
        if not frame.tensors:
            return None if frame.is_control else (frame.header, {}, frame.blobs)
        tensors, ipos = {}, 0
        one_offs: dict[str, mmap.mmap] = {}
        try:
            one_offs = self._bind_fds(frame.tensors)
            for d in frame.tensors:
                if d.segment == INLINE:
                    tensors[d.name] = copy_out(d, frame.inline, ipos)
                    ipos += d.nbytes
                else:
                    tensors[d.name] = self._take_tensor(d, one_offs)
        finally:
            for m in one_offs.values():
                m.close()
            done = [[d.segment, d.offset] for d in frame.tensors if d.segment.startswith(ARENA_PREFIX)]
            if done:
                try:
                    self._send_frame(free_frame(done), [])
                except ChannelClosed:
                    pass
        return frame.header, tensors, frame.blobs

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


def channel_fd_from_argv(argv: list[str]) -> tuple[int, list[str]]:
    """Split `--channel-fd FD` off a worker's argv: (fd, the other arguments)."""
    if "--channel-fd" not in argv:
        raise SystemExit("this module is an enclave worker: start it with enclaveml.runtime.spawn")
    i = argv.index("--channel-fd")
    return int(argv[i + 1]), argv[:i] + argv[i + 2:]


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
