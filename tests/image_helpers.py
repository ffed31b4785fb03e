"""Small real images for tests that need decodable inputs but not CIFAR-10 content."""

from __future__ import annotations

import io

import torch
from PIL import Image


def random_png(seed: int, size: int = 32) -> bytes:
    """A PNG of seeded random RGB pixels (the same bytes for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    b = io.BytesIO()
    Image.fromarray(px, "RGB").save(b, "PNG")
    return b.getvalue()
