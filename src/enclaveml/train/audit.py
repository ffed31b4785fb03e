"""Label audit: which contributed labels does the trained model dispute, per contributor.

Trust side: enclave (`CalTrainEnclave.audit` runs it on the decrypted linkage records of a
finished run and signs the report for the owner); the same pure logic runs for the benchmark.
No I/O, no key.

Method (out-of-sample evidence, then a decision that uses who gave each label):

1. Held-out predictions. The instances are split into `folds` (seeded); for each fold a softmax
   regression is fitted on the other folds' fingerprints (the enclave-side embeddings of the
   trained model) and predicts the held-out fold. Every instance gets class probabilities from a
   classifier that never saw its label (cross-validated, as confident learning prescribes).
2. Disputed: the held-out prediction is another class than the given label (the suggestion).
   On its own this flags every naturally ambiguous image too (a 70%-accurate model disputes a
   quarter of the clean labels), which is why confident learning alone is imprecise here.
3. Contributors. Label errors that matter come from a contributor, not uniformly from the data
   set, so the decision compares each contributor with the others, who are the honest baseline of
   natural disagreement: a contributor is *flagged* when its disputed rate is above the pooled rate
   of the unflagged others by more than `z_contributor` binomial standard deviations *and* by at
   least `min_excess` (5 points: a minimum effect size, so that two honest contributors whose
   natural ambiguity differs by a few points are not told apart by significance alone on easy
   data), iterated until the flagged set is stable, so two bad contributors do not hide each other.
4. Honest refit. Once contributors are flagged, the held-out predictions are computed again
   with the flagged contributors' instances left out of every training fold (they are predicted
   by a classifier fitted on the others' data only): systematic flips no longer pull the
   classifier towards the wrong label. Steps 2-3 are repeated on these predictions.
5. Cells. Within a flagged contributor, disputes are grouped by (given label, suggested class).
   A cell is suspected when its count exceeds what the unflagged contributors' rate for the
   same cell predicts for this contributor's number of such labels by more than `z_cell` Poisson
   standard deviations; its instances are the suspected label errors. Flipping labels
   systematically (class a given as b) fills a few cells far beyond the baseline; natural
   confusions spread over many cells at the honest rate and stay unreported.

The report names, per contributor (their participant id), how many instances they gave, how
many labels are disputed, the share of suspected errors, and the instance hashes of the
suspected (and disputed) ones. It carries no image, no label, no suggested class and no
fingerprint of anyone (`REPORT_KEYS` / `ROW_KEYS`; tests/test_train_audit.py checks them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def heldout_probs(fps: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int = 5, seed: int = 0,
                  l2: float = 1e-3, iters: int = 100) -> torch.Tensor:
    """(N, C) class probabilities, each row from a softmax regression that never saw that row.

    Softmax regression on the (unit-norm) fingerprints, L2-regularised, fitted with L-BFGS;
    `folds` seeded folds. With fewer than two instances per fold the folds shrink to fit.
    """
    x = fps.float()
    n = len(x)
    if n == 0:
        return torch.zeros(0, num_classes)
    folds = max(2, min(int(folds), n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, num_classes)
    xa = torch.cat([x, torch.ones(n, 1)], 1)
    for f in range(folds):
        held = order[f::folds]
        train = torch.ones(n, dtype=torch.bool)
        train[held] = False
        w = _fit_softmax(xa[train], labels[train], num_classes, l2, iters)
        out[held] = (xa[held] @ w).softmax(1)
    return out


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, nc: int, l2: float, iters: int) -> torch.Tensor:
    w = torch.zeros(x.shape[1], nc, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


FORMAT = "enclaveml/v1 caltrain-label-audit"
SIGNING_LABEL = b"enclaveml/v1 caltrain-label-audit\x00"


def canonical(report: dict) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no spaces, UTF-8."""
    import json

    return json.dumps(report, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def report_digest(report: dict) -> bytes:
    import hashlib

    return hashlib.sha256(canonical(report)).digest()


def signed_bytes(report: dict) -> bytes:
    return SIGNING_LABEL + canonical(report)


@dataclass
class AuditResult:
    """Everything the audit decided, as arrays over the instances (pure; `audit_report` formats it)."""

    probs: torch.Tensor  # (N, C) held-out class probabilities
    disputed: torch.Tensor  # bool (N,): held-out prediction differs from the given label
    suggested: torch.Tensor  # (N,) the held-out prediction among the other classes
    suspected: torch.Tensor  # bool (N,): reported as a suspected label error
    contributors: list[int]  # contributor index per instance's group, in order of first appearance
    flagged: set[int]  # contributor indices whose disputed rate is significantly high
    baseline_rate: float  # disputed rate of the unflagged contributors, pooled
    first_pass: torch.Tensor | None = None  # the first held-out probabilities, when `probs` is the refit


def _z_binomial(k: int, n: int, rate: float) -> float:
    return (k - n * rate) / math.sqrt(max(n * rate * (1.0 - rate), 1e-12))


def heldout_without(fps: torch.Tensor, labels: torch.Tensor, exclude: torch.Tensor, num_classes: int,
                    folds: int = 5, seed: int = 0) -> torch.Tensor:
    """Held-out probabilities where the `exclude`d instances never train any fold's classifier."""
    keep = torch.nonzero(~exclude, as_tuple=True)[0]
    out = torch.empty(len(labels), num_classes)
    out[keep] = heldout_probs(fps[keep], labels[keep], num_classes, folds, seed)
    if bool(exclude.any()):
        xa = torch.cat([fps.float(), torch.ones(len(fps), 1)], 1)
        w = _fit_softmax(xa[keep], labels[keep], num_classes, 1e-3, 100)
        out[exclude] = (xa[exclude] @ w).softmax(1)
    return out


def label_audit(fps: torch.Tensor, labels: torch.Tensor, contributor: torch.Tensor, num_classes: int,
                folds: int = 5, seed: int = 0, z_contributor: float = 4.0, z_cell: float = 1.0,
                probs: torch.Tensor | None = None, refit: bool = True, min_excess: float = 0.05) -> AuditResult:
    """Run the audit over fingerprints, labels and each instance's contributor index (0..P-1).

    `probs`: precomputed first-pass held-out probabilities (the benchmark reuses them).
    """
    labels, contributor = labels.long(), contributor.long()
    if probs is None:
        probs = heldout_probs(fps, labels, num_classes, folds, seed)
    res = _decide(probs, labels, contributor, num_classes, z_contributor, z_cell, min_excess)
    if refit and res.flagged and len(res.flagged) < len(res.contributors):
        bad = torch.isin(contributor, torch.tensor(sorted(res.flagged), dtype=torch.long))
        probs2 = heldout_without(fps, labels, bad, num_classes, folds, seed)
        res = _decide(probs2, labels, contributor, num_classes, z_contributor, z_cell, min_excess)
        res.first_pass = probs
    return res


def _decide(probs: torch.Tensor, labels: torch.Tensor, contributor: torch.Tensor, num_classes: int,
            z_contributor: float, z_cell: float, min_excess: float) -> AuditResult:
    n = len(labels)
    other = probs.clone()
    if n:
        other.scatter_(1, labels.view(-1, 1), -1.0)
    sugg = other.argmax(1) if n else torch.zeros(0, dtype=torch.long)
    disp = probs.argmax(1) != labels if n else torch.zeros(0, dtype=torch.bool)
    ids = sorted(set(contributor.tolist()))
    flagged: set[int] = set()
    for _ in range(len(ids)):
        new = set()
        for c in ids:
            ref = torch.isin(contributor, torch.tensor([p for p in ids if p != c and p not in flagged], dtype=torch.long))
            mc = contributor == c
            if not ref.any():
                continue
            rate = (float(disp[ref].sum()) + 0.5) / (float(ref.sum()) + 1.0)
            k, nc_ = int(disp[mc].sum()), int(mc.sum())
            if _z_binomial(k, nc_, rate) > z_contributor and k / max(1, nc_) - rate >= min_excess:
                new.add(c)
        if new == flagged:
            break
        flagged = new
    honest = torch.isin(contributor, torch.tensor(sorted(set(ids) - flagged), dtype=torch.long))
    base = float(disp[honest].float().mean()) if honest.any() else 0.0
    suspected = torch.zeros(n, dtype=torch.bool)
    for c in sorted(flagged):
        mc = contributor == c
        for i in range(num_classes):
            ci, ri = mc & (labels == i), honest & (labels == i)
            ni_c, ni_r = int(ci.sum()), int(ri.sum())
            if ni_c == 0:
                continue
            for j in range(num_classes):
                if j == i:
                    continue
                cell = ci & disp & (sugg == j)
                k = int(cell.sum())
                lam = ni_c * (int((ri & disp & (sugg == j)).sum()) + 0.5) / (ni_r + 1.0)
                if k and (k - lam) / math.sqrt(lam) > z_cell:
                    suspected |= cell
    return AuditResult(probs, disp, sugg, suspected, ids, flagged, round(base, 6))


def audit_report(fps: torch.Tensor, labels: torch.Tensor, participants: list[bytes], hashes: list[bytes],
                 num_classes: int, run_id: str = "", seed: int = 0, **kw) -> dict:
    """The owner's report: per contributor, counts, rates and the hashes of suspected label errors.

    Contributors are named by participant id (hex); instances by their hash. No image, label,
    suggested class or fingerprint is included, so handing a contributor the report tells it
    nothing about another contributor's data beyond counts and instance ids.
    """
    order = sorted(set(participants))
    index = {p: i for i, p in enumerate(order)}
    contributor = torch.tensor([index[p] for p in participants], dtype=torch.long)
    res = label_audit(fps, labels, contributor, num_classes, seed=seed, **kw)
    rows = []
    for c, pid in enumerate(order):
        mc = contributor == c
        n, nd, ns = int(mc.sum()), int((res.disputed & mc).sum()), int((res.suspected & mc).sum())
        sus = torch.nonzero(res.suspected & mc, as_tuple=True)[0].tolist()
        dis = torch.nonzero(res.disputed & mc, as_tuple=True)[0].tolist()
        rows.append({"participant": pid.hex(), "instances": n, "disputed": nd, "disputed_rate": round(nd / n, 4),
                     "suspected": ns, "suspected_share": round(ns / n, 4), "flagged": c in res.flagged,
                     "suspected_instances": [hashes[i].hex() for i in sus],
                     "disputed_instances": [hashes[i].hex() for i in dis]})
    rows.sort(key=lambda r: (-r["suspected_share"], -r["disputed_rate"], r["participant"]))
    return {"format": FORMAT, "run_id": run_id, "instances": len(labels), "classes": num_classes,
            "disputed": int(res.disputed.sum()), "suspected": int(res.suspected.sum()),
            "baseline_rate": res.baseline_rate,
            "method": {"heldout": "5-fold softmax regression on the enclave's fingerprints", "folds": 5, "seed": seed,
                       "z_contributor": kw.get("z_contributor", 4.0), "z_cell": kw.get("z_cell", 1.0),
                       "min_excess": kw.get("min_excess", 0.05),
                       "refit_without_flagged": kw.get("refit", True)},
            "contributors": rows}


REPORT_KEYS = {"format", "run_id", "instances", "classes", "disputed", "suspected", "baseline_rate", "method",
               "contributors"}
ROW_KEYS = {"participant", "instances", "disputed", "disputed_rate", "suspected", "suspected_share", "flagged",
            "suspected_instances", "disputed_instances"}
