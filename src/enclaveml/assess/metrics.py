"""Leakage metrics as pure functions: SSIM, PSNR and KL divergence (owner side, assessment).

No state, no I/O: tensors in, tensors out, so each is checked against a reference in a few lines.
Images are float tensors in [0, 1], shaped (N, C, H, W); results are per image, shape (N,).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels and pixels.

    Gaussian-weighted local statistics with the usual K1=0.01, K2=0.03 and 'valid' borders (as
    scikit-image with `gaussian_weights=True`, the convention of He et al.); images smaller than
    the window shrink it. Computed in float64; the separable window is two banded matrix products
    (`_bands`): float64 has no fast depthwise convolution on CPU, and at 224x224 the 11x11 window
    as one took 8 s for 16 images, the matrix products 0.5 s (the same statistic to 1e-15).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim wants two (N,C,H,W) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my, xx, yy, xy = gaussian_filter(torch.stack([x, y, x * x, y * y, x * y]), win_size, sigma).unbind(0)
    # population (Gaussian-weighted) variances, as Wang et al. (scikit-image: use_sample_covariance=False)
    vx, vy, vxy = xx - mx * mx, yy - my * my, xy - mx * my
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (capped at 100 dB for identical images)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))
    return out.clamp(max=100.0).float()


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p || q) in nats along the last dimension; p and q are probability vectors.

    Broadcasts, so one reference distribution p (..., K) can be compared with many q at once.
    """
    p = p.double().clamp_min(0)
    q = q.double().clamp_min(eps)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(eps)) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0).float()  # rounding can dip below the true minimum 0


def kl_to_uniform(p: torch.Tensor) -> torch.Tensor:
    """KL(p || uniform): the paper's baseline, log K minus the entropy of p."""
    k = p.shape[-1]
    return kl_divergence(p, torch.full_like(p, 1.0 / k))


@lru_cache(maxsize=16)
def _bands(h: int, w: int, win_size: int, sigma: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The separable Gaussian 'valid' filter as two banded matrices: filtered = Bh @ image @ Bw^T.

    A (H-win+1, H) and a (W, W-win+1) matrix; read-only, shared by every caller (threads included).
    """
    win = min(win_size, h, w)
    win -= (win + 1) % 2
    ax = torch.arange(win, dtype=dtype) - (win - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()

    def band(n: int) -> torch.Tensor:
        m = torch.zeros(n - win + 1, n, dtype=dtype)
        for i in range(n - win + 1):
            m[i, i:i + win] = g
        return m

    return band(h), band(w).T.contiguous()


#: output rows (columns) per strip of the banded filter: at most 54 + 10 input rows per product
STRIP = 54


def gaussian_filter(t: torch.Tensor, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The separable Gaussian 'valid' filter over the last two dims, as banded matrix products.

    Up to 64x64 one product per side (`_bands`). Larger images are filtered in strips of `STRIP`
    output rows (then columns), each a product with the band's top-left block over only the input
    rows it reads: at 224x224 the full band is 95% zeros, and the strips take 0.6x the time of the
    full products, forward and backward (docs/benchmarks.md, "helper lite, session 5"). The same
    sums; float rounding may differ in the last bit.
    """
    bh, bwt = _bands(t.shape[-2], t.shape[-1], win_size, sigma, t.dtype)
    ho, wo = bh.shape[0], bwt.shape[1]
    span = bh.shape[1] - ho  # win - 1
    if ho <= STRIP:
        rows = bh @ t
    else:
        rows = torch.cat([bh[:min(a + STRIP, ho) - a, :min(a + STRIP, ho) - a + span] @ t[..., a:min(a + STRIP, ho) + span, :]
                          for a in range(0, ho, STRIP)], -2)
    if wo <= STRIP:
        return rows @ bwt
    return torch.cat([rows[..., :, a:min(a + STRIP, wo) + span] @ bwt[:min(a + STRIP, wo) - a + span, :min(a + STRIP, wo) - a]
                      for a in range(0, wo, STRIP)], -1)


def ssim_target(y: torch.Tensor, win_size: int = 11, sigma: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's local moments (Gaussian mean of y and of y^2) for `ssim_training`: computed once per
    minibatch when several decoders are scored against the same images."""
    y = y.contiguous()
    t = gaussian_filter(torch.stack([y, y * y]), win_size, sigma)
    return t[0], t[1]


def ssim_training(x: torch.Tensor, y: torch.Tensor, win_size: int = 11, sigma: float = 1.5,
                  target: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean SSIM of a batch, float32 and differentiable: the decoder attacker's training objective.

    The same statistic as `ssim` (Gaussian window, K1=0.01, K2=0.03, data range 1, 'valid'). The
    separable filter is two small matrix products (`_bands`), about 6x faster on CPU than the same
    filter as a depthwise convolution; `target` (from `ssim_target(y)`) skips the target's moments.
    """
    my, yy = target if target is not None else ssim_target(y, win_size, sigma)
    x, y = x.contiguous(), y.contiguous()
    mx, xx, xy = gaussian_filter(torch.stack([x, x * x, x * y]), win_size, sigma).unbind(0)
    mxy, mx2, my2 = mx * my, mx * mx, my * my
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mxy + c1) * (2 * (xy - mxy) + c2)) / ((mx2 + my2 + c1) * (xx - mx2 + yy - my2 + c2))).mean()
