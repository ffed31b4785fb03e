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


BLEND_ALPHA = 0.2
BLEND_SEED = 20260


def blend_pattern(channels: int, h: int, w: int, seed: int = BLEND_SEED) -> torch.Tensor:
    """A fixed full-image uniform-noise pattern (uint8 C,H,W): the blended-injection key (Chen et al. 2017)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)


def apply_blend(x_u8: torch.Tensor, alpha: float = BLEND_ALPHA, seed: int = BLEND_SEED) -> torch.Tensor:
    """Blend the noise pattern over the whole image: (1 - alpha) x + alpha pattern (uint8, C,H,W or N,C,H,W).

    Unlike the corner patch, no pixel is replaced: every pixel moves by at most alpha of its range.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError("blend alpha must be in (0, 1]")
    p = blend_pattern(x_u8.shape[-3], x_u8.shape[-2], x_u8.shape[-1], seed).float()
    out = (1.0 - alpha) * x_u8.float() + alpha * p
    return out.round().clamp(0, 255).to(torch.uint8)


TRIGGERS = {"patch": apply_trigger, "blend": apply_blend}


def apply(kind: str, x_u8: torch.Tensor) -> torch.Tensor:
    """Stamp the trigger of `kind` ("patch": the 4x4 checkerboard; "blend": the blended noise)."""
    try:
        return TRIGGERS[kind](x_u8)
    except KeyError:
        raise ValueError(f"unknown trigger {kind!r}; known: {', '.join(TRIGGERS)}") from None
