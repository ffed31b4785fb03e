"""Trace a misprediction to training instances: nearest same-label fingerprints and who gave them.

Trust side: owner or auditor (holding the linkage key), or the enclave. Pure tensor logic: the
query is the fingerprint of the mispredicted input and the label the model wrongly gave it; the
answer is K training fingerprints carrying that label, and a per-participant count.
Fingerprints are unit vectors, so the Euclidean distance orders exactly like cosine similarity.

Two modes rank the same-label candidates:

- `nearest` (default): the K nearest to the query. Right for a backdoor: the triggered
  instances form a tight, label-consistent cluster where the triggered query lands.
- `mislabel`: cosine distance to the query plus the candidate's *centroid margin* (cosine to
  its own label's centroid minus the best cosine to another label's centroid). A flipped label
  leaves the instance's fingerprint among its true class, so its margin is negative (the
  nearest-class-mean analogue of Deep k-NN's label-inconsistent neighbourhoods, Peri et al.
  2020; centroids rather than k-NN because an under-fitted model's neighbourhoods are noisy for
  clean instances too); clean instances of the label mostly have positive margins. Both terms are in cosine units and
  weigh equally by default. It ranks a backdoor's consistent cluster *last*, hence not default.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

MODES = ("nearest", "mislabel")


@dataclass(frozen=True)
class Neighbour:
    index: int  # position in the linkage store
    distance: float
    instance_hash: str  # hex
    participant: str  # hex id
    margin: float | None = None  # centroid margin (mode `mislabel`): < 0 = sits among another class


@dataclass(frozen=True)
class TraceResult:
    label: int
    neighbours: list[Neighbour]
    summary: list[tuple[str, int]] = field(default_factory=list)  # (participant, count), most first
    mode: str = "nearest"

    def to_dict(self, classes: list[str] | None = None) -> dict:
        return {
            "label": self.label,
            "label_name": classes[self.label] if classes and self.label < len(classes) else None,
            "mode": self.mode,
            "neighbours": [{k: v for k, v in n.__dict__.items() if v is not None} for n in self.neighbours],
            "participants": [{"participant": p, "count": c} for p, c in self.summary],
        }


def _centroids(x: torch.Tensor, labels: torch.Tensor, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm mean fingerprint per label, and which labels have any instance."""
    sums = torch.zeros(nc, x.shape[1]).index_add_(0, labels, x)
    return torch.nn.functional.normalize(sums, dim=1), torch.bincount(labels, minlength=nc) > 0


def _margins(x: torch.Tensor, labels: torch.Tensor, cent: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    sim = x @ cent.T
    sim[:, ~present] = float("-inf")
    own = sim.gather(1, labels.view(-1, 1)).view(-1)
    other = sim.scatter(1, labels.view(-1, 1), float("-inf")).max(1).values
    return torch.where(torch.isfinite(other), own - other, own)


def centroid_margins(fps: torch.Tensor, labels: torch.Tensor, refine: bool = True) -> torch.Tensor:
    """Per instance: cos to its label's centroid minus the best cos to another label's centroid.

    Negative = the nearest-class-mean classifier over the linkage records disagrees with the
    instance's label, i.e. its fingerprint sits among another class: the mark of a flipped label.
    Centroids are normalised mean fingerprints per label. With `refine`, they are recomputed
    once from the label-consistent instances only (margin >= 0; a label with none keeps its first
    centroid), a trimmed mean that is not pulled towards the boundary by ambiguous or flipped
    members. Labels without instances are skipped; with one label, the margin is the cosine to it.
    """
    if len(labels) == 0:
        return torch.zeros(0)
    x, nc = fps.float(), int(labels.max()) + 1
    cent, present = _centroids(x, labels, nc)
    m = _margins(x, labels, cent, present)
    if refine:
        keep = m >= 0
        cent2, present2 = _centroids(x[keep], labels[keep], nc)
        cent = torch.where(present2.view(-1, 1), cent2, cent)
        m = _margins(x, labels, cent, present)
    return m


def rank_same_label(query: torch.Tensor, label: int, fps: torch.Tensor, labels: torch.Tensor, k: int,
                    mode: str = "nearest", margins: torch.Tensor | None = None,
                    weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into fps) and distances of the k best-ranked fingerprints labelled `label`.

    `margins` (from `centroid_margins`, mode `mislabel` only) can be passed in to reuse them
    across many queries; `weight` scales the margin against the cosine distance.
    """
    if mode not in MODES:
        raise ValueError(f"unknown trace mode {mode!r}; known: {', '.join(MODES)}")
    cand = torch.nonzero(labels == label, as_tuple=True)[0]
    if cand.numel() == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    d = torch.cdist(query.view(1, -1).float(), fps[cand].float()).view(-1)
    score = d
    if mode == "mislabel":
        m = centroid_margins(fps, labels) if margins is None else margins
        score = d.pow(2) / 2 + weight * m[cand].float()  # unit vectors: 1 - cos = d^2 / 2
    kk = min(int(k), cand.numel())
    pos = torch.topk(score, kk, largest=False).indices
    return cand[pos], d[pos]


def nearest_same_label(query: torch.Tensor, label: int, fps: torch.Tensor, labels: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into fps) and distances of the k nearest fingerprints whose label is `label`."""
    return rank_same_label(query, label, fps, labels, k)


def summarise(participants: list[str]) -> list[tuple[str, int]]:
    """Per-participant counts, most first; ties broken by who holds the better-ranked neighbour.

    Plain counts, not rank- or distance-weighted: on the benchmark, weighting by 1/rank did not
    name the malicious participant more often in either scenario or mode (see docs/caltrain.md).
    """
    counts = Counter(participants)
    first = {p: i for i, p in reversed(list(enumerate(participants)))}
    return sorted(counts.items(), key=lambda pc: (-pc[1], first[pc[0]]))


def trace(query: torch.Tensor, label: int, fps: torch.Tensor, labels: torch.Tensor,
          hashes: list[bytes], participants: list[bytes], k: int = 10, mode: str = "nearest",
          margins: torch.Tensor | None = None, weight: float = 1.0) -> TraceResult:
    """Rank the training instances labelled `label` for the query (see the module's modes)."""
    if mode == "mislabel" and margins is None:
        margins = centroid_margins(fps, labels)
    idx, dist = rank_same_label(query, label, fps, labels, k, mode, margins, weight)
    ns = [Neighbour(int(i), round(float(d), 6), hashes[i].hex(), participants[i].hex(),
                    round(float(margins[i]), 6) if mode == "mislabel" else None)
          for i, d in zip(idx.tolist(), dist.tolist())]
    return TraceResult(int(label), ns, summarise([n.participant for n in ns]), mode)
