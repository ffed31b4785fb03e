"""A lone single-image request through the enclave's serving logic, in one process: where its time goes.

Trust side: operator (drives `serve.enclave.EnclaveService` directly, as the worker would, with no
host, channel or HTTP in between).

`PYTHONPATH=src python benchmarks/bench_enclave_lone.py [--n 500] [--k 10] [--profile]`: deploys
darknet (trained weights if present) at split k with its BackNet handed over, then sends --n
single-image requests one after another (sealed beforehand, as a client would) through
`front_batch(..., finish_rows=SMALL_ROWS)`, the one-round-trip path of a lone request. Reports the
enclave's stage clock per request (wall / thread CPU us), the page faults per request, the whole
call's p50/p99, and the same decode -> FrontNet -> BackNet work in a tight loop (plain PyTorch on
the same code); `--profile` prints cProfile's top functions of the calls. `--ab plans` alternates
request by request between the deployment's modules and their flat plans (`serve/flat.py`),
`--ab threads` between lone passes on one thread and on every core, so that a loaded machine
treats both alike; each prints a stage table per variant and a JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    from enclaveml.crypto import frame_fresh
    from enclaveml.data.preprocess import decode_array
    from enclaveml.protocol import infer as protocol
    from enclaveml.serve.placement import SMALL_ROWS
    from enclaveml.serve.threads import LoneThreads, machine_threads
    from enclaveml.timing import diff

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the worker serves at 1)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ab", choices=("plans", "threads"),
                    help="alternate request by request: plans: the modules (A) and their flat plans (B); "
                         "threads: lone passes on one thread (A) and on every core (B)")
    ap.add_argument("--data", default="../shared/data/cifar10/test")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = [p.read_bytes() for p in sorted(Path(args.data).glob("*/*.jpg"))[: args.n]]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inprocess import deployed_darknet

    svc, ref, target = deployed_darknet(args.k)
    reqs = [protocol.seal_infer(svc.public_key(), target, frame_fresh(protocol.encode_payload(im, 5, False)))
            for im in images]
    for msg, _, _ in reqs[:20]:  # warm (oneDNN primitives, caches); these ids are then used
        svc.front_batch(str(ref), [msg], SMALL_ROWS)
    reqs = [protocol.seal_infer(svc.public_key(), target, frame_fresh(protocol.encode_payload(im, 5, False)))
            for im in images]
    dep = svc._deployment(ref)
    plans = {"flat": (dep.run_front, dep.run_back), "modules": (dep.front, dep.back)}
    # every lone pass on one thread, or on every core (base = the cores: no choosing)
    lone = {"1 thread": LoneThreads(best=1, base=1), "cores": LoneThreads(best=1, base=machine_threads())}
    if args.ab:
        names = ("modules", "flat") if args.ab == "plans" else ("1 thread", "cores")
        variants = {n: ({}, [], []) for n in names}
        for i, (msg, ctx, aad) in enumerate(reqs):
            name = names[i % 2]
            if args.ab == "plans":
                dep.run_front, dep.run_back = plans[name]
            else:
                svc.lone_threads = lone[name]
            st, walls, cpus = variants[name]
            before = svc.clock.snapshot()
            w, c = time.perf_counter_ns(), time.thread_time_ns()
            out = svc.front_batch(str(ref), [msg], SMALL_ROWS)[0]
            walls.append((time.perf_counter_ns() - w) / 1e3)
            cpus.append((time.thread_time_ns() - c) / 1e3)
            for k, v in diff(svc.clock.snapshot(), before).items():
                acc = st.setdefault(k, [0, 0])
                acc[0] += v["wall_ns"]
                acc[1] += v["cpu_ns"]
            protocol.decode_result(ctx.open_response(out.sealed, aad))
        print(f"{len(reqs)} lone requests alternating; per request wall / thread CPU us")
        print(f"  {'stage':22s}" + "".join(f" {k:>17s}" for k in variants))
        for k in sorted(variants[names[1]][0], key=lambda k: -variants[names[1]][0][k][1]):
            print(f"  {k[:22]:22s}" + "".join(f" {v[0][k][0] / len(v[1]) / 1e3:8.1f} /{v[0][k][1] / len(v[1]) / 1e3:7.1f}"
                                              for v in variants.values()))
        print(f"  {'front_batch call':22s}" + "".join(f" {sum(v[1]) / len(v[1]):8.1f} /{sum(v[2]) / len(v[2]):7.1f}"
                                                      for v in variants.values())
              + "   wall p50 " + " / ".join(f"{sorted(v[1])[len(v[1]) // 2]:.1f}" for v in variants.values()))
        print(json.dumps({k: {"cpu_us": sum(v[2]) / len(v[2]), "p50_us": sorted(v[1])[len(v[1]) // 2]}
                          for k, v in variants.items()}))
        return
    before = svc.clock.snapshot()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    walls, cpus = [], []
    prof = cProfile.Profile() if args.profile else None
    for msg, ctx, aad in reqs:
        w, c = time.perf_counter_ns(), time.thread_time_ns()
        if prof:
            prof.enable()
        out = svc.front_batch(str(ref), [msg], SMALL_ROWS)[0]
        if prof:
            prof.disable()
        walls.append((time.perf_counter_ns() - w) / 1e3)
        cpus.append((time.thread_time_ns() - c) / 1e3)
        protocol.decode_result(ctx.open_response(out.sealed, aad))
    st = diff(svc.clock.snapshot(), before)
    n = len(reqs)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
    print(f"{n} lone requests, darknet k={args.k}, {args.threads} thread(s); {faults:.1f} page faults per request; "
          "per request wall / CPU us")
    for name, v in sorted(st.items(), key=lambda kv: -kv[1]["wall_ns"]):
        print(f"  {name:22s} {v['wall_ns'] / n / 1e3:8.1f} / {v['cpu_ns'] / n / 1e3:8.1f}")
    walls.sort()
    print(f"  {'front_batch call':22s} {sum(walls) / n:8.1f} / {sum(cpus) / n:8.1f}   p50 {walls[n // 2]:.1f} p99 {walls[int(n * .99)]:.1f}")
    # the same work in a tight loop: decode + preprocess, FrontNet, BackNet (channels-last)
    front, back = dep.run_front, dep.run_back
    tl = {"decode": 0, "front": 0, "back": 0}
    with torch.no_grad():
        for im in images:
            t = time.thread_time_ns()
            x = dep.preprocessing.batch([decode_array(im, dep.preprocessing)])
            t2 = time.thread_time_ns()
            ir = front(x)
            t3 = time.thread_time_ns()
            back(ir)
            t4 = time.thread_time_ns()
            tl["decode"] += t2 - t
            tl["front"] += t3 - t2
            tl["back"] += t4 - t3
    print("tight loop CPU us: " + ", ".join(f"{k} {v / n / 1e3:.1f}" for k, v in tl.items()))
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)
    print(json.dumps({"n": n, "p50_us": walls[n // 2], "p99_us": walls[int(n * .99)], "mean_cpu_us": sum(cpus) / n}))


if __name__ == "__main__":
    main()
