"""Training-time augmentation on uint8 batches: random padded crops and horizontal flips.

Trust side: enclave (CalTrain augments decrypted instances inside the enclave) and owner (plain
baseline training). Pure tensor maths driven by an explicit `torch.Generator`, so a CalTrain run
and a plain run with the same seed see exactly the same augmented pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x_u8: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (pad `pad`, reflect) and horizontal flip; returns float pixels in [0, 255]."""
    n, c, h, w = x_u8.shape
    padded = F.pad(x_u8.float(), (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = dy.view(n, 1) + torch.arange(h).view(1, h)
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                 rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
