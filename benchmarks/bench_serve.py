"""`make bench-serve`: Infenclave on loopback against plain PyTorch, same model, inputs, preprocessing.

Trust side: operator (runs the owner, the clients and the server on one machine).

Service: `enclaveml serve --tee sim` (host + enclave worker) with the Darknet-like zoo model at the
recommended split (from --assessment / $ASSESSMENT / the full assessment `make bench-assess` wrote,
out/bench/assess/darknet/assessment.json / the demo's out/demo/assess/assessment.json, else --k),
deployed by an owner; several client threads send the CIFAR-10 test set as encrypted requests of
--batch images each (one HPKE message per request), and one client sends single-image requests one
after another for the latency figures. Plain: the same JPEG bytes decoded and preprocessed by the same
code, then the whole model, in batches (throughput) and one image at a time (latency), in this
process, with its best torch thread count; and, as the strongest plain baseline, one
single-thread process per core over the same images (the machine's real limit for this model:
`images_per_s_plain_processes`). The two sides alternate in --rounds slices so that a shared
machine whose load changes treats both alike. CPU ms/image (all processes: clients, host,
enclave worker; for plain, the process or the worker processes) is the load-independent cost.
Plain preprocesses with the enclave's code (`decode_array` per image, one `Preprocessing.batch`
per batch) and runs the model in the faster of PyTorch's default NCHW layout and channels-last
(the enclave runs its FrontNet channels-last), picked on a sample with the thread count:
`plain_layout`.

Server capacity: after the SDK clients, the same requests are sealed beforehand with the SDK's
protocol and sent by a lean load generator (`loadgen.py`: keep-alive HTTP/1.1 on raw sockets,
answers opened and checked after the timed window), so that only the server's processes work in
the window: `images_per_s_service_server`, `throughput_ratio_best_plain_server`,
`cpu_ms_per_image_server` (host + enclave), `cpu_ms_per_image_loadgen`, `accuracy_service_server`.
CPU ratios against plain on one thread alone and against one single-thread process per core:
`cpu_ratio_{service,server}_plain_{1thread,processes}`, where plain single-thread is the cheaper of
its two layouts (`cpu_ms_per_image_plain_1thread_{contiguous,channels_last}`).

Prints a table, then as its LAST line one JSON object with images_per_s_service,
images_per_s_plain, throughput_ratio (against plain in one process at its best thread count),
throughput_ratio_best_plain (against the best of that and one process per core),
p50_ms_service, p99_ms_service, p50_ms_plain, p99_ms_plain, accuracy_service, accuracy_plain,
cpu_ms_per_image_service, cpu_ms_per_image_plain, cpu_ms_per_image_plain_1thread (and a few more
keys describing the run).

Before that line, a per-stage breakdown (wall and CPU microseconds per image of the throughput
phase, and per single-image request): the stage clocks of the clients, the host and the enclave
(`enclaveml/timing.py`, read through `/metrics?format=json&stages=1`) diffed around each phase,
plus the channel hops, HTTP outside the app and each process's CPU that no stage accounts for; the
same figures are the JSON's "stages". `--suite` picks the HPKE suite (crypto/suites.py) of the
requests and the key release.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def load_test_set(data: Path, limit: int | None) -> tuple[list[bytes], list[int], list[str]]:
    from enclaveml.data.folder import list_image_folder

    classes, samples = list_image_folder(data)
    if limit:
        step = max(1, len(samples) // limit)
        samples = samples[::step][:limit]
    return [Path(p).read_bytes() for p, _ in samples], [y for _, y in samples], classes


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_pid(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ctx_switches(pid: "int | str") -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all of a process's threads (Linux /proc; a
    thread that has exited no longer counts)."""
    vol = inv = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                inv += int(line.split()[1])
    return vol, inv


def _memory_mib(pid: int) -> dict:
    """{"rss", "peak"}: a process's resident and peak resident memory (VmRSS, VmHWM) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "peak"] = round(int(value.split()[0]) / 1024, 1)
    return out


def recommended_k(assessment: str | None, default: int) -> tuple[int, str]:
    if assessment and Path(assessment).exists():
        rep = json.loads(Path(assessment).read_text())
        if isinstance(rep.get("recommended"), int):
            return rep["recommended"], f"recommended by {assessment}"
    return default, "fixed (no assessment given)"


def preprocess_batch(pre, images: list[bytes]) -> torch.Tensor:
    """The enclave's preprocessing code (`decode_array` per image, one `Preprocessing.batch`),
    made contiguous NCHW: plain PyTorch then runs the model in its default memory layout."""
    from enclaveml.data.preprocess import decode_array

    return pre.batch([decode_array(b, pre) for b in images]).contiguous()


@torch.no_grad()
def plain_throughput(model, pre, images: list[bytes], labels: list[int], batch: int,
                     channels_last: bool = False) -> tuple[float, int]:
    """(seconds, correct): decode + preprocess + the whole model, `batch` images at a time
    (`channels_last`: the input in that layout, for a model whose weights are)."""
    t0 = time.perf_counter()
    correct = 0
    for i in range(0, len(images), batch):
        x = preprocess_batch(pre, images[i:i + batch])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == torch.tensor(labels[i:i + batch])).sum())
    return time.perf_counter() - t0, correct


@torch.no_grad()
def plain_latencies(model, pre, images: list[bytes], channels_last: bool = False) -> list[float]:
    lat = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for b in images:
        t = time.perf_counter()
        model(pre(b).unsqueeze(0).contiguous(memory_format=fmt)).argmax(1)
        lat.append(time.perf_counter() - t)
    return lat


_PROC: dict = {}


def _proc_init(channels_last: bool = False) -> None:
    """A plain worker process: one torch thread, the trained zoo model (in plain's best layout),
    the zoo preprocessing."""
    from enclaveml.models import zoo

    torch.set_num_threads(1)
    try:
        _PROC["model"] = zoo.load("darknet")
    except Exception:
        _PROC["model"] = zoo.load("darknet", pretrained=False)
    if channels_last:
        _PROC["model"] = _PROC["model"].to(memory_format=torch.channels_last)
    _PROC["channels_last"] = channels_last
    _PROC["pre"] = zoo.entry("darknet").preprocessing


def _proc_run(job: tuple) -> tuple[float, float, int, float]:
    """(start, end, correct, cpu seconds) of plain decode + preprocess + model over `job`'s images."""
    images, labels, batch, start_at = job
    while time.time() < start_at:  # every process starts together
        time.sleep(0.001)
    c0 = _cpu_self()
    t0 = time.time()
    _, ok = plain_throughput(_PROC["model"], _PROC["pre"], images, labels, batch, _PROC["channels_last"])
    return t0, time.time(), ok, _cpu_self() - c0


def plain_processes(pool, n: int, images: list[bytes], labels: list[int], batch: int) -> tuple[float, int, float]:
    """(seconds, correct, cpu seconds): the images split over `n` single-thread processes at once."""
    start_at = time.time() + 0.2
    jobs = [(images[i::n], labels[i::n], batch, start_at) for i in range(n)]
    outs = list(pool.map(_proc_run, jobs))
    return (max(o[1] for o in outs) - min(o[0] for o in outs), sum(o[2] for o in outs), sum(o[3] for o in outs))


def service_throughput(clients: list, model_id: str, images: list[bytes], labels: list[int],
                       batch: int) -> tuple[float, int]:
    """(seconds, correct): the clients send encrypted batch requests concurrently."""
    chunks = [list(range(i, min(i + batch, len(images)))) for i in range(0, len(images), batch)]
    preds: dict[int, int] = {}
    lock = threading.Lock()

    def run(ci: int) -> None:
        for k in range(ci, len(chunks), len(clients)):
            idx = chunks[k]
            res = clients[ci].infer([images[i] for i in idx], model=model_id, top_k=1)
            with lock:
                for i, r in zip(idx, res):
                    preds[i] = r["top"][0]["index"]

    from loadgen import run_threads

    dt = run_threads(run, len(clients))
    return dt, sum(int(preds[i] == labels[i]) for i in range(len(images)))


def service_latencies(client, model_id: str, images: list[bytes]) -> list[float]:
    lat = []
    for b in images:
        t = time.perf_counter()
        client.infer([b], model=model_id, top_k=1)
        lat.append(time.perf_counter() - t)
    return lat


def service_server(gen, client, model_id: str, images: list[bytes], labels: list[int], batch: int,
                   pids: tuple[int, int], snapshot) -> tuple[float, int, float, float, tuple]:
    """(seconds, correct, server CPU seconds, load-generator CPU seconds, (before, after) stage
    snapshots): the same requests as `service_throughput`, sealed by the SDK's protocol
    beforehand and sent by the lean load generator (`loadgen.py`); the answers are opened and
    checked after the timed window."""
    from loadgen import open_answers, seal_requests

    chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
    sealed = seal_requests(client, model_id, chunks, top_k=1)
    before = snapshot()
    c0, l0 = sum(_cpu_pid(p) for p in pids), _cpu_self()
    dt, answers = gen.run(sealed)
    server_cpu, gen_cpu = sum(_cpu_pid(p) for p in pids) - c0, _cpu_self() - l0
    after = snapshot(end=True)
    results = [r for rs in open_answers(sealed, answers, client.target(model_id)) for r in rs]
    if len(results) != len(images):
        raise RuntimeError(f"{len(results)} results for {len(images)} images")
    correct = sum(int(r["top"][0]["index"] == y) for r, y in zip(results, labels))
    return dt, correct, server_cpu, gen_cpu, (before, after)


_METRICS: dict = {}


def stage_snapshot(srv, clients: list, end: bool = False, pids: "tuple[int, int] | None" = None) -> dict:
    """Totals of every stage clock (host and enclave through /metrics, the clients here) and the
    CPU seconds of each process, to diff around a phase. The CPU is read after the /metrics call
    at a phase's start and before it at its end (`end`), so that the snapshots' own work (a GET,
    a stats op) stays out of every process's figure; one keep-alive httpx client makes them, and
    `pids` (host, enclave) spares the /healthz call that finds the enclave's."""
    import httpx

    from enclaveml.timing import StageClock

    host, enclave = pids or (srv.pid, srv.enclave_pid())

    def cpu():
        return {"host": _cpu_pid(host), "enclave": _cpu_pid(enclave), "client": _cpu_self()}

    def ctx():
        return {"host": _ctx_switches(host), "enclave": _ctx_switches(enclave), "client": _ctx_switches("self")}

    before = cpu() if end else None
    before_ctx = ctx() if end else None
    http = _METRICS.get(srv.url) or _METRICS.setdefault(srv.url, httpx.Client(timeout=30))
    r = http.get(srv.url + "/metrics", params={"format": "json", "stages": 1})
    r.raise_for_status()
    st = r.json()["stages"]
    merged = StageClock()
    for c in clients:
        for k, v in c.clock.snapshot().items():
            merged.add(k, v["wall_ns"], v["cpu_ns"], v["n"])
    return {"host": st["host"], "enclave": st["enclave"], "client": merged.snapshot(), "cpu": before or cpu(),
            "ctx": before_ctx or ctx()}


#: (row name, side, stage) of the breakdown table, in the order a request meets them.
_ROWS = (
    ("client: encode + HPKE seal", "client", "client_seal"),
    ("client: HTTP round trip", "client", "client_http"),
    ("host: HTTP request in app (middleware)", "host", "http_infer"),
    ("host: read body", "host", "read_body"),
    ("host: front stage (queue + call)", "host", "front_total"),
    ("host: front call (send..reply)", "host", "front_call"),
    ("host: front send (blobs, frame)", "host", "front_send"),
    ("enclave: front_batch op", "enclave", "op_front_batch"),
    ("enclave: target check", "enclave", "target_check"),
    ("enclave: HPKE open", "enclave", "hpke_open"),
    ("enclave: replay + payload", "enclave", "replay_and_payload"),
    ("enclave: decode + preprocess", "enclave", "decode_preprocess"),
    ("enclave: FrontNet", "enclave", "frontnet"),
    ("enclave: BackNet (pass answered in one round trip)", "enclave", "backnet"),
    ("host: answered in one round trip (front stage)", "host", "one_op_answers"),
    ("host: front unpack", "host", "front_unpack"),
    ("host: backnet stage (queue + run)", "host", "backnet_total"),
    ("host: BackNet forward", "host", "backnet_forward"),
    ("host: finish stage (queue + call)", "host", "finish_total"),
    ("host: finish call (send..reply)", "host", "finish_call"),
    ("host: finish send (cat, frame)", "host", "finish_send"),
    ("enclave: finish_batch op", "enclave", "op_finish_batch"),
    ("enclave: class mapping + softmax", "enclave", "class_mapping"),
    ("enclave: encode result", "enclave", "encode_result"),
    ("enclave: HPKE seal response", "enclave", "hpke_seal"),
    ("client: HPKE open + decode", "client", "client_open"),
    ("host: garbage collection, generation 0", "host", "gc_gen0"),
    ("host: garbage collection, generation 1", "host", "gc_gen1"),
    ("host: garbage collection, generation 2 (full)", "host", "gc_gen2"),
    ("enclave: garbage collection, generation 0", "enclave", "gc_gen0"),
    ("enclave: garbage collection, generation 1", "enclave", "gc_gen1"),
    ("enclave: garbage collection, generation 2 (full)", "enclave", "gc_gen2"),
)


def breakdown(before: dict, after: dict, units: int) -> dict:
    """Per-unit (request or image) wall and CPU microseconds of each stage between two
    snapshots, plus derived rows: the channel hops (call minus the enclave's op), HTTP outside
    the app (client round trip minus the middleware's time) and each process's CPU that no stage
    accounts for (uvicorn's HTTP parsing, asyncio, channel framing and copies, httpx)."""
    from enclaveml.timing import diff

    d = {side: diff(after[side], before[side]) for side in ("host", "enclave", "client")}
    u = max(1, units)

    def wall(side, st):
        return d[side].get(st, {}).get("wall_ns", 0) / 1e3 / u

    def cpu(side, st):
        return d[side].get(st, {}).get("cpu_ns", 0) / 1e3 / u

    rows = {name: {"wall_us": round(wall(side, st), 1), "cpu_us": round(cpu(side, st), 1)}
            for name, side, st in _ROWS if st in d[side]}
    rows["channel hop: front (call - op)"] = {"wall_us": round(wall("host", "front_call") - wall("enclave", "op_front_batch"), 1), "cpu_us": None}
    if "finish_call" in d["host"]:  # none when every request was answered in one round trip
        rows["channel hop: finish (call - op)"] = {"wall_us": round(wall("host", "finish_call") - wall("enclave", "op_finish_batch"), 1), "cpu_us": None}
    if "client_http" in d["client"]:  # not in the lean load generator's phase (no client clocks)
        rows["HTTP outside the app (httpx, loopback, uvicorn)"] = {
            "wall_us": round(wall("client", "client_http") - wall("host", "http_infer"), 1), "cpu_us": None}
    cpu_d = {k: (after["cpu"][k] - before["cpu"][k]) * 1e6 / u for k in after["cpu"]}
    host_staged = sum(cpu("host", st) for st in ("read_body", "front_send", "front_unpack", "finish_send", "backnet_forward"))
    enclave_staged = sum(cpu("enclave", st) for st in ("op_front_batch", "op_finish_batch"))
    client_staged = sum(cpu("client", st) for st in ("client_seal", "client_http", "client_open"))
    rows["host: CPU in no stage (uvicorn, asyncio, channel I/O)"] = {"wall_us": None, "cpu_us": round(cpu_d["host"] - host_staged, 1)}
    rows["enclave: CPU in no op (channel I/O, copies)"] = {"wall_us": None, "cpu_us": round(cpu_d["enclave"] - enclave_staged, 1)}
    rows["client: CPU in no stage (bench threads)" if d["client"] else "load generator: CPU (bench threads)"] = {
        "wall_us": None, "cpu_us": round(cpu_d["client"] - client_staged, 1)}
    rows["process CPU: host / enclave / client"] = {"wall_us": None, "cpu_us": [round(cpu_d[k], 1) for k in ("host", "enclave", "client")]}
    if "ctx" in after and "ctx" in before:  # per unit: voluntary, involuntary
        rows[CTX_ROW] = {"wall_us": None, "cpu_us": None, "switches": [
            [round((after["ctx"][k][i] - before["ctx"][k][i]) / u, 2) for i in (0, 1)] for k in ("host", "enclave", "client")]}
    for side in ("host", "enclave"):
        for g in (0, 1, 2):
            n = d[side].get(f"gc_gen{g}", {}).get("n", 0)
            if n:
                rows[f"{side}: garbage collections, generation {g}: per unit / mean ms each"] = {
                    "wall_us": None, "cpu_us": None, "requests": [round(n / u, 3),
                                                                   round(d[side][f"gc_gen{g}"]["wall_ns"] / n / 1e6, 3)]}
    one, total = (d["host"].get(st, {}).get("n", 0) for st in ("one_op_answers", "front_total"))
    rows[PATH_ROW] = {"wall_us": None, "cpu_us": None, "requests": [one, total]}
    return rows


#: The breakdown's row with each process's context switches per unit: [[voluntary, involuntary]
#: of the host, the enclave, the client].
CTX_ROW = "context switches per unit, host / enclave / client (voluntary+involuntary)"

#: The breakdown's row that says which path requests took: [answered in one enclave round trip, all].
PATH_ROW = "path: requests answered in one enclave round trip / all"


def path_taken(rows: dict) -> str:
    """'one round trip', 'two round trips' or 'mixed (N of M in one)' for a phase's requests."""
    one, total = rows.get(PATH_ROW, {}).get("requests", [0, 0])
    if not total:
        return "none"
    return "one round trip" if one == total else "two round trips" if one == 0 else f"mixed ({one} of {total} in one)"


def _sum_breakdown(pairs: list, units: int) -> dict:
    """One breakdown over several (before, after) snapshot pairs (the rounds of a phase)."""
    if not pairs:
        return {}
    zero = {"host": (0, 0), "enclave": (0, 0), "client": (0, 0)}
    before = {"host": {}, "enclave": {}, "client": {}, "cpu": {"host": 0.0, "enclave": 0.0, "client": 0.0}, "ctx": zero}
    after = {"host": {}, "enclave": {}, "client": {}, "cpu": {"host": 0.0, "enclave": 0.0, "client": 0.0}, "ctx": dict(zero)}
    from enclaveml.timing import diff

    for b, a in pairs:
        for side in ("host", "enclave", "client"):
            for k, v in diff(a[side], b[side]).items():
                t = after[side].setdefault(k, {"n": 0, "wall_ns": 0, "cpu_ns": 0})
                for f in t:
                    t[f] += v[f]
        for k in after["cpu"]:
            after["cpu"][k] += a["cpu"][k] - b["cpu"][k]
        if "ctx" in a and "ctx" in b:
            for k in after["ctx"]:
                after["ctx"][k] = tuple(x + a["ctx"][k][i] - b["ctx"][k][i] for i, x in enumerate(after["ctx"][k]))
    return breakdown(before, after, units)


def print_breakdown(title: str, rows: dict) -> None:
    print(f"{title:58}{'wall us':>10}{'CPU us':>10}", file=sys.stderr)
    for name, v in rows.items():
        if "requests" in v:
            print(f"  {name:56}{'':>10}{'%g / %g' % tuple(v['requests']):>10}", file=sys.stderr)
            continue
        if "switches" in v:
            print(f"  {name:56}{'':>10}  " + " / ".join("%g+%g" % tuple(x) for x in v["switches"]), file=sys.stderr)
            continue
        w = "" if v["wall_us"] is None else f"{v['wall_us']:.1f}"
        c = v["cpu_us"]
        c = "" if c is None else (" / ".join(f"{x:.0f}" for x in c) if isinstance(c, list) else f"{c:.1f}")
        print(f"  {name:56}{w:>10}{c:>10}", file=sys.stderr)


def main() -> None:
    from enclaveml import paths
    from enclaveml.crypto import SigningKey
    from enclaveml.models import zoo
    from enclaveml.models.bundle import make_bundle
    from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env

    shared = paths.shared_dir()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("DATA") or (str(shared / "data" / "cifar10" / "test") if shared else None))
    shipped = zoo.WEIGHTS_DIR / "darknet.assessment.json"  # the full assessment shipped with the zoo
    found = [str(a) for a in ("out/bench/assess/darknet/assessment.json", shipped) if Path(a).exists()]
    ap.add_argument("--assessment", default=os.environ.get("ASSESSMENT") or (found[0] if found else None),
                    help="assessment.json whose recommended split to use (default: `make bench-assess`'s, "
                         "else the full darknet assessment shipped with the zoo; absent: --k)")
    ap.add_argument("--k", type=int, default=10, help="split when no assessment is given")
    ap.add_argument("--plain-processes", type=int, default=os.cpu_count() or 1,
                    help="single-thread plain processes for the strongest baseline (0: skip)")
    ap.add_argument("--limit", type=int, default=None, help="use this many test images (default: all)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads for the throughput figure")
    ap.add_argument("--batch", type=int, default=32, help="images per client request (and plain batch)")
    ap.add_argument("--single", type=int, default=400, help="single-image requests for latency")
    ap.add_argument("--rounds", type=int, default=4, help="alternations of plain and service runs")
    ap.add_argument("--plain-threads", default=f"1,{os.cpu_count() or 1}",
                    help="torch thread counts to try for plain PyTorch; the best throughput is the baseline")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of the server's host process")
    ap.add_argument("--server-args", default="", help="extra `enclaveml serve` arguments")
    ap.add_argument("--backnet-small", default="auto", choices=("auto", "enclave", "host"),
                    help="`serve --backnet-small`: where passes of at most 4 images run their BackNet (auto: the "
                         "enclave on a CPU host, one round trip)")
    ap.add_argument("--backnet", default="auto", choices=("auto", "host", "enclave"),
                    help="`serve --backnet`: where larger passes run their BackNet (auto: the enclave on a CPU host)")
    ap.add_argument("--suite", default="x25519",
                    help="HPKE suite of the requests and the key release (crypto/suites.py): x25519 "
                         "(native, the default), x25519-pyhpke (the original format), mlkem768-x25519 "
                         "(post-quantum hybrid)")
    ap.add_argument("--head", type=int, default=0, help="also run the last N layers in the enclave (partition --head)")
    ap.add_argument("--lean-connections", type=int, default=None,
                    help="keep-alive connections of the lean load generator for the server-capacity figures "
                         "(default: --clients; 0: skip them)")
    args = ap.parse_args()
    if not args.data or not Path(args.data).is_dir():
        sys.exit("no CIFAR-10 test folder: pass --data DIR (DIR/<class>/*.jpg)")

    try:
        model, trained = zoo.load("darknet"), True
    except Exception:
        model, trained = zoo.load("darknet", pretrained=False), False
        print("warning: darknet has no trained weights yet; accuracy figures are meaningless", file=sys.stderr)
    entry = zoo.entry("darknet")
    k, k_source = recommended_k(args.assessment, args.k)
    images, labels, classes = load_test_set(Path(args.data), args.limit)
    print(f"{len(images)} images, darknet split at k={k} ({k_source}), {args.clients} clients x batch {args.batch}",
          file=sys.stderr)

    import copy

    # The strongest plain baseline: the best thread count AND the best memory layout (the enclave
    # runs its FrontNet channels-last; plain gets the same chance), picked on a sample.
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    best = None
    for n in sorted({int(t) for t in args.plain_threads.split(",")}):
        torch.set_num_threads(n)
        for cl in (False, True):
            dt, _ = plain_throughput(model_cl if cl else model, entry.preprocessing, images[:300], labels[:300],
                                     args.batch, channels_last=cl)
            print(f"plain PyTorch, {n} thread(s), {'channels-last' if cl else 'contiguous'}: {300 / dt:.1f} images/s "
                  "on 300 images", file=sys.stderr)
            if best is None or 300 / dt > best[2]:
                best = (n, cl, 300 / dt)
    plain_threads, plain_cl = best[0], best[1]
    plain_model = model_cl if plain_cl else model
    lean = args.clients if args.lean_connections is None else args.lean_connections
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loadgen import LoadGenerator

    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from enclaveml.client import EnclaveClient

    pool = None
    if args.plain_processes > 0:
        pool = ProcessPoolExecutor(args.plain_processes, mp_context=get_context("spawn"), initializer=_proc_init,
                                   initargs=(plain_cl,))
        plain_processes(pool, args.plain_processes, images[:64], labels[:64], args.batch)  # warm up
    acc = {"plain_s": 0.0, "plain_ok": 0, "service_s": 0.0, "service_ok": 0, "plain_cpu": 0.0, "service_cpu": 0.0,
           "proc_s": 0.0, "proc_ok": 0, "proc_cpu": 0.0, "plain1_cpu": 0.0, "plain1_n": 0, "plain1cl_cpu": 0.0,
           "service_server_cpu": 0.0, "lean_s": 0.0, "lean_ok": 0, "lean_cpu": 0.0, "lean_gen_cpu": 0.0}
    lat_plain: list[float] = []
    lat_service: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        owner = SigningKey.generate()
        _, key = make_bundle(model, k, tmp / "bundle", {"zoo": "darknet"}, entry.preprocessing, classes, owner,
                             head=args.head)
        home = tmp / "home"
        extra = ["--torch-threads", str(args.torch_threads), "--backnet-small", args.backnet_small,
                 "--backnet", args.backnet, *args.server_args.split()]
        with ServerProcess(tmp / "store", tmp / "server.log", env=server_env(home), extra_args=extra) as srv:
            policy = local_sim_policy(home)
            from dataclasses import replace

            from enclaveml.crypto import check_suite

            policy = replace(policy, crypto={"suite": check_suite(args.suite)})
            with EnclaveClient(srv.url, policy) as c:
                c.deploy(tmp / "bundle", key, owner, model_id="darknet")
                policy = c.policy  # now pins the deployed model, as the owner's policy file would
            import httpx

            placement = httpx.get(srv.url + "/healthz", timeout=60).json().get("backnet")
            enclave_memory = {"after_deploy": _memory_mib(srv.enclave_pid())}
            clients = [EnclaveClient(srv.url, policy) for _ in range(args.clients)]
            for c in clients:
                c.infer([images[0]], model="darknet")  # attest and warm each connection
            gen = LoadGenerator(srv.url, lean) if lean > 0 else None
            # Rounds alternate plain and service on the same slices, so that a machine whose load
            # changes during the run (shared CI) treats both alike.
            n, r = len(images), args.rounds
            stage_acc = {"throughput": [], "single": [], "server": []}  # (before, after) snapshots per phase
            for i in range(r):
                part = slice(i * n // r, (i + 1) * n // r)
                single = images[i * args.single // r:(i + 1) * args.single // r]
                torch.set_num_threads(plain_threads)
                c0 = _cpu_self()
                pdt, ok = plain_throughput(plain_model, entry.preprocessing, images[part], labels[part], args.batch,
                                           channels_last=plain_cl)
                acc["plain_cpu"] += _cpu_self() - c0
                acc["plain_s"] += pdt
                acc["plain_ok"] += ok
                if pool is not None:
                    qdt, ok, qcpu = plain_processes(pool, args.plain_processes, images[part], labels[part], args.batch)
                    acc["proc_s"] += qdt
                    acc["proc_ok"] += ok
                    acc["proc_cpu"] += qcpu
                torch.set_num_threads(1)  # plain CPU per image on one thread: the cost floor
                c0 = _cpu_self()
                plain_throughput(model, entry.preprocessing, images[part][:200], labels[part][:200], args.batch)
                acc["plain1_cpu"] += _cpu_self() - c0
                acc["plain1_n"] += len(images[part][:200])
                c0 = _cpu_self()
                plain_throughput(model_cl, entry.preprocessing, images[part][:200], labels[part][:200], args.batch,
                                 channels_last=True)
                acc["plain1cl_cpu"] += _cpu_self() - c0
                torch.set_num_threads(plain_threads)
                lat_plain += plain_latencies(plain_model, entry.preprocessing, single, channels_last=plain_cl)
                torch.set_num_threads(1)
                pids = (srv.pid, srv.enclave_pid())
                s0 = stage_snapshot(srv, clients, pids=pids)
                c0, h0 = _cpu_self(), sum(_cpu_pid(p) for p in pids)
                sdt, ok = service_throughput(clients, "darknet", images[part], labels[part], args.batch)
                h1 = sum(_cpu_pid(p) for p in pids)
                acc["service_cpu"] += _cpu_self() - c0 + h1 - h0
                acc["service_server_cpu"] += h1 - h0
                acc["service_s"] += sdt
                acc["service_ok"] += ok
                s1 = stage_snapshot(srv, clients, end=True, pids=pids)
                stage_acc["throughput"].append((s0, s1))
                lean_note = ""
                if gen is not None:  # the same requests, the client's work out of the window
                    ldt, ok, lcpu, gcpu, snaps = service_server(gen, clients[0], "darknet", images[part], labels[part],
                                                                args.batch, pids, lambda end=False: stage_snapshot(srv, clients, end, pids))
                    acc["lean_s"] += ldt
                    acc["lean_ok"] += ok
                    acc["lean_cpu"] += lcpu
                    acc["lean_gen_cpu"] += gcpu
                    stage_acc["server"].append(snaps)
                    lean_note = f", server (lean load generator) {len(images[part]) / ldt:.0f}"
                s1 = stage_snapshot(srv, clients, pids=pids)
                lat_service += service_latencies(clients[0], "darknet", single)
                s2 = stage_snapshot(srv, clients, end=True, pids=pids)
                stage_acc["single"].append((s1, s2))
                m = len(images[part])
                print(f"round {i + 1}/{r}: plain {m / pdt:.0f}, service {m / sdt:.0f}{lean_note} images/s", file=sys.stderr)
            enclave_memory["at_end"] = _memory_mib(srv.enclave_pid())
            for c in clients:
                c.close()
            if gen is not None:
                gen.close()
            for h in _METRICS.values():
                h.close()
            _METRICS.clear()
    stages = {"throughput_per_image": _sum_breakdown(stage_acc["throughput"], n),
              "throughput_server_per_image": _sum_breakdown(stage_acc["server"], n),
              "single_per_request": _sum_breakdown(stage_acc["single"], len(lat_service))}
    if pool is not None:
        pool.shutdown()
    procs = ({"images_per_s": n / acc["proc_s"], "accuracy": acc["proc_ok"] / n, "cpu_ms": 1000 * acc["proc_cpu"] / n}
             if pool is not None else None)
    plain = {"images_per_s": n / acc["plain_s"], "accuracy": acc["plain_ok"] / n, "cpu_ms": 1000 * acc["plain_cpu"] / n,
             "p50_ms": 1000 * _pct(lat_plain, 50), "p99_ms": 1000 * _pct(lat_plain, 99)}
    service = {"images_per_s": n / acc["service_s"], "accuracy": acc["service_ok"] / n,
               "cpu_ms": 1000 * acc["service_cpu"] / n,
               "p50_ms": 1000 * _pct(lat_service, 50), "p99_ms": 1000 * _pct(lat_service, 99)}

    best_plain = max(plain["images_per_s"], procs["images_per_s"] if procs else 0)
    # plain single-thread: the cheaper of its two layouts (both measured on the same images)
    cpu1_contiguous = 1000 * acc["plain1_cpu"] / max(1, acc["plain1_n"])
    cpu1_cl = 1000 * acc["plain1cl_cpu"] / max(1, acc["plain1_n"])
    cpu1 = min(cpu1_contiguous, cpu1_cl)
    server = ({"images_per_s": n / acc["lean_s"], "accuracy": acc["lean_ok"] / n, "cpu_ms": 1000 * acc["lean_cpu"] / n,
               "gen_cpu_ms": 1000 * acc["lean_gen_cpu"] / n} if lean > 0 else None)

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    cpu_service = service["cpu_ms"]
    cpu_server = server["cpu_ms"] if server else None
    cpu_procs = procs["cpu_ms"] if procs else None
    out = {
        "images_per_s_service": round(service["images_per_s"], 1),
        "images_per_s_plain": round(plain["images_per_s"], 1),
        "throughput_ratio": round(service["images_per_s"] / plain["images_per_s"], 3),
        "images_per_s_plain_processes": round(procs["images_per_s"], 1) if procs else None,
        "throughput_ratio_best_plain": round(service["images_per_s"] / best_plain, 3),
        "cpu_ms_per_image_plain_1thread": round(cpu1, 3),
        "cpu_ms_per_image_plain_processes": round(procs["cpu_ms"], 3) if procs else None,
        "plain_processes": args.plain_processes,
        "p50_ms_service": round(service["p50_ms"], 3), "p99_ms_service": round(service["p99_ms"], 3),
        "p50_ms_plain": round(plain["p50_ms"], 3), "p99_ms_plain": round(plain["p99_ms"], 3),
        "accuracy_service": round(service["accuracy"], 4), "accuracy_plain": round(plain["accuracy"], 4),
        "images": len(images), "k": k, "head": args.head, "clients": args.clients, "batch": args.batch, "plain_threads": plain_threads, "rounds": args.rounds,
        "cpu_ms_per_image_service": round(service["cpu_ms"], 3), "cpu_ms_per_image_plain": round(plain["cpu_ms"], 3),
        "load_average_1m": round(os.getloadavg()[0], 2), "trained": trained,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
        "suite": args.suite,
        # Where the BackNet ran (serve/placement.py) and the path requests took, per phase.
        "backnet_placement": placement,
        "path_single": path_taken(stages["single_per_request"]),
        "path_throughput": path_taken(stages["throughput_per_image"]),
        "enclave_memory_mib": enclave_memory,
        # Server capacity: the same sealed requests sent by the lean load generator (loadgen.py),
        # so that only the server's processes (host + enclave) do work in the timed window.
        "images_per_s_service_server": round(server["images_per_s"], 1) if server else None,
        "throughput_ratio_server": ratio(server and server["images_per_s"], plain["images_per_s"]),
        "throughput_ratio_best_plain_server": ratio(server and server["images_per_s"], best_plain),
        "accuracy_service_server": round(server["accuracy"], 4) if server else None,
        "cpu_ms_per_image_server": round(cpu_server, 3) if server else None,
        "cpu_ms_per_image_loadgen": round(server["gen_cpu_ms"], 3) if server else None,
        "cpu_ms_per_image_service_host_enclave": round(1000 * acc["service_server_cpu"] / n, 3),
        "lean_connections": lean,
        # CPU per image against plain on one thread alone (the "plain single-thread") and
        # against one single-thread process per core (the machine's limit, caches shared).
        "cpu_ratio_service_plain_1thread": ratio(cpu_service, cpu1),
        "cpu_ratio_server_plain_1thread": ratio(cpu_server, cpu1),
        "cpu_ratio_service_plain_processes": ratio(cpu_service, cpu_procs),
        "cpu_ratio_server_plain_processes": ratio(cpu_server, cpu_procs),
        # Plain's layouts: `cpu_ms_per_image_plain_1thread` is the cheaper; `plain_layout` is the
        # one the throughput, process and latency baselines use (the faster on the sample).
        "cpu_ms_per_image_plain_1thread_contiguous": round(cpu1_contiguous, 3),
        "cpu_ms_per_image_plain_1thread_channels_last": round(cpu1_cl, 3),
        "plain_layout": "channels_last" if plain_cl else "contiguous",
        "stages": stages,
    }
    print_breakdown(f"throughput phase, per image ({args.clients} clients x batch {args.batch})",
                    stages["throughput_per_image"])
    if stages["throughput_server_per_image"]:
        print_breakdown(f"server capacity, per image (lean load generator, {lean} connections)",
                        stages["throughput_server_per_image"])
    print_breakdown("single-image requests, per request", stages["single_per_request"])
    print(f"BackNet placement {placement}; single requests took {out['path_single']}, the throughput phase's "
          f"{out['path_throughput']}", file=sys.stderr)
    print(f"{'':18}{'service':>12}{'plain':>12}", file=sys.stderr)
    print(f"{'images/s':18}{out['images_per_s_service']:>12}{out['images_per_s_plain']:>12}"
          f"   ({out['images_per_s_plain_processes']} with {args.plain_processes} single-thread processes)",
          file=sys.stderr)
    print(f"{'p50 ms (single)':18}{out['p50_ms_service']:>12}{out['p50_ms_plain']:>12}", file=sys.stderr)
    print(f"{'p99 ms (single)':18}{out['p99_ms_service']:>12}{out['p99_ms_plain']:>12}", file=sys.stderr)
    print(f"{'CPU ms/image':18}{out['cpu_ms_per_image_service']:>12}{out['cpu_ms_per_image_plain']:>12}"
          f"   (plain 1 thread alone {out['cpu_ms_per_image_plain_1thread']}, per-core processes "
          f"{out['cpu_ms_per_image_plain_processes']})", file=sys.stderr)
    if server:
        print(f"{'server only':18}{out['images_per_s_service_server']:>12}{'':>12}   images/s, "
              f"{out['cpu_ms_per_image_server']} CPU ms/image (host + enclave; load generator "
              f"{out['cpu_ms_per_image_loadgen']}), ratio to best plain {out['throughput_ratio_best_plain_server']}",
              file=sys.stderr)
    print(f"{'top-1 accuracy':18}{out['accuracy_service']:>12}{out['accuracy_plain']:>12}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
