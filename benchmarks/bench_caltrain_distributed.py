"""Data-parallel CalTrain over N enclaves against one enclave: accuracy, time and bytes exchanged.

What it runs, on this machine: two real training servers on the same contributed images, one
`enclaveml train serve` (one host + one enclave worker) and one `enclaveml train serve
--enclaves N` (rank 0's HTTP host + enclave, and N-1 `train peer` processes each with its own
enclave; torch.distributed gloo on loopback). Participants upload to each over HTTP; the owner
runs `train run` (with `--enclaves N` for the group) with the same model, seed and schedule.

    accuracy_single / accuracy_distributed   top-1 of the released models on the test images
    seconds_single / seconds_distributed     `train run` end to end (attest, start, steps,
                                             fingerprints, release); the group's also covers the
                                             handshake (evidence both ways) and the join
    time_ratio                               seconds_distributed / seconds_single
    bytes_exchanged_per_step                 ciphertext bytes that leave one enclave per step for
                                             the others (its sealed FrontNet gradients and
                                             BatchNorm statistics), as rank 0's host counts them
    steps                                    the run's global steps (the same for both)

On a machine with fewer cores than 2N+1 busy processes, the group cannot run faster than one
enclave: the replicas take turns on the same cores and add the exchange. What the figures show
there is the cost of the protocol, not a speed-up (docs/scaling.md).

Run: `python benchmarks/bench_caltrain_distributed.py` (defaults: 3,000 CIFAR-10 images,
`darknet:width=16`, k=5, 2 epochs, batch 64, 2 enclaves, 2,000 test images; a few minutes on 2
cores). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_caltrain_networked import DEFAULT_DATA, ROOT, accuracy, free_port, log, participant_folders, pin_policy  # noqa: E402

from enclaveml.keyfiles import load_or_create_signing_key  # noqa: E402
from enclaveml.data.folder import load_image_folder  # noqa: E402
from enclaveml.train.client import HostClient  # noqa: E402
from enclaveml.train.owner import run as owner_run  # noqa: E402
from enclaveml.train.participant import contribute  # noqa: E402
from enclaveml.train.partitioned import TrainConfig  # noqa: E402
from enclaveml.train.spec import ModelSpec  # noqa: E402


def start_server(work: Path, owner_hex: str, threads: int, enclaves: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "ENCLAVEML_HOME": str(work / "home"), "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": str(threads)}
    logf = open(work / f"serve-{enclaves}.log", "wb")
    extra = ["--enclaves", str(enclaves)] if enclaves > 1 else []
    proc = subprocess.Popen([sys.executable, "-m", "enclaveml", "train", "serve", "--store",
                             str(work / f"store-{enclaves}"), "--port", str(port), "--owner", owner_hex,
                             "--threads", str(threads), *extra],
                            env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    c = HostClient(url, timeout=5)
    try:
        for _ in range(900):
            try:
                c.get("/info")
                return proc, url
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError((work / f"serve-{enclaves}.log").read_text()) from None
                time.sleep(0.2)
    finally:
        c.close()
    raise RuntimeError("the training server did not come up")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the host, its enclave worker, the peers: the group we started
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def one(work: Path, owner_key: Path, owner_hex: str, folders: list[Path], spec: ModelSpec, split: int,
        cfg: TrainConfig, threads: int, enclaves: int) -> dict:
    proc, url = start_server(work, owner_hex, threads, enclaves)
    try:
        policy = work / f"policy-{enclaves}.toml"
        pin_policy(url, owner_hex, work / "home", policy)
        for i, d in enumerate(folders):
            rep = contribute(d, url, policy, work / f"p{i + 1}.key", batch=256)
            if rep.rejections or rep.counts.get("accepted", 0) != rep.total:
                raise SystemExit(f"participant {i + 1}: {rep.to_dict()}")
        log(f"{enclaves} enclave(s): contributed; training ...")
        t0 = time.perf_counter()
        res = owner_run(url, policy, spec.text, split, cfg, owner_key, work / f"model-{enclaves}",
                        run_id=f"bench-{enclaves}", checkpoint_every=10**6, poll=0.1,
                        enclaves=enclaves if enclaves > 1 else None)
        res["seconds_wall"] = time.perf_counter() - t0
        log(f"  {res['seconds_wall']:.1f} s")
        return res
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", DEFAULT_DATA)))
    ap.add_argument("--per-class", type=int, default=300, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--participants", type=int, default=2)
    ap.add_argument("--enclaves", type=int, default=2)
    ap.add_argument("--model", default="darknet:width=16")
    ap.add_argument("--split", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = ModelSpec.parse(a.model)
    cfg = TrainConfig(epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed)
    tr = load_image_folder(a.data / "train", spec.preprocessing(), limit_per_class=a.per_class)
    te = load_image_folder(a.data / "test", spec.preprocessing(), limit_per_class=a.test_per_class)
    log(f"data: {len(tr)} train, {len(te)} test")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-caltrain-dp-") as tmp:
        work = Path(tmp)
        owner_key = work / "owner.key"
        owner_hex = load_or_create_signing_key(owner_key).public_key().to_bytes().hex()
        folders = participant_folders(tr, spec.classes, work / "data", a.participants)
        single = one(work, owner_key, owner_hex, folders, spec, a.split, cfg, a.threads, 1)
        dist_ = one(work, owner_key, owner_hex, folders, spec, a.split, cfg, a.threads, a.enclaves)
        from safetensors.torch import load_file

        acc = {}
        for n in (1, a.enclaves):
            m = spec.build()
            m.load_state_dict(load_file(str(work / f"model-{n}" / "model.safetensors")))
            acc[n] = accuracy(m, te, spec)
    out = {
        "benchmark": "caltrain-distributed",
        "seconds_single": round(single["seconds_wall"], 1), "seconds_distributed": round(dist_["seconds_wall"], 1),
        "instances": dist_["instances"], "shard_rank0": dist_.get("shard"), "steps": dist_.get("total"),
        "images": len(tr), "test_images": len(te), "model": spec.text, "split": a.split, "config": cfg.to_dict(),
        "threads": a.threads, "tee": "sim", "device": "cpu", "load_before": [round(x, 1) for x in load_before],
        "load_after": [round(x, 1) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "enclaves": a.enclaves,
        "accuracy_distributed": round(acc[a.enclaves], 4),
        "accuracy_single": round(acc[1], 4),
        "time_ratio": round(dist_["seconds_wall"] / single["seconds_wall"], 3),
        "bytes_exchanged_per_step": int(dist_.get("bytes_per_step") or 0),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
