"""CalTrain benchmark: 4 participants on CIFAR-10, one malicious; accuracy, cost and forensics.

Run: `make bench-caltrain` (or e.g. `python benchmarks/bench_caltrain.py --per-class 500 --epochs 8`).
Two scenarios, each a full CalTrain pipeline in one process with the real components:
participants sign (Ed25519) and HPKE-encrypt every instance to the enclave key; the enclave
opens, checks and re-seals them (AES-256-GCM); training decrypts and re-verifies each batch,
runs the FrontNet/loss half (`EnclaveTrainer`) and hands IRs to the BackNet half (`HostTrainer`)
whose classifier rows are in a secret order; fingerprints go to an encrypted SQLite linkage
store, read back for tracing.

(a) backdoor: 5% of the malicious participant's images get a trigger (`--trigger`: a 4x4
    checkerboard in the corner, or a blended noise pattern) and the target label; (b) mislabel:
    20% of its labels are flipped c -> c+1, and the enclave's label audit (train/audit.py) runs
    beside cleanlab's confident learning on the same held-out predictions.
The backdoor's top-level figures are trace mode `cluster` (train/cluster.py).
Each misprediction is traced in both trace modes (`nearest`, the default, and `mislabel`; see
enclaveml.train.trace); the scenario's top-level precision/recall/malicious_ranked_first are the
`nearest` mode's, `modes` holds both. Queries are a seeded random sample of the scenario's
errors (test images are stored class by class, so the first N would cover only a few classes).
The plain baseline trains the same model (same initial weights, order, augmentation and seed)
in ordinary PyTorch on the same poisoned data of scenario (a).
To fit a shared 2-core CPU: a class-balanced subset of CIFAR-10 (`--per-class`), Darknet at a
reduced width (`--width`) and few epochs (`--epochs`); the whole 10,000-image test set.
The last line printed is one JSON object (keys in docs/caltrain.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from enclaveml.crypto import HpkeKeyPair, SigningKey, generate_key
from enclaveml.data.folder import load_image_folder
from enclaveml.models import zoo
from enclaveml.models.zoo import darknet
from enclaveml.train import detectors, poison
from enclaveml.train.fingerprint import fingerprints, predict
from enclaveml.train.instances import EnclaveDataset, InstanceIngest, make_upload
from enclaveml.train.linkage import LinkageRecord, LinkageStore, records_to_arrays
from enclaveml.models.split import permute_classifier
from enclaveml.train.partitioned import (ClassMapping, EnclaveTrainer, HostTrainer, PlainTrainer, TrainConfig,
                                         partitioned_step, split_for_caltrain)
from enclaveml.train.cluster import trace_cluster
from enclaveml.train.trace import MODES, centroid_margins, trace

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
PRE = zoo.entry("darknet").preprocessing
POISON_FORENSICS = {"precision": 0.984, "recall": 0.968, "source": "Shan et al. 2022 (Poison Forensics), BadNets on CIFAR-10"}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def png_bytes(px_u8: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px_u8.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def build_contributions(tr, n_participants: int, scenario: str, target: int, seed: int,
                        backdoor_fraction: float = 0.05, flip_fraction: float = 0.20, trigger: str = "patch",
                        n_malicious: int = 1):
    """Per instance: (participant index, bytes, label), poisoned mask, malicious participant indices
    (the last `n_malicious`), and each instance's participant index."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(tr), generator=g)
    owner = torch.empty(len(tr), dtype=torch.long)
    owner[order] = torch.arange(len(tr)) % n_participants
    mal = list(range(n_participants - n_malicious, n_participants))
    labels = tr.labels.clone()
    pixels = tr.images.clone()
    poisoned = torch.zeros(len(tr), dtype=torch.bool)
    for j, m in enumerate(mal):
        mal_idx = torch.nonzero(owner == m, as_tuple=True)[0]
        if scenario == "backdoor":
            pick = poison.choose(len(mal_idx), backdoor_fraction, seed + 1 + 10 * j, exclude=labels[mal_idx] == target)
            sel = mal_idx[pick]
            pixels[sel] = poison.apply(trigger, pixels[sel])
            labels[sel] = target
        else:
            pick = poison.choose(len(mal_idx), flip_fraction, seed + 2 + 10 * j)
            sel = mal_idx[pick]
            labels[sel] = (labels[sel] + 1) % 10
        poisoned[sel] = True
    items = []
    for i in range(len(tr)):
        data = png_bytes(pixels[i]) if poisoned[i] and scenario == "backdoor" else Path(tr.paths[i]).read_bytes()
        items.append((int(owner[i]), data, int(labels[i])))
    return items, poisoned, mal, owner


def ingest(items, keys, seed):
    """Participants seal + sign; the enclave opens, checks and re-seals. Returns the enclave's view."""
    hpke = HpkeKeyPair.generate()
    data_key, tag_key = generate_key(), generate_key()
    enclave = InstanceIngest(hpke, data_key, tag_key, PRE, 10)
    t0 = time.time()
    uploads = [make_upload(hpke.public_bytes(), keys[p], data, y)[1] for p, data, y in items]
    t1 = time.time()
    accepted = [enclave.ingest(u) for u in uploads]
    t2 = time.time()
    ds = EnclaveDataset(data_key, [(a.tag, a.sealed) for a in accepted])
    assert len(ds) == len(items), "the benchmark's data must have no duplicates"
    return ds, {"participant_seal_sign_s": round(t1 - t0, 2), "enclave_ingest_s": round(t2 - t1, 2)}


def init_model(width: int, seed: int):
    torch.manual_seed(seed)
    return darknet.build(width=width)


def train_caltrain(ds, cfg, width, k, seed, plain_pixels=None):
    """CalTrain training; with `plain_pixels`, the plain baseline trains alongside, step by step.

    Interleaving the two runs step by step makes both see the same machine load (the benchmark
    shares 2 cores with other jobs), so their time ratio is not skewed by what else ran when.
    """
    model = init_model(width, seed)
    mapping = ClassMapping.random(10, torch.Generator().manual_seed(seed + 99))
    front, back = split_for_caltrain(model, k, mapping)
    total = cfg.steps_per_epoch(len(ds)) * cfg.epochs
    enc, host = EnclaveTrainer(front, mapping, PRE, cfg, total), HostTrainer(back, cfg, total)
    plain = PlainTrainer(init_model(width, seed), PRE, cfg, total) if plain_pixels is not None else None
    t_cal = t_plain = 0.0
    per = cfg.steps_per_epoch(len(ds))
    for step, epoch, idx in cfg.batches(len(ds)):
        t0 = time.perf_counter()
        x, y = ds.batch(idx)  # decrypt + verify inside the enclave
        loss = partitioned_step(enc, host, x, y)
        t1 = time.perf_counter()
        t_cal += t1 - t0
        if plain is not None:
            ploss = plain.train_step(plain_pixels[idx], ds.labels[idx])
            t_plain += time.perf_counter() - t1
        if (step + 1) % per == 0:
            extra = f", plain loss {ploss:.3f} ({t_plain:.0f}s)" if plain is not None else ""
            log(f"  epoch {epoch + 1}/{cfg.epochs}: caltrain loss {loss:.3f} ({t_cal:.0f}s){extra}")
    permute_classifier(model, mapping, inverse=True)  # the owner's released model is in class order
    return model, t_cal, (plain.module if plain is not None else None), t_plain


def accuracy(model, te) -> float:
    return float((predict(model, te.images, PRE) == te.labels).float().mean())


def sample_queries(n: int, max_queries: int, seed: int) -> torch.Tensor:
    """Indices of up to `max_queries` of n errors, drawn at random (reproducibly), in order."""
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))[:max_queries]
    return pick.sort().values


def dump_arrays(path: Path, model, ds, fps_t, labels_t, pids, mal_pids, poisoned, qf, query_labels) -> None:
    """Save what the tracer and the audit see (plus the ground truth) for offline analysis."""
    index = {p: i for i, p in enumerate(sorted(set(pids)))}
    with torch.no_grad():
        from enclaveml.train.fingerprint import _batched_eval

        probs = _batched_eval(model, ds.all_pixels(), PRE, lambda m, x: m(x).softmax(1), 256, torch.zeros(0, 10))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, fps=fps_t.numpy(), labels=labels_t.numpy(), participant=np.array([index[p] for p in pids]),
                        malicious=np.array(sorted(index[p] for p in set(pids) if p.hex() in mal_pids)),
                        poisoned=poisoned.numpy(), qfps=qf.numpy(), qlabels=query_labels.numpy(), probs=probs.numpy())
    log(f"  saved fingerprints to {path}")


def cluster_mode(qf, query_labels, fps_t, labels_t, hashes, pids, poisoned, mal_pids, k) -> dict:
    """Trace mode `cluster` (enclaveml.train.cluster): one cluster decision per traced label, and
    per input its K nearest cluster members (nearest same-label instances if no cluster)."""
    mask, first, per_query_prec, clusters = torch.zeros(len(pids), dtype=torch.bool), 0, [], []
    for y in query_labels.unique().tolist():
        sel = query_labels == y
        res, answers = trace_cluster(qf[sel], y, fps_t, labels_t, hashes, pids, k=k)
        mask[res.members] = True
        clusters.append({"label": y, "members": len(res.members), "separation": res.separation, "bar": res.bar})
        for a in answers:
            first += bool(a.summary) and a.summary[0][0] in mal_pids
            per_query_prec.append(np.mean([bool(poisoned[n.index]) for n in a.neighbours]) if a.neighbours else 0.0)
    p, r = detectors.precision_recall(mask, poisoned)
    return {"precision": round(p, 4), "recall": round(r, 4), "malicious_ranked_first": round(first / len(query_labels), 4),
            "mean_precision_per_query": round(float(np.mean(per_query_prec)), 4), "flagged": int(mask.sum()),
            "clusters": clusters}


def label_audit_figures(fps_t, labels_t, pids, poisoned, mal_pids, seed: int) -> dict:
    """The enclave's label audit (enclaveml.train.audit) and cleanlab on the same held-out predictions."""
    from enclaveml.train.audit import audit_report, label_audit

    order = sorted(set(pids))
    contributor = torch.tensor([order.index(p) for p in pids])
    t0 = time.perf_counter()
    res = label_audit(fps_t, labels_t, contributor, 10, seed=seed)
    secs = time.perf_counter() - t0

    def figures(mask: torch.Tensor) -> dict:
        p, r = detectors.precision_recall(mask, poisoned)
        share = [float(mask[contributor == c].float().mean()) for c in range(len(order))]
        top = order[int(np.argmax(share))].hex()
        return {"precision": round(p, 4), "recall": round(r, 4), "malicious_ranked_first": float(top in mal_pids),
                "flagged": int(mask.sum())}

    out = {**figures(res.suspected), "disputed": figures(res.disputed), "seconds": round(secs, 1),
           "flagged_contributors": sorted(order[c].hex()[:16] for c in res.flagged)}
    first = res.first_pass if res.first_pass is not None else res.probs  # plain k-fold held-out predictions
    rep = audit_report(fps_t, labels_t, pids, [bytes(32)] * len(pids), 10, seed=seed, probs=first)
    assert rep["suspected"] == int(res.suspected.sum())  # the report is this decision
    try:
        import cleanlab
        from cleanlab.filter import find_label_issues
    except ImportError:
        out["cleanlab"] = None
        return out
    cl = {}
    for how in ("prune_by_noise_rate", "both", "confident_learning"):
        mask = torch.from_numpy(find_label_issues(labels_t.numpy(), first.numpy(), filter_by=how))
        cl[how] = figures(mask)
    # and on the audit's second-pass predictions (flagged contributors left out of training)
    refit = torch.from_numpy(find_label_issues(labels_t.numpy(), res.probs.numpy()))
    out["cleanlab"] = {**cl["prune_by_noise_rate"], "version": cleanlab.__version__, "filter_by": cl,
                       "on_refit_predictions": figures(refit)}
    return out


def forensics(model, ds, poisoned_by_item, mal_pids: set[str], queries_u8, query_labels, k: int, eps: float, tmp: Path,
              dump: Path | None = None, primary_mode: str = "cluster", audit: bool = False, seed: int = 0):
    """Linkage records -> encrypted store -> trace each query; compare with AC and spectral."""
    fps = fingerprints(model, ds.all_pixels(), PRE)
    recs = [LinkageRecord(fps[i].numpy(), m[3], m[0], m[1], m[2]) for i, m in enumerate(ds.meta)]
    key = generate_key()
    store = LinkageStore(tmp / "linkage.db", key)
    store.write_all(recs, "bench")
    recs = store.read_all()
    store.close()
    fps_t, labels_t = records_to_arrays(recs)
    hashes, pids = [r.instance_hash for r in recs], [r.participant for r in recs]
    poisoned = poisoned_by_item
    out = {"queries": int(len(query_labels)), "k": k}
    if len(query_labels) == 0:
        return {**out, "precision": 0.0, "recall": 0.0, "malicious_ranked_first": 0.0}
    qf = fingerprints(model, queries_u8, PRE)
    if dump is not None:
        dump_arrays(dump, model, ds, fps_t, labels_t, pids, mal_pids, poisoned, qf, query_labels)
    margins = centroid_margins(fps_t, labels_t)
    modes = {}
    for mode in MODES:
        first, per_query_prec, mask = 0, [], torch.zeros(len(recs), dtype=torch.bool)
        for q, y in zip(qf, query_labels.tolist()):
            res = trace(q, y, fps_t, labels_t, hashes, pids, k=k, mode=mode, margins=margins)
            first += bool(res.summary) and res.summary[0][0] in mal_pids
            idx = [n.index for n in res.neighbours]
            mask[idx] = True
            per_query_prec.append(np.mean([bool(poisoned[i]) for i in idx]))
        p, r = detectors.precision_recall(mask, poisoned)
        modes[mode] = {"precision": round(p, 4), "recall": round(r, 4),
                       "malicious_ranked_first": round(first / len(query_labels), 4),
                       "mean_precision_per_query": round(float(np.mean(per_query_prec)), 4), "flagged": int(mask.sum())}
    modes["cluster"] = cluster_mode(qf, query_labels, fps_t, labels_t, hashes, pids, poisoned, mal_pids, k)
    Q = detectors.Queries(qf, query_labels)
    res_d = {}
    for name, kw in (("knn-trace", {"k": k}), ("mislabel-trace", {"k": k}), ("cluster-trace", {}),
                     ("activation-clustering", {}),
                     ("spectral-signatures", {"eps": eps})):
        mask = detectors.get(name, **kw).flag(fps_t, labels_t, Q)
        p, r = detectors.precision_recall(mask, poisoned)
        res_d[name] = {"precision": round(p, 4), "recall": round(r, 4), "flagged": int(mask.sum())}
    assert res_d["knn-trace"]["precision"] == modes["nearest"]["precision"]  # the detector is the trace's union
    assert res_d["cluster-trace"]["precision"] == modes["cluster"]["precision"]
    # where the poisoned fingerprints sit: centroid margin < 0 = among another label's instances
    neg = margins < 0
    where = {"poisoned_margin_mean": round(float(margins[poisoned].mean()), 4),
             "clean_margin_mean": round(float(margins[~poisoned].mean()), 4),
             "poisoned_negative_margin": round(float(neg[poisoned].float().mean()), 4),
             "clean_negative_margin": round(float(neg[~poisoned].float().mean()), 4)}
    primary = modes[primary_mode]
    if audit:
        out["label_audit"] = label_audit_figures(fps_t, labels_t, pids, poisoned, mal_pids, seed)
    return {**out, "primary_mode": primary_mode,
            **{key: primary[key] for key in ("precision", "recall", "malicious_ranked_first", "mean_precision_per_query")},
            "modes": modes, "fingerprints": where, "detectors": res_d}


def run_scenario(scenario, tr, te, a, keys, tmp, with_plain: bool):
    log(f"[{scenario}] building contributions")
    items, poisoned, mal, _ = build_contributions(tr, a.participants, scenario, a.target, a.seed,
                                                  a.backdoor_fraction, a.flip_fraction, a.trigger, a.malicious)
    ds, ingest_t = ingest(items, keys, a.seed)
    mal_pids = {keys[m].public_key().fingerprint() for m in mal}
    poisoned_ds = torch.tensor([poisoned[i] for i in range(len(items))])  # dataset order == item order
    cfg = TrainConfig(epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed)
    log(f"[{scenario}] CalTrain training (plain baseline alongside: {with_plain}): {len(ds)} instances, {a.epochs} epochs, darknet width {a.width}, k={a.split}")
    model, t_cal, plain, t_plain = train_caltrain(ds, cfg, a.width, a.split, a.seed,
                                                  ds.all_pixels() if with_plain else None)
    res = {"accuracy_caltrain": round(accuracy(model, te), 4), "train_seconds_caltrain": round(t_cal, 1), **ingest_t,
           "poisoned": int(poisoned.sum())}
    if with_plain:
        res.update(accuracy_plain=round(accuracy(plain, te), 4), train_seconds_plain=round(t_plain, 1),
                   time_ratio=round(t_cal / t_plain, 3))
    pred = predict(model, te.images, PRE)
    if scenario == "backdoor":
        src = te.labels != a.target
        trig = poison.apply(a.trigger, te.images[src])
        tp = predict(model, trig, PRE)
        hit = tp == a.target
        res["attack_success_rate"] = round(float(hit.float().mean()), 4)
        pick = sample_queries(int(hit.sum()), a.max_queries, a.seed)
        q_x, q_y = trig[hit][pick], torch.full((len(pick),), a.target)
    else:
        err = pred == (te.labels + 1) % 10  # the errors the flipped labels can cause
        res["mislabel_errors"] = int(err.sum())
        # the mirror confusion c -> c-1, which the flips do not push: a control for how many
        # c -> c+1 errors the model makes anyway (about as many, at this attack strength)
        res["control_errors"] = int((pred == (te.labels - 1) % 10).sum())
        pick = sample_queries(int(err.sum()), a.max_queries, a.seed)
        q_x, q_y = te.images[err][pick], pred[err][pick]
    log(f"[{scenario}] tracing {len(q_y)} mispredictions")
    res.update(forensics(model, ds, poisoned_ds, mal_pids, q_x, q_y, a.k, a.eps, tmp,
                         a.dump / f"{scenario}.npz" if a.dump else None,
                         "cluster" if scenario == "backdoor" else "nearest", audit=scenario == "mislabel", seed=a.seed))
    log(f"[{scenario}] {json.dumps(res)}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", DEFAULT_DATA)))
    ap.add_argument("--per-class", type=int, default=1000, help="training images per class (subset)")
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all)")
    ap.add_argument("--participants", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--split", type=int, default=5, help="partition point k (FrontNet = first k layers)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=int, default=0, help="backdoor target class")
    ap.add_argument("-k", type=int, default=10, help="neighbours per trace")
    ap.add_argument("--eps", type=float, default=0.05, help="spectral signatures' assumed poison share")
    ap.add_argument("--max-queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--scenarios", default="backdoor,mislabel")
    ap.add_argument("--backdoor-fraction", type=float, default=0.05, help="share of the attacker's images triggered")
    ap.add_argument("--flip-fraction", type=float, default=0.20, help="share of the attacker's labels flipped")
    ap.add_argument("--trigger", default="patch", choices=sorted(poison.TRIGGERS),
                    help="backdoor trigger: patch (4x4 checkerboard) or blend (full-image noise, alpha 0.2)")
    ap.add_argument("--malicious", type=int, default=1, help="how many participants (the last ones) poison")
    ap.add_argument("--dump", type=Path, default=None, help="save fingerprints, labels, ground truth per scenario "
                    "to DIR/<scenario>.npz (offline analysis)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain baseline (figures of one scenario)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    tr = load_image_folder(a.data / "train", PRE, limit_per_class=a.per_class)
    te = load_image_folder(a.data / "test", PRE, limit_per_class=a.test_per_class)
    log(f"data: {len(tr)} train, {len(te)} test ({time.time() - t0:.0f}s)")
    keys = [SigningKey.generate() for _ in range(a.participants)]
    warm = PlainTrainer(init_model(a.width, 0), PRE, TrainConfig(batch=a.batch), 4)  # warm torch's kernels up
    for _ in range(3):
        warm.train_step(tr.images[: a.batch], tr.labels[: a.batch])
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, sc in enumerate(a.scenarios.split(",")):
            out[sc] = run_scenario(sc, tr, te, a, keys, Path(tmp) / sc, with_plain=(i == 0 and not a.no_plain))
    first = out[a.scenarios.split(",")[0]]
    summary = {
        "accuracy_caltrain": first["accuracy_caltrain"],
        "accuracy_plain": first.get("accuracy_plain"),
        "time_ratio": first.get("time_ratio"),
        **{sc: {key: out[sc][key] for key in ("precision", "recall", "malicious_ranked_first", "attack_success_rate",
                                                "queries", "k", "modes", "fingerprints", "mislabel_errors",
                                                "control_errors", "detectors", "accuracy_caltrain", "poisoned",
                                                "primary_mode", "label_audit")
                if key in out[sc]} for sc in out},
        **({"label_audit": out["mislabel"]["label_audit"]} if "label_audit" in out.get("mislabel", {}) else {}),
        "poison_forensics_reference": POISON_FORENSICS,
        "setup": {"train": len(tr), "test": len(te), "participants": a.participants, "model": f"darknet width {a.width}",
                  "split": a.split, "epochs": a.epochs, "batch": a.batch, "seed": a.seed,
                  "train_seconds_caltrain": first["train_seconds_caltrain"],
                  "train_seconds_plain": first.get("train_seconds_plain"),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads",
                  "command": "python benchmarks/bench_caltrain.py " + " ".join(sys.argv[1:]),
                  "total_seconds": round(time.time() - t0, 1)},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
