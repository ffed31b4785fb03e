"""Trace a misprediction to training instances: nearest same-label fingerprints and who gave them.

Trust side: owner or auditor (holding the linkage key), or the enclave. Pure tensor logic: the
query is the fingerprint of the mispredicted input and the label the model wrongly gave it; the
answer is the K nearest training fingerprints carrying that label, and a per-participant count.
Fingerprints are unit vectors, so the Euclidean distance orders exactly like cosine similarity.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Neighbour:
    index: int  # position in the linkage store
    distance: float
    instance_hash: str  # hex
    participant: str  # hex id


@dataclass(frozen=True)
class TraceResult:
    label: int
    neighbours: list[Neighbour]
    summary: list[tuple[str, int]] = field(default_factory=list)  # (participant, count), most first

    def to_dict(self, classes: list[str] | None = None) -> dict:
        return {
            "label": self.label,
            "label_name": classes[self.label] if classes and self.label < len(classes) else None,
            "neighbours": [n.__dict__ for n in self.neighbours],
            "participants": [{"participant": p, "count": c} for p, c in self.summary],
        }


def nearest_same_label(query: torch.Tensor, label: int, fps: torch.Tensor, labels: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into fps) and distances of the k nearest fingerprints whose label is `label`."""
    cand = torch.nonzero(labels == label, as_tuple=True)[0]
    if cand.numel() == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    d = torch.cdist(query.view(1, -1).float(), fps[cand].float()).view(-1)
    kk = min(int(k), cand.numel())
    dist, pos = torch.topk(d, kk, largest=False)
    return cand[pos], dist


def summarise(participants: list[str]) -> list[tuple[str, int]]:
    """Per-participant counts, most first; ties broken by who holds the nearer neighbour."""
    counts = Counter(participants)
    first = {p: i for i, p in reversed(list(enumerate(participants)))}
    return sorted(counts.items(), key=lambda pc: (-pc[1], first[pc[0]]))


def trace(query: torch.Tensor, label: int, fps: torch.Tensor, labels: torch.Tensor,
          hashes: list[bytes], participants: list[bytes], k: int = 10) -> TraceResult:
    idx, dist = nearest_same_label(query, label, fps, labels, k)
    ns = [Neighbour(int(i), round(float(d), 6), hashes[i].hex(), participants[i].hex())
          for i, d in zip(idx.tolist(), dist.tolist())]
    return TraceResult(int(label), ns, summarise([n.participant for n in ns]))
