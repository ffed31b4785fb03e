"""Single-request latency of two source trees, interleaved request by request, beside plain PyTorch.

Trust side: operator (runs owner, client and server on one machine). For A/B comparisons of the
request path on a shared, loaded machine, where back-to-back `bench_serve.py` runs see different
loads: one child process per tree (each with its own `enclaveml serve --tee sim`, darknet split
at k=10, deployed, warmed by 20 requests) and one plain-PyTorch child (decode + preprocess + the
whole model, 2 threads); the driver sends single-image requests to A, B and plain in turn
(A and B alternate going first; plain goes last and is followed by a pause that outlasts its
OpenMP threads' spin-wait), so load changes hit all three alike and neither tree shares the
cores with plain's spinning threads. Prints each tree's per-stage
breakdown (its own `bench_serve.breakdown`) to stderr and, last, one JSON line with p50, p90, p99
and mean ms of A, B and plain, and per request each server's process CPU (us: host, enclave,
client) and context switches (voluntary + involuntary, all threads: host, enclave, client).
AB_ENV_B=NAME=VALUE sets one environment variable for B only (AB_ENV_A for A: A and B may then be
one tree, e.g. `AB_ENV_A=ENCLAVEML_GC=0 ... N . .`).

    python benchmarks/ab_single_latency.py N TREE_A TREE_B [extra `enclaveml serve` args]
    e.g. python benchmarks/ab_single_latency.py 150 /work/main .
"""
import json
import os
import subprocess
import sys
import time

PY = sys.executable
#: Pause after each plain request (s): longer than libgomp's default spin of its idle threads.
PLAIN_PAUSE_S = 0.015


def child_main(mode: str, tree: str, extra: list[str]) -> None:
    import tempfile
    from pathlib import Path

    import torch

    sys.path.insert(0, os.path.join(tree, "benchmarks"))
    from enclaveml import paths
    from enclaveml.models import zoo

    data = paths.shared_dir() / "data" / "cifar10" / "test"
    import bench_serve as B

    images, labels, classes = B.load_test_set(data, 1000)
    model = zoo.load("darknet")
    entry = zoo.entry("darknet")
    out = sys.stdout
    sys.stdout = sys.stderr
    if mode == "plain":
        torch.set_num_threads(2)
        B.plain_latencies(model, entry.preprocessing, images[:20])
        print("ready", file=out, flush=True)
        for line in sys.stdin:
            i = int(line)
            lat = B.plain_latencies(model, entry.preprocessing, [images[i % len(images)]])[0]
            print(lat, file=out, flush=True)
        return
    from enclaveml.client import EnclaveClient
    from enclaveml.crypto import SigningKey
    from enclaveml.models.bundle import make_bundle
    from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env

    suite = os.environ.get("AB_SUITE")
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        tmp = Path(tmp)
        owner = SigningKey.generate()
        _, key = make_bundle(model, 10, tmp / "bundle", {"zoo": "darknet"}, entry.preprocessing, classes, owner)
        home = tmp / "home"
        with ServerProcess(tmp / "store", tmp / "server.log", env=server_env(home), extra_args=extra) as srv:
            policy = local_sim_policy(home)
            if suite:
                from dataclasses import replace
                policy = replace(policy, crypto={"suite": suite})
            with EnclaveClient(srv.url, policy) as c:
                c.deploy(tmp / "bundle", key, owner, model_id="darknet")
                policy = c.policy
            c = EnclaveClient(srv.url, policy)
            for b in images[:20]:
                c.infer([b], model="darknet", top_k=1)
            print("ready", file=out, flush=True)
            s1 = B.stage_snapshot(srv, [c])
            pids = (srv.pid, srv.enclave_pid(), "self")
            c1, x1 = [_cpu(p) for p in pids], [_ctx(p) for p in pids]
            n = 0
            for line in sys.stdin:
                i = int(line)
                t = time.perf_counter()
                c.infer([images[i % len(images)]], model="darknet", top_k=1)
                print(time.perf_counter() - t, file=out, flush=True)
                n += 1
            c2, x2 = [_cpu(p) for p in pids], [_ctx(p) for p in pids]
            per = max(1, n)
            print(json.dumps({"cpu_us": [round((b - a) * 1e6 / per) for a, b in zip(c1, c2)],
                              "ctx": [round(sum(b) / per - sum(a) / per, 2) for a, b in zip(x1, x2)]}), file=out, flush=True)
            s2 = B.stage_snapshot(srv, [c])
            rows = B.breakdown(s1, s2, n)
            B.print_breakdown(f"{tree}", rows)
            c.close()


def _cpu(pid) -> float:
    """User + system CPU seconds of a process ("self": this one)."""
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ctx(pid) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all of a process's threads."""
    from pathlib import Path

    vol = inv = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    inv += int(line.split()[1])
        except OSError:
            continue
    return vol, inv


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def main() -> None:
    n = int(sys.argv[1])
    trees = sys.argv[2:4]
    extra = sys.argv[4:]
    kids = {}
    for name, tree in (("A", trees[0]), ("B", trees[1]), ("plain", trees[0])):
        env = dict(os.environ, PYTHONPATH=os.path.join(tree, "src"))
        if name in ("A", "B") and os.environ.get(f"AB_ENV_{name}"):
            k, v = os.environ[f"AB_ENV_{name}"].split("=", 1)
            env[k] = v
        tree = os.path.abspath(tree)
        kids[name] = subprocess.Popen([PY, os.path.abspath(__file__), "--child", "plain" if name == "plain" else "svc", tree, *extra],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
    for k in kids.values():
        assert k.stdout.readline().strip() == "ready"
    lat = {k: [] for k in kids}
    # A and B take turns going first, and plain goes last, followed by a pause longer than
    # libgomp's default spin-wait: its two OpenMP threads keep spinning ~9-10 ms after each
    # pass (measured: process CPU while sleeping after a 2-thread darknet pass), and whatever
    # runs then shares the cores with them. The earlier order (A B plain, plain B A) put B right
    # after plain in every other round, and A never: one tree run against itself came out
    # 0.5-0.9 ms slower at p50 as B (docs/benchmarks.md, "Tail latency and per-request CPU").
    orders = ((kids["A"], kids["B"], kids["plain"]), (kids["B"], kids["A"], kids["plain"]))
    names = {id(k): name for name, k in kids.items()}
    for i in range(n):
        for k in orders[i % 2]:
            k.stdin.write(f"{i}\n")
            k.stdin.flush()
            lat[names[id(k)]].append(float(k.stdout.readline()))
            time.sleep(PLAIN_PAUSE_S)  # past libgomp's spin after every child, not only plain (review)
    for k in kids.values():
        k.stdin.close()
    costs = {name: json.loads(k.stdout.readline()) for name, k in kids.items() if name != "plain"}
    for k in kids.values():
        k.wait()
    res = {name: {"p50_ms": round(1000 * pct(v, 50), 3), "p90_ms": round(1000 * pct(v, 90), 3),
                  "p99_ms": round(1000 * pct(v, 99), 3), "max_ms": round(1000 * max(v), 3),
                  "mean_ms": round(1000 * sum(v) / len(v), 3), **costs.get(name, {})} for name, v in lat.items()}
    res["load"] = os.getloadavg()
    print(json.dumps(res))


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
