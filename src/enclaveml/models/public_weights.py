"""Does a model carry weights anyone can download? (owner side, pure model maths).

Why: the class mapping hides which BackNet output is which class only while the host cannot match
the BackNet's final-layer rows against known weights. The zoo's trained weights ship inside this
package, so for a zoo model split as published a host recovers the secret class order exactly, by
nearest-row matching (even after noise of twice the weights' spread is added), and the sealed
FrontNet holds public tensors. `partition` warns then and points to `--head N` (the classifier
head runs in the enclave, so the host never sees class scores) and to fine-tuning the head on
private data.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


#: A classifier is "public" when nearest-row matching against a published matrix of its shape
#: finds the right row for at least this share of its classes (a fresh head: about 1 / classes).
MATCHED_SHARE = 0.8


@functools.lru_cache(maxsize=1)
def _published() -> tuple[torch.Tensor, ...]:
    """Every 2-D tensor (classifier matrix) of the zoo's packaged trained weights."""
    from safetensors.torch import load_file

    from . import zoo

    out = []
    for e in zoo.ZOO.values():
        if e.weights_path.exists():
            out += [t.to(torch.float32) for t in load_file(str(e.weights_path)).values() if t.dim() == 2]
    return tuple(out)


def classifier_is_public(classifier: nn.Module) -> bool:
    """True when a host could match the classifier's rows against published zoo weights.

    Why not compare bytes: a re-saved (fp16), lightly fine-tuned or noised copy has other bytes
    but the same nearest rows, and the host's attack (`match_rows`) works on it all the same. So
    this runs that attack on the unpermuted rows: most rows nearest their own published row means
    the secret class order is recoverable."""
    w = getattr(classifier, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] < 2:
        return False
    w = w.detach().to(torch.float32).cpu()
    for p in _published():
        if p.shape == w.shape:
            hits = sum(int(i == j) for i, j in enumerate(match_rows(p, w)))
            if hits >= MATCHED_SHARE * w.shape[0]:
                return True
    return False


def match_rows(published: torch.Tensor, host_rows: torch.Tensor) -> list[int]:
    """The attack, for tests and the docs: for each host-order row, the published row nearest to it
    (its original class). Exact on a zoo bundle; robust to noise far above the weights' spread."""
    d = torch.cdist(host_rows.double(), published.double())
    return d.argmin(dim=1).tolist()
