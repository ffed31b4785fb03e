"""CalTrain across the channel: the networked system's training time against plain PyTorch.

What it measures: the owner-visible time of one CalTrain training run on the real system, as
`enclaveml train serve` runs it (an HTTP host process with the BackNet, and an enclave worker
process with the FrontNet, labels, loss and data, connected by the enclave channel), against
plain PyTorch training (`PlainTrainer`) of the same model, seed, schedule and images, in this
process. (Not the same initial weights: the enclave draws its own from a keyed seed that the host
cannot recompute, so plain and CalTrain start from different random weights of the same
distribution.)

    seconds_caltrain        `train.owner.run` end to end: attest, start (the host hands every
                            sealed instance to the enclave, which opens and re-verifies them),
                            all training steps over the channel (the enclave decrypts and
                            re-verifies each batch), fingerprints + sealed linkage records, and
                            the release sealed to the owner
    seconds_caltrain_steps  the training steps alone: the host's step loop (its stage clock
                            `run_steps`, `GET /train/stages`)
    seconds_caltrain_server the host's own count: steps + fingerprints + linkage records
    phases_caltrain         where the end-to-end time goes (median s): attest (plan + evidence),
                            start (the start request: sealed instances to the enclave, which opens
                            them; its model and the host's BackNet), steps, finish (the owner's
                            wait after the last step: fingerprints, sealed linkage records, the
                            sealed final state, the long poll's answer), release (attest again,
                            the sealed release, the model folder and its bundle)
    fixed_seconds_caltrain  seconds_caltrain - steps (median): the per-run costs outside the steps
    stages_caltrain         the host's (`host.*`) and the enclave's (`enclave.*`) stage totals per
                            run (median s; enclave.batch_* run on its prefetch thread, overlapped
                            with the host's BackNet; `enclave.batch_wait` is what the steps waited
                            for them). Printed as a table on stderr before the JSON line.
    seconds_plain           the plain training loop on decoded uint8 images already in memory
    time_ratio              seconds_caltrain / seconds_plain (time_ratio_steps: steps only)
    accuracy_*              top-1 on the test images (`--test-per-class`, default all)

Runs alternate, plain first: plain, CalTrain, plain, ... (`--repeats` CalTrain runs, one more
plain run), and each figure is the median of its runs, because the machine is shared and its
load drifts. The CalTrain runs (same configuration, other run ids) must release bit-identical
weights (checked: `networked_runs_identical`): the enclave derives the secret class permutation from the
run's configuration and data, so the same training is the same computation. The first
CalTrain run on a fresh server also pays one-time warm-up (imports, first calls), which the
median of the default 3 runs leaves out; `seconds_caltrain_runs` lists every run.

Participants (`--participants`) contribute the images over HTTP first (signed, HPKE-encrypted
to the attested enclave); that time is reported (`seconds_contribute`) but is not training.
The enclave trains in its own order (instances sorted by keyed tag) from its own initial weights,
so the two see the same images in different orders: accuracies agree statistically, not exactly.

Run: `python benchmarks/bench_caltrain_networked.py` (defaults: 5,000 CIFAR-10 images,
`darknet:width=16`, k=5, 2 epochs, 3 CalTrain and 4 plain runs; about 2 minutes on 2 cores).
Torch threads: `--threads` for the plain run and for each of the host and enclave processes
(they work in turn, not at once).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from enclaveml import keyfiles
from enclaveml.crypto import SigningKey
from enclaveml.data.folder import load_image_folder
from enclaveml.tee import Evidence, verify_claims_only, write_policy
from enclaveml.tee.sim import sim_policy
from enclaveml.timing import diff
from enclaveml.train.client import HostClient
from enclaveml.train.enclave import enclave_config
from enclaveml.train.fingerprint import predict
from enclaveml.train.owner import run as owner_run
from enclaveml.train.participant import contribute
from enclaveml.train.partitioned import PlainTrainer, TrainConfig
from enclaveml.train.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, owner_hex: str, threads: int) -> tuple[subprocess.Popen, str]:
    """`enclaveml train serve` in its own process group, with this run's own sim platform."""
    port = free_port()
    env = {**os.environ, "ENCLAVEML_HOME": str(work / "home"), "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": str(threads)}
    logf = open(work / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "enclaveml", "train", "serve", "--store", str(work / "store"),
                             "--port", str(port), "--owner", owner_hex, "--threads", str(threads)],
                            env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    c = HostClient(url, timeout=5)
    try:
        for _ in range(600):
            try:
                c.get("/info")
                return proc, url
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError((work / "serve.log").read_text()) from None
                time.sleep(0.2)
    finally:
        c.close()
    raise RuntimeError("the training server did not come up")


def pin_policy(url: str, owner_hex: str, home: Path, path: Path) -> None:
    """Pin the measurement the running enclave reports (the source tree may change meanwhile;
    the evidence's signature, platform key and key binding are still checked on every use)."""
    c = HostClient(url)
    try:
        body = c.get_json("/evidence", nonce=os.urandom(32).hex())
    finally:
        c.close()
    m = verify_claims_only(Evidence.from_dict(body["evidence"])).measurement
    write_policy(sim_policy(enclave_config(owner_hex), platform_dir=home / "sim-platform",
                            measurements={"sim": [m]}), path)


def participant_folders(tr, classes: list[str], out: Path, n: int) -> list[Path]:
    """Instance i goes to participant i % n (symlinks to the data set's files)."""
    dirs = [out / f"participant{p + 1}" for p in range(n)]
    for i, (path, y) in enumerate(zip(tr.paths, tr.labels.tolist())):
        d = dirs[i % n] / classes[y]
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(path).name).symlink_to(Path(path).resolve())
    return dirs


def train_plain(spec: ModelSpec, tr, cfg: TrainConfig) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(cfg.seed)  # the enclave uses a keyed seed instead (the host must not know its weights)
    model = spec.build()
    total = cfg.steps_per_epoch(len(tr)) * cfg.epochs
    trainer = PlainTrainer(model, spec.preprocessing(), cfg, total)
    t0 = time.perf_counter()
    for _, _, idx in cfg.batches(len(tr)):
        trainer.train_step(tr.images[idx], tr.labels[idx])
    return model, time.perf_counter() - t0


def stages(url: str) -> dict:
    """The server's per-stage totals (host and enclave, `GET /train/stages`)."""
    c = HostClient(url)
    try:
        return c.get_json("/train/stages")
    finally:
        c.close()


def stage_seconds(after: dict, before: dict) -> dict[str, float]:
    """Wall seconds per stage between two `stages` snapshots, host stages as `host.X`, enclave's as `enclave.X`."""
    out = {}
    for side in ("host", "enclave"):
        for k, v in diff(after.get(side, {}), before.get(side, {})).items():
            out[f"{side}.{k}"] = round(v["wall_ns"] / 1e9, 3)
    return out


#: The run's phases (s) from the owner's clock and the host's stage clock (see the module docstring).
PHASES = ("attest", "start", "steps", "finish", "release")


def phases_of(res: dict, st: dict[str, float]) -> dict[str, float]:
    """attest (plan + evidence), start (the owner's start request: add_data + the enclave's start),
    steps (the host's step loop), finish (fingerprints + sealed linkage records + final state, as
    the owner waits for them), release (attest again + release + the model folder and bundle)."""
    p = res.get("phases", {})
    steps = st.get("host.run_steps", 0.0)
    return {"attest": round(p.get("plan", 0) + p.get("attest", 0), 3), "start": p.get("start", 0.0),
            "steps": round(steps, 3), "finish": round(p.get("train", 0) - steps, 3),
            "release": round(p.get("release_attest", 0) + p.get("release", 0), 3)}


def train_networked(url: str, work: Path, owner_key: Path, spec: ModelSpec, split: int, cfg: TrainConfig,
                    run_id: str) -> dict:
    """One `train run` against the server; its times (s), phases, stages and the release in work/<run_id>."""
    before = stages(url)
    t0 = time.perf_counter()
    res = owner_run(url, work / "policy.toml", spec.text, split, cfg, owner_key, work / run_id, run_id=run_id,
                    checkpoint_every=10**6, poll=1.0)
    t = time.perf_counter() - t0
    st = stage_seconds(stages(url), before)
    ph = phases_of(res, st)
    return {"seconds": t, "steps": ph["steps"], "server": res.get("seconds"), "phases": ph, "stages": st}


def accuracy(model, te, spec: ModelSpec) -> float:
    return float((predict(model, te.images, spec.preprocessing()) == te.labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", DEFAULT_DATA)))
    ap.add_argument("--per-class", type=int, default=500, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all)")
    ap.add_argument("--participants", type=int, default=3)
    ap.add_argument("--model", default="darknet:width=16")
    ap.add_argument("--split", type=int, default=5, help="partition point k (FrontNet = first k layers)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="CalTrain runs; plain runs before and after each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a shared CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = ModelSpec.parse(a.model)
    pre = spec.preprocessing()
    cfg = TrainConfig(epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed)
    t0 = time.time()
    tr = load_image_folder(a.data / "train", pre, limit_per_class=a.per_class)
    te = load_image_folder(a.data / "test", pre, limit_per_class=a.test_per_class)
    log(f"data: {len(tr)} train, {len(te)} test ({time.time() - t0:.0f}s)")
    if list(tr.classes) != spec.classes:
        raise SystemExit(f"{a.data}: classes {tr.classes} are not the model's {spec.classes}")

    def plain_run(i: int):
        log(f"plain training {i + 1}/{a.repeats + 1} ...")
        model, t = train_plain(spec, tr, cfg)
        log(f"  {t:.1f} s")
        return model, t

    plain, t = plain_run(0)
    t_plains, cal = [t], []
    with tempfile.TemporaryDirectory(prefix="bench-caltrain-net-") as tmp:
        work = Path(tmp)
        owner_key = work / "owner.key"
        owner_hex = keyfiles.load_or_create_signing_key(owner_key).public_key().to_bytes().hex()
        proc, url = start_server(work, owner_hex, a.threads)
        try:
            pin_policy(url, owner_hex, work / "home", work / "policy.toml")
            t1 = time.perf_counter()
            for i, d in enumerate(participant_folders(tr, spec.classes, work / "data", a.participants)):
                rep = contribute(d, url, work / "policy.toml", work / f"p{i + 1}.key", batch=256)
                if rep.rejections or rep.counts.get("accepted", 0) != rep.total:
                    raise SystemExit(f"participant {i + 1}: {rep.to_dict()}")
            t_contribute = time.perf_counter() - t1
            log(f"contributed {len(tr)} instances over HTTP ({t_contribute:.1f} s)")
            for r in range(a.repeats):
                log(f"CalTrain training {r + 1}/{a.repeats} (networked) ...")
                cal.append(train_networked(url, work, owner_key, spec, a.split, cfg, f"bench-{r}"))
                log(f"  {cal[-1]['seconds']:.1f} s end to end, steps {cal[-1]['steps']:.1f} s "
                    f"(server: {cal[-1]['server']} s); phases (s): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in cal[-1]["phases"].items()))
                t_plains.append(plain_run(r + 1)[1])
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the host and its enclave worker: the group we started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        from safetensors.torch import load_file

        released = [load_file(str(work / f"bench-{r}" / "model.safetensors")) for r in range(a.repeats)]
    caltrain = spec.build()
    caltrain.load_state_dict(released[0])
    identical = all(torch.equal(w[k], released[0][k]) for w in released[1:] for k in w)
    t_plain = statistics.median(t_plains)
    t_caltrain = statistics.median(c["seconds"] for c in cal)
    t_steps = statistics.median(c["steps"] for c in cal)
    out = {
        "benchmark": "caltrain-networked",
        "time_ratio": round(t_caltrain / t_plain, 3),
        "time_ratio_steps": round(t_steps / t_plain, 3),
        "seconds_caltrain": round(t_caltrain, 1),
        "seconds_caltrain_steps": round(t_steps, 1),
        "seconds_caltrain_server": statistics.median(c["server"] for c in cal),
        "seconds_plain": round(t_plain, 1),
        "seconds_caltrain_runs": [round(c["seconds"], 1) for c in cal],
        "seconds_plain_runs": [round(t, 1) for t in t_plains],
        "seconds_contribute": round(t_contribute, 1),
        # medians over the CalTrain runs: where the end-to-end time goes
        "phases_caltrain": {k: round(statistics.median(c["phases"][k] for c in cal), 3) for k in PHASES},
        "fixed_seconds_caltrain": round(statistics.median(c["seconds"] - c["phases"]["steps"] for c in cal), 3),
        "stages_caltrain": {k: round(statistics.median(c["stages"].get(k, 0.0) for c in cal), 3)
                            for k in sorted({k for c in cal for k in c["stages"]})},
        "accuracy_caltrain": round(accuracy(caltrain, te, spec), 4),
        "accuracy_plain": round(accuracy(plain, te, spec), 4),
        "networked_runs_identical": identical,
        "images": len(tr), "test_images": len(te), "participants": a.participants, "epochs": a.epochs,
        "steps": cfg.steps_per_epoch(len(tr)) * cfg.epochs, "model": spec.text, "split": a.split,
        "config": cfg.to_dict(), "threads": a.threads, "tee": "sim", "device": "cpu",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    log("phases of a CalTrain run (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in out["phases_caltrain"].items())
        + f"; fixed (end to end - steps) {out['fixed_seconds_caltrain']:.2f}")
    log("stages (median s; host.step_* are the step loop, enclave.* the enclave's own work):")
    for k, v in out["stages_caltrain"].items():
        log(f"  {k:<40} {v:8.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
