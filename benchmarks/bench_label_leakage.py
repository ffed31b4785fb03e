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
  the colluder's rows (direction attack, Li et al. 2022), spherical k-means named by them, k-NN
  (cosine and Euclidean: direction and norm) and a ridge-regression probe trained on them;
- each defence (`train run --head N --defence NAME:k=v`): the same attacks, best one reported;
- forward attacks, which no gradient defence touches: the same four (centroid, k-NN x 2, probe)
  on the IR and on the host's own output (scores or cut-layer features), and the argmax of the
  scores.

Recovery = share of the other participants' rows (all steps) whose label the attacker names,
per channel; chance = 1/classes. The last line's `recovery` is the gradient channel (what the
rows the enclave hands back give away: what a defence changes); `forward_floor` is the forward
channel (the host classifying what it sees, the IR and its own output, with the colluder's
labelled rows: it could do the same at inference); `raw_pixels_reference` is the same forward
attacks on the images themselves, the reference for that floor; `host_flops_share` is the host's
share of a training step's multiply-accumulates (`train.costs`), since a defence that moves the
layers into the enclave also moves the work there. `defended` is chosen from the figures (see
`choose_defended`) unless `--defended` names one; `DEFENCE@k=K,head=H` measures a defence at
another split and head (a thin host). Accuracy = clean test accuracy of each configuration's
model; the exposed run is plain training step for step
(`test_partitioned_matches_plain_training`), so it is the
plain baseline. To fit a shared 2-core CPU: a class-balanced CIFAR-10 subset (`--per-class`),
Darknet at a reduced width (`--width`), few epochs (`--epochs`); the whole test set. No
encryption here: sealing instances changes nothing in what the gradients reveal (the
`bench_caltrain.py` benchmark times the crypto). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from enclaveml.data.folder import load_image_folder
from enclaveml.models import zoo
from enclaveml.models.zoo import darknet
from enclaveml.train.augment import augment
from enclaveml.train.costs import host_flops_share, module_macs
from enclaveml.train.defences import DefenceSpec
from enclaveml.train.fingerprint import predict
from enclaveml.train.label_attack import (CentroidAttack, ColumnNamer, KnnAttack, ProbeAttack, exposed_columns,
                                          recovery)
from enclaveml.models.split import permute_classifier
from enclaveml.train.partitioned import ClassMapping, EnclaveTrainer, HostTrainer, TrainConfig, split_with_head

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
PRE = zoo.entry("darknet").preprocessing
CLASSES = 10


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def train_and_attack(tr, te, owner, cfg: TrainConfig, width: int, k: int, head: int, defence: DefenceSpec,
                     seed: int, window: int, exact_front: bool = False, pixels: bool = False,
                     attack: bool = True) -> dict:
    """One training; every step the colluding host's attacks guess the other participants' labels.

    Gradient attacks use the rows the enclave hands back; forward attacks use what the host
    computes or receives itself (its output: scores or cut-layer features; the IR), which no
    gradient defence touches. `pixels`: the same forward attacks on the raw (normalised,
    augmented) images of each batch too, the reference of what the colluder's labelled examples
    give a classifier that sees the data itself (`raw_pixels_reference`). `attack=False`: the
    training and its accuracy only (every recovery None), for exploring many configurations.
    """
    torch.manual_seed(seed)
    model = darknet.build(width=width)
    mapping = ClassMapping.random(CLASSES, torch.Generator().manual_seed(seed + 99))
    front, back, head_mod = split_with_head(model, k, head, mapping)
    total = cfg.steps_per_epoch(len(tr)) * cfg.epochs
    enc = EnclaveTrainer(front, mapping, PRE, cfg, total, head=head_mod, defence=defence,
                         defence_seed=seed * 1_000_003 + 17, ir_shape=tuple(model.partition_points()[k - 1].out_shape))
    host = HostTrainer(back, cfg, total, objective=defence.host_objective())
    host_passes = 2 if getattr(host.objective, "views", 1) == 2 else 1
    extra = (module_macs(enc.local, tuple(model.partition_points()[k - 1].out_shape))
             if enc.local is not None else 0)
    grad_namer, score_namer = ColumnNamer(CLASSES), ColumnNamer(CLASSES)
    def attacks(prefix: str) -> dict:
        return {} if not attack else {f"{prefix}centroid": CentroidAttack(CLASSES, window),
                f"{prefix}knn": KnnAttack(CLASSES, window), f"{prefix}knn_euclid": KnnAttack(CLASSES, window, cosine=False),
                f"{prefix}probe": ProbeAttack(CLASSES, window)}

    grad_att = {**attacks(""), "kmeans": CentroidAttack(CLASSES, window, kmeans=True)} if attack else {}
    out_att, ir_att = attacks("output_"), attacks("ir_")
    pix_att = attacks("pixels_") if pixels else {}
    fwd_att = {**out_att, **ir_att}
    guesses: dict[str, list[torch.Tensor]] = {n: [] for n in [*grad_att, *fwd_att, *pix_att, "columns",
                                                               "score_argmax"]}
    truth, t_train = [], 0.0
    per = cfg.steps_per_epoch(len(tr))
    for step, epoch, idx in cfg.batches(len(tr)):
        x, y = tr.images[idx], tr.labels[idx]
        t0 = time.perf_counter()
        ir = enc.forward(x, y)
        out = host.forward(ir)
        grad = enc.loss_grad(out)  # what the host receives
        if exact_front:  # diagnostic: the host's update sees `grad`, the FrontNet the undefended gradient
            (d_ir,) = torch.autograd.grad(host._scores, host._ir, grad_outputs=enc.clean_grad, retain_graph=True)
            host.backward(grad)
            enc.backward(d_ir)
        else:
            enc.backward(host.backward(grad))
        t_train += time.perf_counter() - t0
        known = owner[idx] == 0
        if head == 0 and attack:  # columns are named at the end, with all the colluder's votes
            cols, pred = exposed_columns(out, grad), out.argmax(1)
            grad_namer.observe(cols[known], y[known])
            score_namer.observe(pred[known], y[known])
            guesses["columns"].append(cols[~known])
            guesses["score_argmax"].append(pred[~known])
        for name, att in grad_att.items():
            guesses[name].append(att.step(grad, known, y[known])[~known])
        for name, att in out_att.items():
            guesses[name].append(att.step(out, known, y[known])[~known])
        for name, att in ir_att.items():
            guesses[name].append(att.step(ir, known, y[known])[~known])
        if pix_att:  # what the enclave's FrontNet input is (augmented as it is): the reference
            xs = PRE.normalise(augment(x, cfg.batch_generator(step)).div_(255.0))
            for name, att in pix_att.items():
                guesses[name].append(att.step(xs, known, y[known])[~known])
        truth.append(y[~known])
        if (step + 1) % per == 0:
            log(f"    epoch {epoch + 1}/{cfg.epochs}: loss {enc.last_loss:.3f} ({t_train:.0f}s)")
    permute_classifier(model, mapping, inverse=True)
    if head == 0 and attack:
        guesses["columns"] = [grad_namer.name(c) for c in guesses["columns"]]
        guesses["score_argmax"] = [score_namer.name(c) for c in guesses["score_argmax"]]
    else:
        del guesses["columns"], guesses["score_argmax"]
    last = slice(len(truth) - per, None)

    def rec(names, part=slice(None)):
        res = {n: round(recovery(torch.cat(guesses[n][part]), torch.cat(truth[part])), 4)
               for n in names if n in guesses and guesses[n]}
        return res, max(res.values()) if res else None

    grad_names, fwd_names = ["columns", *grad_att], ["score_argmax", *fwd_att]
    (ga, g_all), (fa, f_all) = rec(grad_names), rec(fwd_names)
    (_, g_last), (_, f_last) = rec(grad_names, last), rec(fwd_names, last)
    pa, p_all = rec(list(pix_att))
    acc = float((predict(model, te.images, PRE) == te.labels).float().mean())
    return {"split": k, "head": head, "defence": defence.to_dict(), "exact_front": exact_front, "recovery": max(g_all, f_all) if attack else None,
            "recovery_gradient": g_all,
            "recovery_forward": f_all, "recovery_last_epoch": {"gradient": g_last, "forward": f_last},
            "attacks": {**ga, **fa, **pa}, "accuracy": round(acc, 4), "train_seconds": round(t_train, 1),
            "raw_pixels": p_all, "host_flops_share": round(host_flops_share(model, k, head, extra), 4),
            # selfsup:views=2 runs the host's layers a second time for its own loss (not counted above:
            # the share is of the model's work; with it the host's share would be `host_flops_share_with_views`)
            "host_flops_share_with_views": round(host_flops_share(model, k, head, extra, host_passes), 4),
            "rows_attacked": sum(len(t) for t in truth)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", DEFAULT_DATA)))
    ap.add_argument("--per-class", type=int, default=500, help="training images per class (subset)")
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all)")
    ap.add_argument("--participants", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--split", type=int, default=5, help="partition point k (FrontNet = first k layers)")
    ap.add_argument("--head", type=int, default=1, help="layers of the sealed head")
    ap.add_argument("--defences", default="labelfree@k=8,head=3 labelfree@k=7,head=3 labelfree "
                    "selfsup",
                    help="defences to measure, separated by spaces or ';', each with the sealed head; "
                    "`DEFENCE@k=K,head=H` measures one at another split and head (e.g. `labelfree@k=9,head=1`, "
                    "a thin host). The noise and mix curve of docs/caltrain.md: `noise:scale=0.5 noise:scale=1 "
                    "noise:scale=2 mix:group=2 mix:group=4 mix:group=8 mix:group=16`")
    ap.add_argument("--defended", default=None,
                    help="the defence reported as `defended`, as written in --defences (default: chosen from the "
                    "figures: among those within 10 points of chance on the gradient channel and at most 2 points "
                    "of accuracy below plain, the one with the largest host share; else the most accurate one "
                    "within 10 points of chance; else the least leaky)")
    ap.add_argument("--exact-front", default="", help="also run these defences (separated by spaces) with the "
                    "FrontNet trained on the undefended gradient: a diagnostic of where the accuracy goes, "
                    "not something `train run` offers")
    ap.add_argument("--skip-baselines", action="store_true",
                    help="run only the defences (to spread one table over several processes: the exposed and "
                    "sealed-head runs are the same in every process); the last line then holds the configurations only")
    ap.add_argument("--baselines", default="exposed,sealed_head",
                    help="which baselines to run (`exposed`, `sealed_head`, both, or `none`); without both, the last "
                    "line holds the configurations only")
    ap.add_argument("--combine", nargs="+", type=Path, default=None,
                    help="train nothing: the summary over the configurations in these earlier outputs (their last "
                    "lines, or their `[name] {...}` log lines), e.g. of processes that each ran a part of one table")
    ap.add_argument("--no-attacks", action="store_true",
                    help="train and measure accuracy only (every recovery is null): to explore configurations fast")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=20, help="steps of colluder rows the centroid attack pools")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.combine:
        return summarise(a, combined(a.combine), None, t0)
    tr = load_image_folder(a.data / "train", PRE, limit_per_class=a.per_class)
    te = load_image_folder(a.data / "test", PRE, limit_per_class=a.test_per_class)
    log(f"data: {len(tr)} train, {len(te)} test ({time.time() - t0:.0f}s)")
    g = torch.Generator().manual_seed(a.seed)
    owner = torch.empty(len(tr), dtype=torch.long)
    owner[torch.randperm(len(tr), generator=g)] = torch.arange(len(tr)) % a.participants
    cfg = TrainConfig(epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed)
    items = [t for t in a.defences.replace(";", " ").split()]
    if a.defended and a.defended not in items:
        items.append(a.defended)
    specs = {t: parse_item(t, a.split, a.head) for t in items}
    base = set() if a.skip_baselines or a.baselines == "none" else set(a.baselines.split(","))
    runs = [r for r in [("exposed", a.split, 0, DefenceSpec(), False),
                        ("sealed_head", a.split, a.head, DefenceSpec(), False)] if r[0] in base]
    runs += [(item_name(k, h, sp, a.split), k, h, sp, False) for k, h, sp in specs.values()]
    runs += [(f"head{a.head}+{s.text}+exact_front", a.split, a.head, s, True)
             for s in (DefenceSpec.parse(t) for t in a.exact_front.replace(";", " ").split())]
    results = {}
    for name, k, head, spec, exact in runs:
        log(f"[{name}] training {len(tr)} instances, {a.epochs} epochs, darknet width {a.width}, k={k}, "
            f"head {head}, defence {spec.text}")
        results[name] = train_and_attack(tr, te, owner, cfg, a.width, k, head, spec, a.seed, a.window, exact,
                                         pixels=name == "exposed", attack=not a.no_attacks)
        log(f"[{name}] {json.dumps(results[name])}")
    if base != {"exposed", "sealed_head"}:
        print(json.dumps({"configurations": results, "setup": {"command": "python benchmarks/bench_label_leakage.py "
                                                               + " ".join(sys.argv[1:]),
                                                               "load_average": [round(x, 2) for x in os.getloadavg()],
                                                               "total_seconds": round(time.time() - t0, 1)}}))
        return
    summarise(a, results, len(tr), t0, len(te))


def combined(paths: "list[Path]") -> dict:
    """The configurations measured by earlier runs: each file's last JSON line, or its log lines."""
    results: dict = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("{") and '"configurations"' in line:
                results.update(json.loads(line)["configurations"])
            elif line.startswith("[") and "] {" in line:
                name, _, body = line[1:].partition("] ")
                results[name] = json.loads(body)
    return results


def summarise(a, results: dict, n_train: "int | None", t0: float, n_test: "int | None" = None) -> None:
    """The table (stderr) and the last line (stdout) over `results`, which hold every configuration."""
    for need in ["exposed", "sealed_head"]:
        if need not in results:
            raise SystemExit(f"no {need} configuration to summarise")
    items = [t for t in a.defences.replace(";", " ").split()]
    if a.defended and a.defended not in items:
        items.append(a.defended)
    specs = {t: parse_item(t, a.split, a.head) for t in items}
    missing = [t for t in items if item_name(*specs[t], a.split) not in results]
    if missing:
        raise SystemExit(f"no figures for {', '.join(missing)}")
    plain = results["exposed"]["accuracy"]
    log("")
    log(f"{'configuration':44s} {'gradient':>9s} {'forward':>8s} {'(last epoch)':>13s} {'accuracy':>9s} "
        f"{'vs plain':>9s} {'host share':>10s} {'train s':>8s}")
    for name, r in results.items():
        last = {k: (math.nan if v is None else v) for k, v in r["recovery_last_epoch"].items()}
        rg, rf = (math.nan if r[k] is None else r[k] for k in ("recovery_gradient", "recovery_forward"))
        log(f"{name:44s} {rg:9.4f} {rf:8.4f} {last['gradient']:6.3f}/"
            f"{last['forward']:.3f} {r['accuracy']:9.4f} {100 * (r['accuracy'] - plain):+8.2f}p "
            f"{r['host_flops_share']:10.3f} {r['train_seconds']:8.1f}")
    chance = 1.0 / CLASSES
    pixels = results["exposed"]["raw_pixels"]
    log(f"chance {chance:.4f}; raw pixels (forward attacks on the images themselves) {pixels}")
    measured = [(t, results[item_name(*specs[t], a.split)]) for t in items]
    defended = a.defended or choose_defended(measured, chance, plain)
    log(f"defended: {defended}")
    k_d, h_d, s_d = specs[defended]
    d = results[item_name(k_d, h_d, s_d, a.split)]
    summary = {
        "chance": chance,
        # the gradient channel: what the rows the enclave hands back give away (what a defence changes)
        "recovery": {"exposed": results["exposed"]["recovery_gradient"],
                     "sealed_head": results["sealed_head"]["recovery_gradient"], "defended": d["recovery_gradient"]},
        # the host's own forward pass (the IR it receives, its output): the host classifying what it sees
        "forward_floor": {"exposed": results["exposed"]["recovery_forward"],
                          "sealed_head": results["sealed_head"]["recovery_forward"], "defended": d["recovery_forward"]},
        "raw_pixels_reference": pixels,
        "accuracy_plain": plain,
        "accuracy_defended": d["accuracy"],
        "defence": {**s_d.to_dict(), "head": h_d, "split": k_d},
        "host_flops_share": {"exposed": results["exposed"]["host_flops_share"],
                             "sealed_head": results["sealed_head"]["host_flops_share"],
                             "defended": d["host_flops_share"]},
        "goal_met": d["recovery_gradient"] is not None and d["recovery_gradient"] <= chance + 0.10
                    and plain - d["accuracy"] <= 0.02,
        "configurations": results,
        "setup": {"train": n_train, "test": n_test, "participants": a.participants, "colluder": 0,
                  "model": f"darknet width {a.width}", "split": a.split, "head": a.head, "epochs": a.epochs,
                  "batch": a.batch, "seed": a.seed, "window": a.window,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads",
                  "load_average": [round(x, 2) for x in os.getloadavg()],
                  "command": "python benchmarks/bench_label_leakage.py " + " ".join(sys.argv[1:]),
                  "total_seconds": round(time.time() - t0, 1)},
    }
    print(json.dumps(summary), flush=True)


def parse_item(text: str, split: int, head: int) -> "tuple[int, int, DefenceSpec]":
    """`DEFENCE[@k=K,head=H]` -> (split, head, defence); the defaults where not given."""
    body, _, where = text.partition("@")
    k, h = split, head
    for part in filter(None, where.split(",")):
        key, _, value = part.partition("=")
        if key not in ("k", "head") or not value.isdigit():
            raise SystemExit(f"bad configuration {text!r}: expected DEFENCE@k=K,head=H")
        k, h = (int(value), h) if key == "k" else (k, int(value))
    return k, h, DefenceSpec.parse(body)


def item_name(k: int, head: int, spec: DefenceSpec, split: int) -> str:
    return (f"k{k}+" if k != split else "") + f"head{head}+{spec.text}"


def choose_defended(measured: "list[tuple[str, dict]]", chance: float, plain: float) -> str:
    """The figures decide: the gradient channel is what a defence can change (the forward one is
    the host reading its own data). Meeting the goal, the largest host share (a defence that
    moves the work into the enclave is worth less); else the most accurate one within 10 points
    of chance; else the least leaky."""
    measured = [(t, r) for t, r in measured if r["recovery_gradient"] is not None] or measured
    near = [(t, r) for t, r in measured if r["recovery_gradient"] is not None
            and r["recovery_gradient"] <= chance + 0.10]
    goal = [(t, r) for t, r in near if plain - r["accuracy"] <= 0.02]
    if goal:
        return max(goal, key=lambda tr: (tr[1]["host_flops_share"], tr[1]["accuracy"]))[0]
    if near:
        return max(near, key=lambda tr: tr[1]["accuracy"])[0]
    return min(measured, key=lambda tr: tr[1]["recovery_gradient"] or 0.0)[0]


if __name__ == "__main__":
    main()
