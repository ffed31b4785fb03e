"""Shared memory for the channel's tensors: sealed anonymous segments and the sender's arena.

Trust side: both (each side writes its own arena; each maps the peer's read-only).

Each side owns one *arena* (created on its first tensor send) that it writes outgoing tensors
into (first-fit allocation, 64-byte aligned, coalescing frees). The receiver copies a tensor out
and at once hands the slot back (a control frame), so the sender can reuse it. If the arena is
full (or a tensor is larger than it) the sender uses a one-off segment that the receiver maps,
copies and drops, so a send never blocks waiting for the peer. Received tensors are private
copies: the sender may overwrite its arena at once, and the receiver validates after copying, so
the peer cannot change a tensor under the receiver's feet.

Segments are anonymous (`memfd_create`), never names in /dev/shm: their fds travel over the Unix
socket (SCM_RIGHTS, `transport.py`), so a segment's memory goes when the last process mapping it
exits, however it exits (SIGKILL included; security review F-34). The sender seals each segment
(no shrink, no grow, no more seals); the receiver maps only sealed memfds (`map_peer_segment`),
read-only, so the peer cannot make a read fault by truncating it. Segment names ("emla_..."
arenas, "emlo_..." one-offs) are labels within the channel, never file names.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import threading

import numpy as np
import torch

from .errors import ChannelError
from .frames import DTYPES, TensorDesc

DEFAULT_ARENA_BYTES = 16 << 20
ALIGN = 64
#: Seals a segment must carry before the receiver maps it: it can never shrink under the reader
#: (a shrunk mapping would fault, SIGBUS, on read) nor have its seals removed.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def _segment_name(kind: str) -> str:
    return f"eml{kind}_{os.getpid()}_{os.urandom(6).hex()}"


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


def map_peer_segment(fd: int) -> mmap.mmap:
    """Map a segment fd from the peer read-only, after checking it is a sealed regular file.
    Closes `fd` (the mapping keeps the memory)."""
    try:
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # EINVAL for anything but a memfd
        except OSError:
            raise ChannelError("peer's shared-memory segment is not a memfd") from None
        if not stat.S_ISREG(st.st_mode) or seals & REQUIRED_SEALS != REQUIRED_SEALS or st.st_size < 1:
            raise ChannelError("peer's shared-memory segment is not a sealed memfd")
        try:
            return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError:
            raise ChannelError("peer's shared-memory segment cannot be mapped") from None
    finally:
        os.close(fd)


class Arena:
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


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 numpy array (no copy when already so)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


def copy_out(desc: TensorDesc, buf: "mmap.mmap | memoryview | None", offset: int) -> torch.Tensor:
    """A private copy of the tensor `desc` describes, from `buf` at `offset` (bounds checked;
    `buf` may be None for a tensor of no bytes)."""
    if offset + desc.nbytes > (len(buf) if buf is not None else 0):
        raise ChannelError("tensor lies outside its shared-memory segment")
    out = torch.empty(desc.shape, dtype=DTYPES[desc.dtype])
    if desc.nbytes:
        dst = out.reshape(-1).view(torch.uint8).numpy()
        dst[:] = np.frombuffer(buf, dtype=np.uint8, count=desc.nbytes, offset=offset)
    return out
