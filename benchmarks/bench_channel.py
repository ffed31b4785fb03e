"""`python benchmarks/bench_channel.py`: round trips through the enclave runtime's channel.

Trust side: operator. A real worker process started by fd (`runtime.spawn.spawn_by_fd`), serving
an echo op with the runtime's serving loop; the host's `ChannelClient` sends requests one after
another: a header-only request, and one carrying a 64x256x8x8 float32 tensor (4 MiB, through the
shared-memory arena both ways, the size of a Darknet IR batch). Prints microseconds per round
trip (best of --repeats), as one JSON line.
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

from enclaveml.runtime.rpc import ChannelClient
from enclaveml.runtime.spawn import spawn_by_fd

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=3000, help="header-only round trips per repeat")
    ap.add_argument("--tensor", type=int, default=400, help="4 MiB tensor round trips per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
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
