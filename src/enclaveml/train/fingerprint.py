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
def fingerprints(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, batch: int = 256) -> torch.Tensor:
    """uint8 N,C,H,W -> float32 N,D unit vectors (eval mode, no augmentation)."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x_u8), batch):
            x = pre.normalise(x_u8[i:i + batch].float().div(255.0))
            out.append(F.normalize(model.penultimate(x), dim=1))
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def predict(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, batch: int = 256) -> torch.Tensor:
    """Predicted class per input (eval mode)."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x_u8), batch):
            out.append(model(pre.normalise(x_u8[i:i + batch].float().div(255.0))).argmax(1))
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
