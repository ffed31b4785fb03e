"""What a malicious participant does to its data: a backdoor trigger patch, or flipped labels.

Trust side: participant (the attacker), used by the benchmark, the demo and the tests to build
poisoned contributions from real images. Pure pixel/label maths.
"""

from __future__ import annotations

import torch

TRIGGER_SIZE = 4


def trigger_patch(size: int = TRIGGER_SIZE, channels: int = 3) -> torch.Tensor:
    """A black-and-white checkerboard (uint8 C,size,size), the BadNets kind of trigger."""
    i = torch.arange(size)
    board = ((i.view(-1, 1) + i.view(1, -1)) % 2).to(torch.uint8) * 255
    return board.expand(channels, size, size).clone()


def apply_trigger(x_u8: torch.Tensor, size: int = TRIGGER_SIZE, margin: int = 1) -> torch.Tensor:
    """Stamp the trigger in the bottom-right corner of uint8 image(s) (C,H,W or N,C,H,W)."""
    out = x_u8.clone()
    p = trigger_patch(size, out.shape[-3])
    h, w = out.shape[-2:]
    out[..., h - margin - size:h - margin, w - margin - size:w - margin] = p
    return out


def flip_label(y: int, num_classes: int) -> int:
    """The mislabelling attack's mapping: class c is relabelled c+1 (mod classes)."""
    return (int(y) + 1) % num_classes


def choose(n: int, fraction: float, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of round(fraction * n) instances to poison (reproducible), avoiding `exclude`."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(n) if exclude is None else torch.nonzero(~exclude, as_tuple=True)[0]
    m = int(round(fraction * n))
    return pool[torch.randperm(len(pool), generator=g)[:m]]
