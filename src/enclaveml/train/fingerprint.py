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
def _batched_eval(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, fn, batch: int, empty: torch.Tensor,
                  channels_last: bool = False) -> torch.Tensor:
    """Apply `fn(model, normalised batch)` over uint8 N,C,H,W in eval mode, restoring the mode after."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x_u8), batch):
            x = pre.normalise(x_u8[i:i + batch].float().div(255.0))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(fn(model, x))
    finally:
        model.train(was)
    return torch.cat(out) if out else empty


def fingerprints(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, batch: int = 256,
                 channels_last: bool = False) -> torch.Tensor:
    """uint8 N,C,H,W -> float32 N,D unit vectors (eval mode, no augmentation).

    `channels_last`: run a channels-last copy of the model on channels-last inputs (the training
    enclave's fingerprint pass: 1.4x faster for darknet on one CPU thread at load 15, `benchmarks/bench_fingerprint_pass.py`; the same values up to
    float rounding, 2.4e-7 at most for `darknet:width=16`, docs/caltrain.md)."""
    if channels_last and not getattr(model, "_channels_last_copy", False):
        model = channels_last_copy(model)
    return _batched_eval(model, x_u8, pre, lambda m, x: F.normalize(m.penultimate(x), dim=1), batch,
                         torch.zeros(0, 0), channels_last)


def channels_last_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with its 4-D weights in channels-last layout (the original is untouched)."""
    import copy

    out = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out._channels_last_copy = True
    return out


def predict(model: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, batch: int = 256) -> torch.Tensor:
    """Predicted class per input (eval mode)."""
    return _batched_eval(model, x_u8, pre, lambda m, x: m(x).argmax(1), batch, torch.zeros(0, dtype=torch.long))
