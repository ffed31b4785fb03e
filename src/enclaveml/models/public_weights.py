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
import hashlib

import torch
from torch import nn


def _digest(t: torch.Tensor) -> str:
    t = t.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _published() -> frozenset[str]:
    """Digests of every tensor of the zoo's packaged trained weights."""
    from safetensors.torch import load_file

    from . import zoo

    out = set()
    for e in zoo.ZOO.values():
        if e.weights_path.exists():
            out.update(_digest(t) for t in load_file(str(e.weights_path)).values() if t.numel() > 1)
    return frozenset(out)


def classifier_is_public(classifier: nn.Module) -> bool:
    """True when the classifier's weight matrix is one of the published zoo tensors."""
    w = getattr(classifier, "weight", None)
    return isinstance(w, torch.Tensor) and _digest(w) in _published()


def match_rows(published: torch.Tensor, host_rows: torch.Tensor) -> list[int]:
    """The attack, for tests and the docs: for each host-order row, the published row nearest to it
    (its original class). Exact on a zoo bundle; robust to noise far above the weights' spread."""
    d = torch.cdist(host_rows.double(), published.double())
    return d.argmin(dim=1).tolist()
