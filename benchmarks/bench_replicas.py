"""`benchmarks/bench_replicas.py`: `enclaveml serve --replicas` against plain `enclaveml serve`.

Trust side: operator (owner, clients and servers on one machine, loopback).

Runs, on separate stores, model and images (Darknet-like zoo model, untrained
weights: the figures are about serving cost, not accuracy):
  plain      `enclaveml serve` (one host server + one enclave)
  direct1    `serve --replicas 1`, the SDK reaching the replica directly (the fast path)
  proxy1     the same replica through Ray Serve's HTTP proxy (`--ray-proxy-port`)
  direct2    `serve --replicas 2`, the SDK spreading calls over both replicas
The three servers run at once (idle while another is measured), and the runs alternate in
--rounds slices, so that a shared machine's changing load treats them alike. For each: sequential
latency of single-image requests (p50/p99 over --seq requests, one client), and throughput of
single-image requests from --threads client threads for --seconds. `startup_s` is the time from
launch to a healthy server (for replicas: Ray, the replicas, their enclaves, the front).
`--autoscale` instead starts `serve --min-replicas 1 --max-replicas 2` and times Ray's scale-up
under --threads clients' load (one JSON line).
Prints a table, then as its LAST line one JSON object with the figures and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def seq_slice(c, images: list[bytes], n: int, lat: list[float]) -> None:
    for i in range(n):
        t0 = time.perf_counter()
        c.infer([images[i % len(images)]], model="m")
        lat.append((time.perf_counter() - t0) * 1000)


def load_slice(c, images: list[bytes], threads: int, seconds: float) -> tuple[int, float]:
    """Single-image requests from `threads` threads for `seconds` -> (requests, elapsed)."""
    done, stop = [0] * threads, time.perf_counter() + seconds

    def worker(j: int) -> None:
        i = j
        while time.perf_counter() < stop:
            c.infer([images[i % len(images)]], model="m")
            done[j] += 1
            i += threads

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(j,)) for j in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done), time.perf_counter() - t0


def autoscale_run(tmp: Path, env: dict, policy, key: bytes, owner, images: list[bytes], threads: int,
                  timeout_s: float) -> dict:
    """`serve --min-replicas 1 --max-replicas 2`: load from `threads` threads until Ray's autoscaler
    (custom policy on the replicas' queue depth) has a second replica up -> seconds it took."""
    import httpx

    from enclaveml.client import EnclaveClient
    from enclaveml.serve.launcher import ServerProcess

    with ServerProcess(tmp / "store-auto", tmp / "auto.log", env=env, timeout_s=400,
                       extra_args=["--min-replicas", "1", "--max-replicas", "2", "--enclave-threads", "2"]) as srv:
        with EnclaveClient(srv.url, policy) as c:
            c.deploy(tmp / "bundle", key, owner, model_id="m")
            pinned = c.policy
        with EnclaveClient(srv.url, pinned) as c:
            c.infer(images[:1], model="m")
            stop, seen = [False], {"max_in_flight": 0}

            def worker(j: int) -> None:
                i = j
                while not stop[0]:
                    try:
                        c.infer([images[i % len(images)]], model="m")
                    except Exception:  # noqa: BLE001 (a replica starting or stopping; keep loading)
                        time.sleep(0.1)
                    i += threads

            ts = [threading.Thread(target=worker, args=(j,)) for j in range(threads)]
            t0 = time.time()
            for t in ts:
                t.start()
            up = None
            while time.time() - t0 < timeout_s:
                rows = httpx.get(srv.url + "/healthz", timeout=30).json()["replicas"]
                seen["max_in_flight"] = max(seen["max_in_flight"], sum(r["in_flight"] for r in rows))
                if sum(r["status"] == "ok" and bool(r["models"]) for r in rows) >= 2:
                    up = round(time.time() - t0, 1)
                    break
                time.sleep(1.0)
            stop[0] = True
            for t in ts:
                t.join()
            final = httpx.get(srv.url + "/healthz", timeout=30).json()["replicas"]
    return {"threads": threads, "scaled_to_2_after_s": up, "replicas_at_end": len(final),
            "requests_per_replica": [r["requests"] for r in final], "max_in_flight_seen": seen["max_in_flight"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "test")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--seq", type=int, default=40)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0, help="load time per run (over all rounds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="plain,direct1,proxy1,direct2")
    ap.add_argument("--autoscale", action="store_true",
                    help="instead: time Ray's scale-up from 1 to 2 replicas under --threads clients' load")
    args = ap.parse_args()

    import torch

    from enclaveml.crypto import SigningKey
    from enclaveml.models import zoo
    from enclaveml.models.bundle import make_bundle
    from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package

    torch.set_num_threads(1)
    images = [p.read_bytes() for p in sorted(args.data.glob("*/*.jpg"))[:64]]
    load_before = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        tmp = Path(tmp)
        home, pkg = tmp / "home", snapshot_package(tmp / "pkg")
        model, entry = zoo.load("darknet", pretrained=False), zoo.entry("darknet")
        owner = SigningKey.generate()
        _, key = make_bundle(model, args.k, tmp / "bundle", {"zoo": "darknet"}, entry.preprocessing,
                             list(entry.classes), owner)
        policy = local_sim_policy(home, pkg)
        env = server_env(home, pkg)
        if args.autoscale:
            out = autoscale_run(tmp, env, policy, key, owner, images, args.threads, 180.0)
            out["loadavg_before"] = [round(x, 2) for x in load_before]
            out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            print(json.dumps(out))
            return
        common = ["--enclave-threads", "2"]
        runs = [r for r in args.only.split(",") if r]
        proxy = _free_port()
        servers = {"plain": [], "r1": ["--replicas", "1", "--ray-proxy-port", str(proxy)], "r2": ["--replicas", "2"]}
        need = {"plain": "plain", "direct1": "r1", "proxy1": "r1", "direct2": "r2"}
        from contextlib import ExitStack

        from enclaveml.client import EnclaveClient

        with ExitStack() as stack:
            srv, started = {}, {}
            for name in sorted({need[r] for r in runs}, key=list(servers).index):
                t0 = time.time()
                srv[name] = stack.enter_context(ServerProcess(tmp / f"store-{name}", tmp / f"{name}.log",
                                                              extra_args=[*common, *servers[name]], env=env,
                                                              timeout_s=400))
                started[name] = round(time.time() - t0, 1)
                with EnclaveClient(srv[name].url, policy) as c:
                    c.deploy(tmp / "bundle", key, owner, model_id="m")
                    pinned = c.policy
            clients = {}
            for r in runs:
                url = f"http://127.0.0.1:{proxy}" if r == "proxy1" else srv[need[r]].url
                clients[r] = stack.enter_context(EnclaveClient(url, pinned))
                for _ in range(2 * args.threads):  # warm up: attest every replica, open connections
                    clients[r].infer(images[:1], model="m")
            # Alternate the runs in --rounds slices, so that a shared machine's changing load treats them alike.
            lat = {r: [] for r in runs}
            done = {r: [0, 0.0] for r in runs}
            for _ in range(args.rounds):
                for r in runs:
                    seq_slice(clients[r], images, max(1, args.seq // args.rounds), lat[r])
                for r in runs:
                    n, dt = load_slice(clients[r], images, args.threads, args.seconds / args.rounds)
                    done[r][0] += n
                    done[r][1] += dt
            for r in runs:
                results[r] = {"p50_ms": round(_pct(lat[r], 50), 2), "p99_ms": round(_pct(lat[r], 99), 2),
                              "req_per_s": round(done[r][0] / done[r][1], 2), "startup_s": started[need[r]]}
                print(r, results[r], file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"{'run':10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'start s':>8}")
    for run, r in results.items():
        print(f"{run:10} {r['p50_ms']:8} {r['p99_ms']:8} {r['req_per_s']:8} {r['startup_s']:8}")
    summary = {"runs": results, "threads": args.threads, "seconds": args.seconds, "seq": args.seq,
               "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
               "cpus": os.cpu_count()}
    if "proxy1" in results and "direct1" in results:
        summary["ray_proxy_overhead_ms_p50"] = round(results["proxy1"]["p50_ms"] - results["direct1"]["p50_ms"], 2)
    if "direct1" in results and "plain" in results:
        summary["replica_overhead_ms_p50"] = round(results["direct1"]["p50_ms"] - results["plain"]["p50_ms"], 2)
    if "direct2" in results and "direct1" in results:
        summary["throughput_ratio_2_over_1"] = round(results["direct2"]["req_per_s"] / results["direct1"]["req_per_s"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
