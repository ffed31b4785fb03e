"""`python benchmarks/bench_channel.py`: round trips through the enclave runtime's channel.

Trust side: operator. A real worker process started by fd (`runtime.spawn.spawn_by_fd`), serving
an echo op with the runtime's serving loop; the host's `ChannelClient` sends requests one after
another: a header-only request, and one carrying a 64x256x8x8 float32 tensor (4 MiB, through the
shared-memory arena both ways, the size of a Darknet IR batch). Prints microseconds per round
trip (best of --repeats), as one JSON line.

`--inproc`: both ends in this process on a socketpair, one thread, timed in CPU time
(`time.process_time`: the figure a loaded shared machine disturbs least): send, receive, and the
sender's handling of the freed-slot frame. It also runs on the tree before issue 10 (where the
channel was `enclaveml.serve.channel`), for before/after figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


WORKER = '''
import sys, torch
torch.set_num_threads(1)
from enclaveml.runtime.rpc import serve_channel
from enclaveml.runtime.transport import worker_channel_from_argv

def handle(h, t, b):
    return {"ok": 1}, ({"y": t["x"]} if "x" in t else None), None

chan, rest = worker_channel_from_argv(sys.argv[1:])
serve_channel(chan, handle, max_workers=2)
'''


def inproc(repeats: int) -> dict:
    import socket

    try:
        from enclaveml.runtime.transport import Channel
    except ImportError:  # the tree before issue 10
        from enclaveml.serve.channel import Channel
    torch.set_num_threads(1)
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    out = {}
    for name, tensors, n in (("inproc_small_cpu_us", None, 2000),
                             ("inproc_tensor_4MiB_cpu_us", {"x": torch.randn(64, 256, 8, 8)}, 300)):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            for _ in range(n):
                left.send({"op": "echo", "id": 1}, tensors, {"b": b"abc"})
                right.recv()
                if tensors:
                    left.recv_frame()  # the freed-slot frame
            best = min(best, (time.process_time() - t0) / n * 1e6)
        out[name] = round(best, 1)
    left.close()
    right.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=3000, help="header-only round trips per repeat")
    ap.add_argument("--tensor", type=int, default=400, help="4 MiB tensor round trips per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inproc", action="store_true", help="both ends in this process, CPU time (see above)")
    args = ap.parse_args()
    if args.inproc:
        print(json.dumps(inproc(max(args.repeats, 7))))
        return
    from enclaveml.runtime.rpc import ChannelClient
    from enclaveml.runtime.spawn import spawn_by_fd

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "bench_echo_worker.py").write_text(WORKER)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([d, *sys.path[1:]])}
        proc, chan = spawn_by_fd("bench_echo_worker", [], env=env)
        client = ChannelClient(chan)
        out = {}
        for name, tensors, n in (("small_us", None, args.small),
                                 ("tensor_4MiB_us", {"x": torch.randn(64, 256, 8, 8)}, args.tensor)):
            for _ in range(50):
                client.request({"op": "echo"}, tensors)
            best = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(n):
                    client.request({"op": "echo"}, tensors)
                best.append((time.perf_counter() - t0) / n * 1e6)
            out[name] = round(min(best), 1)
        client.close()
        proc.wait(30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
