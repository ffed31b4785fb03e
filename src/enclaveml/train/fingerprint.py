"""Instance fingerprints: the L2-normalised penultimate-layer embedding of the trained model.

Trust side: enclave (fingerprints of training instances, after training) and owner/auditor
(fingerprint of a mispredicted input). Pure tensor maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import Preprocessing


@torch.no_grad()
def _batched_eval(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, fn, batch: int, empty: torch.Tensor) -> torch.Tensor:
    """Apply `fn(model, normalised batch)` over uint8 N,C,H,W in eval mode, restoring the mode after."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x_u8), batch):
            out.append(fn(model, pre.normalise(x_u8[i:i + batch].float().div(255.0))))
    finally:
        model.train(was)
    return torch.cat(out) if out else empty


def fingerprints(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, batch: int = 256) -> torch.Tensor:
    """uint8 N,C,H,W -> float32 N,D unit vectors (eval mode, no augmentation)."""
    return _batched_eval(model, x_u8, pre, lambda m, x: F.normalize(m.penultimate(x), dim=1), batch, torch.zeros(0, 0))


def predict(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, batch: int = 256) -> torch.Tensor:
    """Predicted class per input (eval mode)."""
    return _batched_eval(model, x_u8, pre, lambda m, x: m(x).argmax(1), batch, torch.zeros(0, dtype=torch.long))
