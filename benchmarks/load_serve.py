"""Load run: >= 10,000 single-image requests from 16 concurrent clients, 1% of them bad.

Trust side: operator (owner, clients and server on one machine, loopback only). Bounded: it
sends exactly --requests requests and stops.

Bad requests, mixed in at random (--bad-fraction, default 1%): tampered ciphertext, truncated
ciphertext, a replay of an earlier good request, an encrypted non-image, a request for an unknown
model, an oversized body. Checks: the server never crashes (same host and enclave process at the
end, /healthz ok), every good request gets exactly the plain model's top-1 answer, every bad one
is refused with its status (400/409/422/404/413), and the server's error counters add up. Prints
one JSON object as its last line (with the host's and the enclave's resident memory after deploy
and at the end, "memory_mib"; each process's garbage collections per generation while the requests ran,
count and mean duration, "garbage_collections") and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

BAD_KINDS = {"tampered": 400, "truncated": 400, "replayed": 409, "non_image": 422, "unknown_model": 404,
             "oversized": 413}
MAX_REQUEST = 65536


def _stages(url: str) -> dict:
    return httpx.get(url + "/metrics", params={"format": "json", "stages": 1}, timeout=30).json()["stages"]


def _memory(host_pid: int, enclave_pid: int) -> dict:
    """Resident and peak resident memory (VmRSS, VmHWM, MiB) of the host and the enclave worker."""
    out = {}
    for side, pid in (("host", host_pid), ("enclave", enclave_pid)):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[f"{side}_{'rss' if key == 'VmRSS' else 'peak'}"] = round(int(value.split()[0]) / 1024, 1)
    return out


def main() -> None:
    from enclaveml import paths
    from enclaveml.client import EnclaveClient
    from enclaveml.crypto import SigningKey, frame_fresh
    from enclaveml.models import zoo
    from enclaveml.models.bundle import make_bundle
    from enclaveml.protocol import infer as protocol
    from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env

    shared = paths.shared_dir()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("DATA") or (str(shared / "data" / "cifar10" / "test") if shared else None))
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--bad-fraction", type=float, default=0.01)
    ap.add_argument("--images", type=int, default=1000, help="distinct test images to cycle through")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from enclaveml.data.folder import list_image_folder

    _, samples = list_image_folder(args.data)
    samples = samples[:: max(1, len(samples) // args.images)][: args.images]
    images = [Path(p).read_bytes() for p, _ in samples]
    try:
        model = zoo.load("darknet")
    except Exception:
        model = zoo.load("darknet", pretrained=False)
    entry = zoo.entry("darknet")
    with torch.no_grad():
        expected = [int(model(entry.preprocessing(b).unsqueeze(0)).argmax()) for b in images]

    rng = random.Random(args.seed)
    plan = ["good"] * args.requests
    kinds = list(BAD_KINDS)
    n_bad = max(len(kinds), round(args.requests * args.bad_fraction))
    for n, i in enumerate(rng.sample(range(args.clients * 2, args.requests), n_bad)):
        plan[i] = kinds[n % len(kinds)]  # every kind appears; none in each client's first requests

    stats = Counter()
    wrong: list[dict] = []
    accepted_bad: list[dict] = []
    lock = threading.Lock()
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

    with tempfile.TemporaryDirectory(prefix="load-serve-") as tmp:
        tmp = Path(tmp)
        owner = SigningKey.generate()
        _, key = make_bundle(model, args.k, tmp / "bundle", {"zoo": "darknet"}, entry.preprocessing,
                             list(entry.classes), owner)
        home = tmp / "home"
        extra = ["--max-request-bytes", str(MAX_REQUEST)]
        with ServerProcess(tmp / "store", tmp / "server.log", env=server_env(home), extra_args=extra) as srv:
            policy = local_sim_policy(home)
            with EnclaveClient(srv.url, policy) as c:
                c.deploy(tmp / "bundle", key, owner, model_id="darknet")
                policy = c.policy  # pins the deployed model
            host_pid, enclave_pid = srv.pid, srv.enclave_pid()
            memory = {"after_deploy": _memory(host_pid, enclave_pid)}
            stages0 = _stages(srv.url)
            owner_hex = owner.public_key().to_bytes().hex()
            counter = iter(range(args.requests))

            def client_loop(ci: int) -> None:
                cl = EnclaveClient(srv.url, policy)
                http = httpx.Client(timeout=60, transport=httpx.HTTPTransport(socket_options=nodelay))
                att = cl.attest()
                target = cl.target("darknet")
                cl.identity("darknet", att)  # the deployment is the pinned one
                last_good: bytes | None = None
                try:
                    while True:
                        with lock:
                            i = next(counter, None)
                        if i is None:
                            return
                        kind = plan[i]
                        img_i = i % len(images)
                        body = images[img_i] if kind != "non_image" else os.urandom(500)
                        msg, ctx, aad = protocol.seal_infer(att.public_key, target,
                                                            frame_fresh(protocol.encode_payload(body, 1)))
                        model_id = f"{owner_hex}/darknet"
                        if kind == "tampered":
                            b = bytearray(msg)
                            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                            msg = bytes(b)
                        elif kind == "truncated":
                            msg = msg[: rng.randrange(len(msg))]
                        elif kind == "replayed":
                            msg = last_good or msg
                        elif kind == "unknown_model":
                            model_id = f"{owner_hex}/no-such-model"
                        elif kind == "oversized":
                            msg = os.urandom(MAX_REQUEST + 1 + rng.randrange(1000))
                        r = http.post(f"{srv.url}/v1/models/{model_id}/infer", content=msg)
                        with lock:
                            stats["requests"] += 1
                        if kind == "good":
                            ok = r.status_code == 200
                            res = protocol.decode_result(ctx.open_response(r.content, aad)) if ok else None
                            with lock:
                                if ok and res["top"][0]["index"] == expected[img_i]:
                                    stats["good_ok"] += 1
                                else:
                                    wrong.append({"i": i, "status": r.status_code, "body": r.text[:200] if not ok else None})
                            last_good = msg
                        else:
                            with lock:
                                stats[f"bad_{kind}"] += 1
                                if r.status_code == BAD_KINDS[kind]:
                                    stats["bad_rejected"] += 1
                                else:
                                    accepted_bad.append({"i": i, "kind": kind, "status": r.status_code})
                finally:
                    http.close()
                    cl.close()

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(ci,)) for ci in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
            memory["end"] = _memory(host_pid, enclave_pid)
            from enclaveml.timing import diff

            stages = _stages(srv.url)
            gc_stats = {f"{side}_{k}": {"n": v["n"], "mean_ms": round(v["wall_ns"] / v["n"] / 1e6, 3)}
                        for side in ("host", "enclave") for k, v in diff(stages[side], stages0[side]).items()
                        if k.startswith("gc_")}
            health = httpx.get(srv.url + "/healthz", timeout=10)
            alive = health.status_code == 200 and srv.proc.poll() is None
            same_processes = alive and srv.pid == host_pid and health.json()["enclave_pid"] == enclave_pid
            counters = httpx.get(srv.url + "/metrics", params={"format": "json"}, timeout=10).json()["counters"]
            server_errors = {c["labels"]["kind"]: c["value"] for c in counters if c["name"] == "errors_total"}

    n_good = plan.count("good")
    out = {
        "requests": stats["requests"], "clients": args.clients, "seconds": round(dt, 2),
        "requests_per_s": round(stats["requests"] / dt, 1),
        "good": n_good, "good_correct": stats["good_ok"], "wrong_answers": len(wrong),
        "bad": len(plan) - n_good, "bad_rejected": stats["bad_rejected"], "bad_not_rejected": len(accepted_bad),
        "bad_by_kind": {k: stats[f"bad_{k}"] for k in BAD_KINDS}, "server_errors_by_kind": server_errors,
        "server_alive": alive, "same_processes": same_processes,
        "memory_mib": memory, "garbage_collections": gc_stats,
    }
    ok = (out["requests"] == args.requests and not wrong and not accepted_bad and alive and same_processes
          and sum(server_errors.values()) == out["bad"])
    out["ok"] = ok
    for w in (wrong + accepted_bad)[:5]:
        print("problem:", w, file=sys.stderr)
    print(json.dumps(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
