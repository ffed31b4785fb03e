"""What a CalTrain host that colludes with one participant learns about everyone else's labels.

Run: `make bench-label-leakage` (or e.g. `python benchmarks/bench_label_leakage.py --per-class 1000`).
One training per configuration, all from the same initial weights, batch order, augmentation
and secret class order, with the real enclave and host halves (`EnclaveTrainer`, `HostTrainer`,
the enclave's defences); the attacker is the host plus participant 0 of 4 (it knows that
participant's labels and which rows are its; it sees every row the enclave hands the host and,
without a head, the scores). Every step it guesses the label of every other participant's row:

- exposed (today's default): from dL/dscores (`label_attack.exposed_columns`), the columns named
  by the colluder's rows;
- sealed head (`train run --head N`): from the cut-layer gradients, nearest class centroid of
  the colluder's rows (direction attack, Li et al. 2022) and spherical k-means named by them;
- each defence (`train run --head N --defence NAME:k=v`): the same attacks, best one reported.

Recovery = share of the other participants' rows (all steps) whose label the attacker names;
chance = 1/classes. Accuracy = clean test accuracy of each configuration's model; the exposed
run is plain training step for step (`test_partitioned_matches_plain_training`), so it is the
plain baseline. To fit a shared 2-core CPU: a class-balanced CIFAR-10 subset (`--per-class`),
Darknet at a reduced width (`--width`), few epochs (`--epochs`); the whole test set. No
encryption here: sealing instances changes nothing in what the gradients reveal (the
`bench_caltrain.py` benchmark times the crypto). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from enclaveml.data.folder import load_image_folder
from enclaveml.models import zoo
from enclaveml.models.zoo import darknet
from enclaveml.train.defences import RECOMMENDED, DefenceSpec
from enclaveml.train.fingerprint import predict
from enclaveml.train.label_attack import CentroidAttack, ColumnNamer, exposed_columns, recovery
from enclaveml.train.partitioned import ClassMapping, EnclaveTrainer, HostTrainer, TrainConfig, split_with_head

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
PRE = zoo.entry("darknet").preprocessing
CLASSES = 10


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def train_and_attack(tr, te, owner, cfg: TrainConfig, width: int, k: int, head: int, defence: DefenceSpec,
                     seed: int, window: int) -> dict:
    """One training; every step the colluding host's attacks guess the other participants' labels."""
    torch.manual_seed(seed)
    model = darknet.build(width=width)
    mapping = ClassMapping.random(CLASSES, torch.Generator().manual_seed(seed + 99))
    front, back, head_mod = split_with_head(model, k, head, mapping)
    total = cfg.steps_per_epoch(len(tr)) * cfg.epochs
    enc = EnclaveTrainer(front, mapping, PRE, cfg, total, head=head_mod, defence=defence,
                         defence_seed=seed * 1_000_003 + 17)
    host = HostTrainer(back, cfg, total)
    namer = ColumnNamer(CLASSES)
    attacks = {"centroid": CentroidAttack(CLASSES, window), "kmeans": CentroidAttack(CLASSES, window, kmeans=True)}
    guesses: dict[str, list[torch.Tensor]] = {name: [] for name in (["columns"] if head == 0 else []) + list(attacks)}
    truth, t_train = [], 0.0
    per = cfg.steps_per_epoch(len(tr))
    for step, epoch, idx in cfg.batches(len(tr)):
        x, y = tr.images[idx], tr.labels[idx]
        t0 = time.perf_counter()
        out = host.forward(enc.forward(x, y))
        grad = enc.loss_grad(out)  # what the host receives
        enc.backward(host.backward(grad))
        t_train += time.perf_counter() - t0
        known = owner[idx] == 0
        if head == 0:
            cols = exposed_columns(out, grad)
            namer.observe(cols[known], y[known])
            guesses["columns"].append(cols[~known])  # named at the end, with all the votes
        for name, att in attacks.items():
            guesses[name].append(att.step(grad, known, y[known])[~known])
        truth.append(y[~known])
        if (step + 1) % per == 0:
            log(f"    epoch {epoch + 1}/{cfg.epochs}: loss {enc.last_loss:.3f} ({t_train:.0f}s)")
    mapping.unpermute_rows(model.layers[-1])
    if head == 0:
        guesses["columns"] = [namer.name(c) for c in guesses["columns"]]
    truth_t = torch.cat(truth)
    per_attack = {name: round(recovery(torch.cat(g), truth_t), 4) for name, g in guesses.items()}
    last = slice(len(truth) - per, None)
    last_epoch = {name: round(recovery(torch.cat(g[last]), torch.cat(truth[last])), 4) for name, g in guesses.items()}
    acc = float((predict(model, te.images, PRE) == te.labels).float().mean())
    return {"head": head, "defence": defence.to_dict(), "recovery": max(per_attack.values()),
            "attacks": per_attack, "recovery_last_epoch": max(last_epoch.values()), "accuracy": round(acc, 4),
            "train_seconds": round(t_train, 1), "rows_attacked": len(truth_t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", DEFAULT_DATA)))
    ap.add_argument("--per-class", type=int, default=500, help="training images per class (subset)")
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all)")
    ap.add_argument("--participants", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--split", type=int, default=5, help="partition point k (FrontNet = first k layers)")
    ap.add_argument("--head", type=int, default=RECOMMENDED["head"], help="layers of the sealed head")
    ap.add_argument("--defences", default="noise:scale=1 noise:scale=2 noise:scale=4 mix:group=4 mix:group=8",
                    help="defences to measure, separated by spaces or ';', each with the sealed head")
    ap.add_argument("--defended", default=None,
                    help="the configuration reported as `defended` (default: the recommended one, "
                    f"{RECOMMENDED['defence']['name']} {RECOMMENDED['defence']['settings']})")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=20, help="steps of colluder rows the centroid attack pools")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    tr = load_image_folder(a.data / "train", PRE, limit_per_class=a.per_class)
    te = load_image_folder(a.data / "test", PRE, limit_per_class=a.test_per_class)
    log(f"data: {len(tr)} train, {len(te)} test ({time.time() - t0:.0f}s)")
    g = torch.Generator().manual_seed(a.seed)
    owner = torch.empty(len(tr), dtype=torch.long)
    owner[torch.randperm(len(tr), generator=g)] = torch.arange(len(tr)) % a.participants
    cfg = TrainConfig(epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed)
    defended = DefenceSpec.parse(a.defended) if a.defended else DefenceSpec.from_dict(RECOMMENDED["defence"])
    specs = [DefenceSpec.parse(t) for t in a.defences.replace(";", " ").split()]
    if defended not in specs:
        specs.append(defended)
    runs = [("exposed", 0, DefenceSpec()), ("sealed_head", a.head, DefenceSpec())]
    runs += [(f"head{a.head}+{s.text}", a.head, s) for s in specs]
    results = {}
    for name, head, spec in runs:
        log(f"[{name}] training {len(tr)} instances, {a.epochs} epochs, darknet width {a.width}, k={a.split}, "
            f"head {head}, defence {spec.text}")
        results[name] = train_and_attack(tr, te, owner, cfg, a.width, a.split, head, spec, a.seed, a.window)
        log(f"[{name}] {json.dumps(results[name])}")
    plain = results["exposed"]["accuracy"]
    log("")
    log(f"{'configuration':28s} {'recovery':>9s} {'last epoch':>11s} {'accuracy':>9s} {'vs plain':>9s} {'train s':>8s}")
    for name, r in results.items():
        log(f"{name:28s} {r['recovery']:9.4f} {r['recovery_last_epoch']:11.4f} {r['accuracy']:9.4f} "
            f"{100 * (r['accuracy'] - plain):+8.2f}p {r['train_seconds']:8.1f}")
    chance = 1.0 / CLASSES
    log(f"chance {chance:.4f}")
    d = results[f"head{a.head}+{defended.text}"]
    summary = {
        "chance": chance,
        "recovery": {"exposed": results["exposed"]["recovery"], "sealed_head": results["sealed_head"]["recovery"],
                     "defended": d["recovery"]},
        "accuracy_plain": plain,
        "accuracy_defended": d["accuracy"],
        "defence": {**defended.to_dict(), "head": a.head},
        "goal_met": d["recovery"] <= chance + 0.10 and plain - d["accuracy"] <= 0.02,
        "configurations": results,
        "setup": {"train": len(tr), "test": len(te), "participants": a.participants, "colluder": 0,
                  "model": f"darknet width {a.width}", "split": a.split, "epochs": a.epochs, "batch": a.batch,
                  "seed": a.seed, "window": a.window,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads",
                  "load_average": [round(x, 2) for x in os.getloadavg()],
                  "command": "python benchmarks/bench_label_leakage.py " + " ".join(sys.argv[1:]),
                  "total_seconds": round(time.time() - t0, 1)},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
