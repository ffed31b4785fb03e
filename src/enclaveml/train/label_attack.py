"""The label-inference attacks of a CalTrain host that colludes with one participant.

Trust side: attacker (the untrusted host plus one participant). Pure tensor logic, used by
`benchmarks/bench_label_leakage.py` and the leakage tests to measure what the enclave's
gradients give away. The attacker sees, every step, what the host sees: the rows the enclave
hands back for the host's output (dL/dscores, or dL/dfeatures at the cut when the head runs in
the enclave) and, without a head, the scores themselves; it knows the labels of the colluding
participant's rows (granted: which rows those are; the colluder could make its instances
recognisable) and infers everyone else's.

- `exposed_columns`: without a head, dL/dscores = (softmax(scores) - q) / B, with q the
  (smoothed) one-hot label in the secret column order, so softmax(scores) - B * grad is q and
  its argmax the label's column, exactly. `ColumnNamer` names the columns by majority vote of
  the colluder's rows (the secret order is fixed for a run).
- `CentroidAttack`: for cut-layer gradients (and for any defended gradient), the direction
  attack of Li et al. (ICLR 2022, "Label leakage and protection in two-party split learning")
  made multi-class: unit-normalised rows, class centroids from the colluder's rows of the last
  `window` steps, each row labelled by its nearest centroid (cosine); `kmeans=True` refines the
  centroids on the batch with spherical k-means first and names each cluster by the colluder
  rows in it.
- `KnnAttack`: k nearest colluder rows of the last `window` steps (cosine), majority vote; it
  needs no class to form one cluster, so it also reads multi-modal classes and norm differences
  (`cosine=False`: Euclidean distance on the raw rows).
- `ProbeAttack`: a ridge-regression linear probe from the colluder's rows of the last `window`
  steps to their one-hot labels (kernel form, standardised rows), argmax per row: the attack of
  a host that trains a classifier on what it sees.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F


def exposed_columns(scores: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Each row's label column in the secret order, from the scores and dL/dscores (mean loss)."""
    q = torch.softmax(scores.double(), dim=1) - grad.double() * grad.shape[0]
    return q.argmax(1)


class ColumnNamer:
    """Maps secret score columns to class indices by majority vote of rows with known labels."""

    def __init__(self, classes: int):
        self.votes = torch.zeros(classes, classes, dtype=torch.long)

    def observe(self, columns: torch.Tensor, labels: torch.Tensor) -> None:
        self.votes.index_put_((columns, labels), torch.ones_like(columns), accumulate=True)

    def name(self, columns: torch.Tensor) -> torch.Tensor:
        """Class index per column (-1 where no known row has voted yet)."""
        best = self.votes.argmax(1)
        best[self.votes.sum(1) == 0] = -1
        return best[columns]


class CentroidAttack:
    """Nearest known-class centroid of unit gradient rows, centroids from the last `window` steps."""

    def __init__(self, classes: int, window: int = 20, kmeans: bool = False, iters: int = 10):
        self.classes = classes
        self.kmeans = kmeans
        self.iters = iters
        self.known: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max(1, window))

    def step(self, grad: torch.Tensor, known: torch.Tensor, known_labels: torch.Tensor) -> torch.Tensor:
        """One step's rows (B x ...), a mask of the colluder's rows and their labels -> a guessed
        class per row (-1 where no class has a known row yet)."""
        g = F.normalize(grad.reshape(grad.shape[0], -1).double(), dim=1)
        self.known.append((g[known], known_labels))
        dirs = torch.cat([d for d, _ in self.known])
        labs = torch.cat([y for _, y in self.known])
        present = torch.unique(labs)
        cent = F.normalize(torch.stack([dirs[labs == c].mean(0) for c in present]), dim=1)
        if self.kmeans:
            cent, names = self._kmeans(g, cent, present, g[known], known_labels)
        else:
            names = present
        return names[(g @ cent.T).argmax(1)]

    def _kmeans(self, g, cent, present, kd, ky):
        for _ in range(self.iters):
            assign = (g @ cent.T).argmax(1)
            for j in range(len(cent)):
                members = g[assign == j]
                if len(members):
                    cent[j] = F.normalize(members.mean(0), dim=0)
        names = present.clone()
        assign = (kd @ cent.T).argmax(1)
        for j in range(len(cent)):  # name a cluster by the colluder's rows in it, if any
            ys = ky[assign == j]
            if len(ys):
                names[j] = torch.bincount(ys, minlength=self.classes).argmax()
        return cent, names


class _Bank:
    """The colluder's rows (flattened) and labels of the last `window` steps."""

    def __init__(self, window: int):
        self.rows: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max(1, window))

    def add(self, rows: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.rows.append((rows, labels))
        return torch.cat([r for r, _ in self.rows]), torch.cat([y for _, y in self.rows])


class KnnAttack:
    """Majority label of the `k` nearest colluder rows (cosine, or Euclidean with cosine=False)."""

    def __init__(self, classes: int, window: int = 20, k: int = 10, cosine: bool = True):
        self.classes, self.k, self.cosine = classes, k, cosine
        self.bank = _Bank(window)

    def step(self, rows: torch.Tensor, known: torch.Tensor, known_labels: torch.Tensor) -> torch.Tensor:
        g = rows.reshape(rows.shape[0], -1).double()
        if self.cosine:
            g = F.normalize(g, dim=1)
        bank, labs = self.bank.add(g[known], known_labels)
        sim = g @ bank.T if self.cosine else -torch.cdist(g, bank)
        k = min(self.k, bank.shape[0])
        if k == 0:
            return torch.full((g.shape[0],), -1, dtype=torch.long)
        idx = sim.topk(k, dim=1).indices
        votes = torch.zeros(g.shape[0], self.classes, dtype=torch.double)
        votes.scatter_add_(1, labs[idx], torch.ones(idx.shape, dtype=torch.double))
        return votes.argmax(1)


class ProbeAttack:
    """Ridge-regression probe (kernel form) from the colluder's standardised rows to one-hot labels."""

    def __init__(self, classes: int, window: int = 20, ridge: float = 1.0):
        self.classes, self.ridge = classes, ridge
        self.bank = _Bank(window)

    def step(self, rows: torch.Tensor, known: torch.Tensor, known_labels: torch.Tensor) -> torch.Tensor:
        g = rows.reshape(rows.shape[0], -1).double()
        bank, labs = self.bank.add(g[known], known_labels)
        if bank.shape[0] == 0:
            return torch.full((g.shape[0],), -1, dtype=torch.long)
        mu, sd = bank.mean(0), bank.std(0, unbiased=False) + 1e-8
        xb, xg = (bank - mu) / sd, (g - mu) / sd
        y1 = F.one_hot(labs, self.classes).double()
        y1 = y1 - y1.mean(0)
        kern = xb @ xb.T
        alpha = torch.linalg.solve(kern + self.ridge * xb.shape[1] * torch.eye(len(kern), dtype=torch.double), y1)
        return (xg @ xb.T @ alpha).argmax(1)


def recovery(guess: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of rows whose guessed class is the true one (unguessed rows count as wrong)."""
    return float((guess == truth).double().mean()) if len(truth) else 0.0
