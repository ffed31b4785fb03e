"""Poison detectors over training fingerprints, each one small class registered by name.

Trust side: owner/auditor (pure tensor logic, no I/O). Every detector answers the same question
(which training instances look poisoned?) through `flag(fps, labels, queries)` -> bool mask:

- `knn-trace`: CalTrain's own forensics. For each traced misprediction (query fingerprint and
  the wrong label), the K nearest same-label training fingerprints are flagged.
- `mislabel-trace`: the same with trace mode `mislabel` (query distance + centroid margin, see
  `trace`): for each traced misprediction, the K same-label instances that sit nearest and most
  among another class are flagged.
- `cluster-trace`: Poison Forensics-style cluster decision (`cluster.poison_cluster`): per traced
  label, the traced inputs seed a Fisher-discriminant 2-means split of that label's training
  fingerprints, and the whole separated cluster is flagged.
- `activation-clustering` (Chen et al. 2018): per class, fingerprints reduced to 10 dimensions,
  k-means with k=2; the smaller cluster is flagged when its share is under `max_share`.
- `spectral-signatures` (Tran et al. 2018): per class, scores are squared projections on the top
  singular vector of the centred fingerprints; the top 1.5 * eps * n_class are flagged.

A new detector is a new class with `@register`, not an `if` in the benchmark (the Flower habit).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .trace import centroid_margins, rank_same_label

DETECTORS: dict[str, type["Detector"]] = {}


@dataclass(frozen=True)
class Queries:
    """Traced mispredictions: their fingerprints and the (wrong) labels the model gave them."""

    fps: torch.Tensor
    labels: torch.Tensor


class Detector(ABC):
    name: str = ""

    @abstractmethod
    def flag(self, fps: torch.Tensor, labels: torch.Tensor, queries: Queries | None = None) -> torch.Tensor:
        """Bool mask over training instances: True = suspected poison."""


def register(cls: type[Detector]) -> type[Detector]:
    DETECTORS[cls.name] = cls
    return cls


def get(name: str, **kwargs) -> Detector:
    from ..errors import UserInputError

    try:
        return DETECTORS[name](**kwargs)
    except KeyError:
        raise UserInputError(f"unknown detector {name!r}; known: {', '.join(sorted(DETECTORS))}") from None


@register
class KnnTrace(Detector):
    name = "knn-trace"
    mode = "nearest"

    def __init__(self, k: int = 10, weight: float = 1.0):
        self.k, self.weight = k, weight

    def flag(self, fps, labels, queries=None):
        mask = torch.zeros(len(fps), dtype=torch.bool)
        if queries is None:
            return mask
        margins = centroid_margins(fps, labels) if self.mode == "mislabel" else None  # once, not per query
        for q, y in zip(queries.fps, queries.labels.tolist()):
            idx, _ = rank_same_label(q, y, fps, labels, self.k, self.mode, margins, self.weight)
            mask[idx] = True
        return mask


@register
class MislabelTrace(KnnTrace):
    name = "mislabel-trace"
    mode = "mislabel"


@register
class ClusterTrace(Detector):
    name = "cluster-trace"

    def __init__(self, **kw):
        self.kw = kw

    def flag(self, fps, labels, queries=None):
        from .cluster import poison_cluster

        mask = torch.zeros(len(fps), dtype=torch.bool)
        if queries is None:
            return mask
        for y in queries.labels.unique().tolist():
            res = poison_cluster(queries.fps[queries.labels == y], y, fps, labels, **self.kw)
            mask[res.members] = True
        return mask


def kmeans2(x: torch.Tensor, gen: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k=2 and k-means++ seeding; returns cluster ids."""
    n = len(x)
    c0 = x[torch.randint(0, n, (1,), generator=gen)]
    d = torch.cdist(x, c0).view(-1) ** 2
    p = d / d.sum() if float(d.sum()) > 0 else torch.full((n,), 1.0 / n)
    c1 = x[torch.multinomial(p, 1, generator=gen)]
    centres = torch.cat([c0, c1])
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, assign) and _ > 0:
            break
        assign = new
        for j in range(2):
            if (assign == j).any():
                centres[j] = x[assign == j].mean(0)
    return assign


def _per_class_centred(fps: torch.Tensor, labels: torch.Tensor, min_size: int = 4):
    """For each class with enough members: (indices, centred fingerprints, right singular vectors)."""
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        if len(idx) < min_size:
            continue
        x = fps[idx].float()
        x = x - x.mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        yield idx, x, v


@register
class ActivationClustering(Detector):
    name = "activation-clustering"

    def __init__(self, dims: int = 10, max_share: float = 0.35, seed: int = 0):
        self.dims, self.max_share, self.seed = dims, max_share, seed

    def flag(self, fps, labels, queries=None):
        mask = torch.zeros(len(fps), dtype=torch.bool)
        gen = torch.Generator().manual_seed(self.seed)
        for idx, x, v in _per_class_centred(fps, labels):
            q = min(self.dims, x.shape[1], len(idx) - 1)
            z = x @ v[:q].T
            assign = kmeans2(z, gen)
            sizes = torch.bincount(assign, minlength=2)
            small = int(sizes.argmin())
            if float(sizes[small]) / len(idx) <= self.max_share:
                mask[idx[assign == small]] = True
        return mask


@register
class SpectralSignatures(Detector):
    name = "spectral-signatures"

    def __init__(self, eps: float = 0.05):
        self.eps = eps

    def flag(self, fps, labels, queries=None):
        mask = torch.zeros(len(fps), dtype=torch.bool)
        for idx, x, v in _per_class_centred(fps, labels):
            score = (x @ v[0]) ** 2
            n_flag = min(len(idx), max(1, int(round(1.5 * self.eps * len(idx)))))
            mask[idx[torch.topk(score, n_flag).indices]] = True
        return mask


def precision_recall(flagged: torch.Tensor, poisoned: torch.Tensor) -> tuple[float, float]:
    tp = int((flagged & poisoned).sum())
    nf, npos = int(flagged.sum()), int(poisoned.sum())
    return (tp / nf if nf else 0.0), (tp / npos if npos else 0.0)
