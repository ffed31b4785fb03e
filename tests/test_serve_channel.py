"""The runtime's channel (transport, rpc, spawn): real processes, a real socketpair, real shared memory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from enclaveml.errors import TamperedMessage
from enclaveml.runtime import frames, rpc, spawn, transport
from enclaveml.runtime.errors import ChannelClosed, ChannelError

ECHO_WORKER = '''
import sys, torch
torch.set_num_threads(1)
from enclaveml.errors import TamperedMessage
from enclaveml.runtime.transport import Channel, channel_fd_from_argv
from enclaveml.runtime.rpc import serve_channel

def handle(h, tensors, blobs):
    if h.get("op") == "fail":
        raise TamperedMessage("bad tag")
    if h.get("op") == "crash":
        raise RuntimeError("secret detail that must not travel")
    if h.get("op") == "exit":
        import os; os._exit(3)
    out = {k: (v * 2 if v.is_floating_point() else v) for k, v in tensors.items()}
    return ({"op": "echo", "n": h.get("n"), "pid": __import__("os").getpid()}, out,
            {k: v[::-1] for k, v in blobs.items()})

fd, rest = channel_fd_from_argv(sys.argv[1:])
serve_channel(Channel.from_fd(fd, arena_bytes=int(rest[0])), handle, max_workers=4)
'''


@pytest.fixture
def echo(tmp_path):
    (tmp_path / "echo_worker_mod.py").write_text(ECHO_WORKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc, chan = spawn.spawn_by_fd("echo_worker_mod", ["1048576"], env=env, arena_bytes=1 << 20)
    client = rpc.ChannelClient(chan)
    yield proc, chan, client
    client.close()
    proc.wait(60)


def _shm_names() -> set[str]:
    """/dev/shm entries of ours made by this test process tree (the machine may be shared)."""
    from conftest import _made_by_us

    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("eml") and _made_by_us(p.name)}


def test_round_trip_tensors_blobs_and_header(echo):
    proc, chan, client = echo
    tensors = {
        "f32": torch.randn(3, 4, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i64": torch.arange(10),
        "u8": torch.randint(0, 255, (2, 3), dtype=torch.uint8),
        "strided": torch.randn(6, 4).t(),  # non-contiguous input is sent contiguous
        "big": torch.randn(600_000),  # 2.4 MB: larger than the 1 MiB arena -> one-off segment
        "empty": torch.zeros(0, 3),
    }
    h, t, b = client.request({"op": "echo", "n": 7}, tensors, {"x": b"abc", "nothing": b""})
    assert h["op"] == "echo" and h["n"] == 7 and h["pid"] == proc.pid != os.getpid()
    assert b == {"x": b"cba", "nothing": b""}
    for k, v in tensors.items():
        assert t[k].dtype == v.dtype and t[k].shape == v.shape, k
        want = v * 2 if v.is_floating_point() else v
        assert torch.equal(t[k], want), k


def test_many_requests_in_flight_match_their_replies(echo):
    _, chan, client = echo
    futs = {}
    lock = threading.Lock()

    def fire(i):
        f = client.call({"op": "echo", "n": i}, {"x": torch.full((64, 64), float(i))})
        with lock:
            futs[i] = f

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(60)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, f in futs.items():
        h, t, _ = f.result(60)
        assert h["n"] == i
        assert torch.equal(t["x"], torch.full((64, 64), 2.0 * i))
    # Every arena slot the host wrote was copied by the worker and handed back.
    deadline = time.time() + 5
    while chan.arena_in_use() and time.time() < deadline:
        time.sleep(0.01)
    assert chan.arena_in_use() == 0


def test_errors_come_back_as_their_class_without_internal_details(echo):
    _, _, client = echo
    with pytest.raises(TamperedMessage, match="bad tag"):
        client.request({"op": "fail"})
    with pytest.raises(rpc.RemoteError) as ei:
        client.request({"op": "crash"})
    assert "secret detail" not in str(ei.value)
    # The worker keeps serving after failures.
    assert client.request({"op": "echo", "n": 1})[0]["n"] == 1


def test_worker_death_fails_pending_calls(echo):
    proc, _, client = echo
    with pytest.raises(ChannelClosed):
        client.request({"op": "exit"}, timeout=60)
    assert proc.wait(60) == 3
    with pytest.raises(ChannelClosed):
        client.request({"op": "echo"}, timeout=60)


def test_no_shared_memory_segments_outlive_the_channel(tmp_path):
    before = _shm_names()
    (tmp_path / "echo_worker_mod.py").write_text(ECHO_WORKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc, chan = spawn.spawn_by_fd("echo_worker_mod", ["65536"], env=env, arena_bytes=65536)
    client = rpc.ChannelClient(chan)
    client.request({"op": "echo"}, {"a": torch.randn(100), "b": torch.randn(100_000)})
    client.close()
    proc.wait(60)
    assert _shm_names() - before == set()


def test_a_killed_worker_leaves_no_shared_memory_behind(tmp_path):
    """Both arenas and a one-off in use, then SIGKILL: nothing of ours is in /dev/shm, neither
    while the channel runs (segments are anonymous memfds) nor after."""
    import signal

    before = _shm_names()
    (tmp_path / "echo_worker_mod.py").write_text(ECHO_WORKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc, chan = spawn.spawn_by_fd("echo_worker_mod", ["65536"], env=env, arena_bytes=65536)
    client = rpc.ChannelClient(chan)
    try:
        h, t, _ = client.request({"op": "echo"}, {"a": torch.ones(100), "b": torch.ones(100_000)}, timeout=60)
        assert torch.equal(t["b"], torch.full((100_000,), 2.0)) and torch.equal(t["a"], torch.full((100,), 2.0))
        assert _shm_names() - before == set()  # in use, and still no name anywhere
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        with pytest.raises(ChannelClosed):
            client.request({"op": "echo"}, {"a": torch.ones(100)}, timeout=60)
    finally:
        client.close()
    assert _shm_names() - before == set()


def test_unsealed_or_foreign_fds_are_refused():
    """A peer that passes a plain file or an unsealed memfd as a segment gets a ChannelError."""
    import array
    import socket as so

    a, b = so.socketpair()
    chan = transport.Channel(a, 4096)
    try:
        fd = os.memfd_create("x")  # not sealed: the peer could shrink it under our reads
        os.ftruncate(fd, 4096)
        meta = frames.encode_meta({}, {}, [["x", "uint8", [16], "emlo_1_ab", 0, 16]], [])
        b.sendmsg([meta], [(so.SOL_SOCKET, so.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        os.close(fd)
        with pytest.raises(ChannelError, match="sealed"):
            chan.recv()
        with open(__file__, "rb") as f:  # a file of the peer's choosing
            b.sendmsg([meta], [(so.SOL_SOCKET, so.SCM_RIGHTS, array.array("i", [f.fileno()]).tobytes())])
        with pytest.raises(ChannelError, match="not a memfd"):
            chan.recv()
    finally:
        chan.close()
        b.close()


@pytest.mark.parametrize("meta", [
    b"not json",
    b"[1, 2]",
    b'{"h": {}, "b": [["x", -1]]}',
    b'{"h": {}, "b": [["x", 999999999999]]}',
    b'{"h": {}, "t": [["x", "float32", [2], "/etc/passwd", 0, 8]]}',
    b'{"h": {}, "t": [["x", "float32", [3], "emla_1_2", 0, 8]]}',
    b'{"h": {}, "t": [["x", "object", [1], "emla_1_2", 0, 8]]}',
    b'{"h": {}, "t": [["x", "float32", [2], "emla_1_2", -64, 8]]}',
])
def test_malformed_frames_are_refused(meta):
    with pytest.raises(ChannelError):
        frames.decode_meta(meta)


def test_frame_round_trip_is_pure():
    raw = frames.encode_meta({"op": "x", "n": 1}, {"a": b"12"}, [["t", "float32", [2], "emla_1_ab", 0, 8]], [])
    header, blobs, tensors, frees = frames.decode_meta(raw[4:])
    assert header == {"op": "x", "n": 1} and blobs == [("a", 2)] and tensors[0][0] == "t" and frees == []


def test_peer_cannot_point_outside_a_segment():
    a, b = __import__("socket").socketpair()
    left, right = transport.Channel(a, 4096, inline_below=0), transport.Channel(b, 4096)
    try:
        left.send({}, {"x": torch.ones(4)})  # creates left's arena
        seg = left._arena.name
        bad = frames.encode_meta({"op": "evil"}, {}, [["x", "float32", [2048], seg, 0, 8192]], [])
        left._send_frame(bad, [])
        right.recv()  # the honest message
        with pytest.raises(ChannelError, match="outside"):
            right.recv()
    finally:
        left.close()
        right.close()


def test_inline_tensors_over_a_socket_path(tmp_path):
    """The transport for enclaves that cannot inherit an fd or map host memory (Gramine)."""
    worker = ECHO_WORKER.replace(
        "fd, rest = channel_fd_from_argv(sys.argv[1:])\nserve_channel(Channel.from_fd(fd, arena_bytes=int(rest[0])), handle, max_workers=4)",
        "from enclaveml.runtime.transport import worker_channel_from_argv\n"
        "chan, rest = worker_channel_from_argv(sys.argv[1:])\nassert not chan.use_shm\nserve_channel(chan, handle)")
    assert worker != ECHO_WORKER
    (tmp_path / "echo_worker_path.py").write_text(worker)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    before = _shm_names()
    sock = str(tmp_path / "w.sock")
    proc, chan = spawn.spawn_at_path(
        sock, [__import__("sys").executable, "-m", "echo_worker_path", "--channel-path", sock, "--no-shm"], env=env)
    client = rpc.ChannelClient(chan)
    try:
        t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32), "e": torch.zeros(0)}
        h, out, b = client.request({"op": "echo", "n": 2}, t, {"x": b"hello"})
        assert h["n"] == 2 and b == {"x": b"olleh"}
        assert torch.equal(out["a"], t["a"] * 2) and torch.equal(out["b"], t["b"]) and out["e"].shape == (0,)
        assert _shm_names() - before == set() and not os.path.exists(sock)
    finally:
        client.close()
        proc.wait(60)


def test_enclave_worker_runs_over_a_socket_path(tmp_path):
    from enclaveml.serve.host import EnclaveProxy

    env = {**os.environ, "ENCLAVEML_HOME": str(tmp_path / "home")}
    proxy = EnclaveProxy("sim", socket_path=str(tmp_path / "enclave.sock"), env=env)
    try:
        assert proxy.info["tee"] == "sim" and len(bytes.fromhex(proxy.info["public_key"])) == 32
        h, _, _ = proxy.call({"op": "evidence", "nonce": "ab" * 16})
        assert h["evidence"]["backend"] == "sim" and h["public_key"] == proxy.info["public_key"]
    finally:
        proxy.close()


def test_an_event_loop_can_read_the_replies(tmp_path):
    """Loop mode (the host server's): replies are read by the event loop when the socket is
    readable, awaited there and from other threads; an 8 MB blob crosses the socket the loop made
    non-blocking; the worker's death fails what is pending; close from another thread is clean."""
    import asyncio

    (tmp_path / "echo_worker_mod.py").write_text(ECHO_WORKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    async def main():
        loop = asyncio.get_running_loop()
        proc, chan = spawn.spawn_by_fd("echo_worker_mod", ["1048576"], env=env, arena_bytes=1 << 20)
        client = rpc.ChannelClient(chan, loop=loop)
        big = os.urandom(8 << 20)
        h, t, b = await asyncio.wrap_future(client.call({"op": "echo", "n": 1}, {"x": torch.arange(5.0)}, {"big": big}))
        assert h["n"] == 1 and torch.equal(t["x"], torch.arange(5.0) * 2) and b["big"] == big[::-1]
        many = await asyncio.gather(*(asyncio.wrap_future(client.call({"op": "echo", "n": i})) for i in range(50)))
        assert [m[0]["n"] for m in many] == list(range(50))
        # asyncio Futures resolved in place by the loop's reader, mixed with the others
        aio = [client.call_aio({"op": "echo", "n": i}, {"x": torch.ones(2)}) for i in range(20)]
        assert all(isinstance(f, asyncio.Future) for f in aio)
        assert [m[0]["n"] for m in await asyncio.gather(*aio)] == list(range(20))
        # a blocking request from another thread, answered through the loop
        assert (await asyncio.to_thread(client.request, {"op": "echo", "n": 99}))[0]["n"] == 99
        with pytest.raises(ChannelClosed):
            await client.call_aio({"op": "exit"})  # the worker died before replying: the asyncio Future fails too
        with pytest.raises(ChannelClosed):
            await client.call_aio({"op": "echo"})  # and a call after that fails at once
        assert client.closed is not None and proc.wait(60) == 3
        await asyncio.to_thread(client.close)

        proc2, chan2 = spawn.spawn_by_fd("echo_worker_mod", ["1048576"], env=env, arena_bytes=1 << 20)
        client2 = rpc.ChannelClient(chan2, loop=loop)
        assert (await asyncio.wrap_future(client2.call({"op": "echo", "n": 2})))[0]["n"] == 2
        await asyncio.to_thread(client2.close)  # from another thread: the loop stops reading first
        assert proc2.wait(60) == 0
        with pytest.raises(ChannelClosed):
            client2.request({"op": "echo"}, timeout=5)

    asyncio.run(main())


def test_small_tensors_travel_inline_and_large_ones_through_shared_memory():
    a, b = __import__("socket").socketpair()
    left, right = transport.Channel(a), transport.Channel(b)
    try:
        small = torch.arange(16, dtype=torch.float32)
        left.send({"k": 1}, {"x": small})
        h, t, _ = right.recv()
        assert h == {"k": 1} and torch.equal(t["x"], small)
        assert left._arena is None  # no slot taken, so no "free" frame comes back
        big = torch.arange(transport.INLINE_BELOW // 4, dtype=torch.float32)
        left.send({}, {"x": big, "y": small})
        _, t, _ = right.recv()
        assert torch.equal(t["x"], big) and torch.equal(t["y"], small)
        assert left._arena is not None
    finally:
        left.close()
        right.close()


def test_inline_frames_of_empty_tensors_only():
    """No shared memory, and no tensor bytes at all: the frame still carries the tensors' shapes."""
    import socket

    a, b = socket.socketpair()
    left, right = transport.Channel(a, use_shm=False), transport.Channel(b, use_shm=False)
    try:
        left.send({"op": "x"}, {"e": torch.zeros(0, 3), "f": torch.empty(0, dtype=torch.int64)})
        h, t, _ = right.recv()
        assert h == {"op": "x"} and t["e"].shape == (0, 3) and t["f"].dtype == torch.int64
    finally:
        left.close()
        right.close()


def _serving(handler, **kw):
    """A ChannelClient on one end of a socketpair, serve_channel on a thread at the other."""
    import socket

    a, b = socket.socketpair()
    server = transport.Channel(b)
    t = threading.Thread(target=rpc.serve_channel, args=(server, handler), kwargs=kw, daemon=True)
    t.start()
    return rpc.ChannelClient(transport.Channel(a)), t


def test_small_requests_run_on_the_reading_thread_only_while_the_pool_is_idle():
    reader = []
    started, release = threading.Event(), threading.Event()

    def handler(h, tensors, blobs):
        if h["op"] == "slow":
            started.set()
            release.wait(10)
        return {"thread": threading.current_thread().name}, None, None

    client, t = _serving(handler, max_workers=2, inline=lambda h: h["op"] == "ping",
                         inline_when_idle=lambda h, tensors, blobs: h["op"] == "small")
    try:
        reader.append(client.request({"op": "ping"})[0]["thread"])
        idle = client.request({"op": "small"})[0]["thread"]
        assert idle == reader[0]  # nothing in the pool: ran where the ping runs
        slow = client.call({"op": "slow"})
        assert started.wait(10)
        busy = client.request({"op": "small"})[0]["thread"]
        assert busy != reader[0] and busy.startswith("enclave")  # the pool is busy: a pool thread
        assert client.request({"op": "ping"}, timeout=5)[0]["thread"] == reader[0]  # still answers
        release.set()
        assert slow.result(10)[0]["thread"].startswith("enclave")
        other = client.request({"op": "other"})[0]["thread"]
        assert other.startswith("enclave")  # not marked: always the pool
    finally:
        release.set()
        client.close()
        t.join(10)


def test_the_serving_worker_runs_only_lone_small_front_batches_inline():
    from enclaveml.serve.worker import IDLE_INLINE_BYTES, small_front_batch

    assert small_front_batch({"op": "front_batch", "n": 1}, {}, {"r0": b"x" * 1000})
    assert not small_front_batch({"op": "front_batch", "n": 2}, {}, {"r0": b"x", "r1": b"y"})
    assert not small_front_batch({"op": "front_batch", "n": 1}, {}, {"r0": b"x" * (IDLE_INLINE_BYTES + 1)})
    assert not small_front_batch({"op": "deploy", "n": 1}, {}, {})
    assert not small_front_batch({"op": "front_batch", "n": 1}, {"t": torch.zeros(1)}, {"r0": b"x"})


def test_a_frame_with_more_fds_than_allowed_is_refused():
    """The peer attaches more descriptors than a frame may carry: the kernel truncates them
    (MSG_CTRUNC) and the channel refuses the frame rather than lose track of segments."""
    import array
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = transport.Channel(a)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(transport.MAX_FDS_PER_FRAME + 8)]
    try:
        b.sendmsg([b"\x00" * 16], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        with pytest.raises(ChannelError, match="more file descriptors"):
            ch.recv_frame()
        assert ch._fds == []  # the ones that came were closed
    finally:
        for fd in fds:
            os.close(fd)
        ch.close()
        b.close()
