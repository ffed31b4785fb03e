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


def _strips(n_out: int, n_in: int, back: int, ahead: int) -> list[tuple[int, int, int, int]]:
    """(first, end) output rows of each strip and the (first, end) input rows it reads, for a band
    whose output row i reads input rows i-back .. i+ahead."""
    return [(a, min(a + STRIP, n_out), max(0, a - back), min(n_in, min(a + STRIP, n_out) + ahead))
            for a in range(0, n_out, STRIP)]


def _banded(t: torch.Tensor, left: torch.Tensor, right: torch.Tensor, reach: tuple[int, int]) -> torch.Tensor:
    """left @ t @ right for banded `left` (rows) and `right` (columns), in strips of `STRIP` outputs.

    `reach` = (back, ahead): output row (column) i reads input rows (columns) i-back .. i+ahead;
    (0, win-1) for the filter, (win-1, 0) for its adjoint. Each strip is a product with only the
    band's block over the inputs it reads.
    """
    if left.shape[0] <= STRIP:
        rows = left @ t
    else:
        rows = torch.cat([left[a:e, lo:hi] @ t[..., lo:hi, :] for a, e, lo, hi in _strips(*left.shape, *reach)], -2)
    if right.shape[1] <= STRIP:
        return rows @ right
    return torch.cat([rows[..., :, lo:hi] @ right[lo:hi, a:e] for a, e, lo, hi in _strips(right.shape[1], right.shape[0], *reach)],
                     -1)


def gaussian_filter(t: torch.Tensor, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The separable Gaussian 'valid' filter over the last two dims, as banded matrix products.

    Up to 64x64 one product per side (`_bands`). Larger images are filtered in strips of `STRIP`
    output rows (then columns), each a product with the band's block over only the input rows it
    reads: at 224x224 the full band is 95% zeros, and the strips take 0.6x the time of the full
    products, forward and backward (docs/benchmarks.md, "helper lite, session 5"). The same sums;
    float rounding may differ in the last bit.
    """
    bh, bwt = _bands(t.shape[-2], t.shape[-1], win_size, sigma, t.dtype)
    return _banded(t, bh, bwt, (0, bh.shape[1] - bh.shape[0]))


def ssim_target(y: torch.Tensor, win_size: int = 11, sigma: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's local moments (Gaussian mean of y and of y^2) for `ssim_training`: computed once per
    minibatch when several decoders are scored against the same images."""
    y = y.contiguous()
    t = gaussian_filter(torch.stack([y, y * y]), win_size, sigma)
    return t[0], t[1]


def gaussian_filter_t(u: torch.Tensor, h: int, w: int, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The adjoint of `gaussian_filter` for (h, w) images: (..., h-win+1, w-win+1) -> (..., h, w).

    Bh^T @ u @ Bw, in strips as the filter (`_banded`): the same sums as autograd's gradient of the
    filter, without the full-size zero-filled tensor autograd makes for each strip's slice.
    """
    bh, bwt = _bands(h, w, win_size, sigma, u.dtype)
    if u.shape[-2:] != (bh.shape[0], bwt.shape[1]):
        raise ValueError(f"the adjoint of the {h}x{w} filter takes {bh.shape[0]}x{bwt.shape[1]} maps, "
                         f"got {tuple(u.shape[-2:])}")
    return _banded(u, bh.T, bwt.T, (bh.shape[1] - bh.shape[0], 0))


class _SSIMObjective(torch.autograd.Function):
    """Mean SSIM of x against y with y's moments given, and its gradient in closed form.

    With mx = G x, xx = G x^2, xy = G xy (G the Gaussian 'valid' filter) and s the SSIM map,
    dS/dx = G^T ds/dmx + 2x G^T ds/dxx + y G^T ds/dxy: three filters forward and three adjoint
    filters back, where autograd recorded some thirty element-wise steps and a zero-filled tensor
    per strip (at 224x224 those fills alone were ~13 ms of a ~95 ms decoder step). The same function
    and gradient up to float rounding (tests/test_assess_metrics.py).
    """

    @staticmethod
    def forward(ctx, x, y, my, yy, win_size, sigma):
        x, y = x.contiguous(), y.contiguous()
        planes = torch.empty((3, *x.shape), dtype=x.dtype)
        planes[0].copy_(x)
        torch.mul(x, x, out=planes[1])
        torch.mul(x, y, out=planes[2])
        mx, xx, xy = gaussian_filter(planes, win_size, sigma).unbind(0)
        c1, c2 = 0.01**2, 0.03**2
        # in the order `ssim_training` evaluated it before, so the value is the same to the bit
        mxy, mx2 = mx * my, mx * mx
        a1, a2 = 2 * mxy + c1, 2 * (xy - mxy) + c2
        b1, b2 = mx2 + my * my + c1, xx - mx2 + yy - my * my + c2
        b = b1 * b2
        s = (a1 * a2) / b
        inv = 1 / b
        ctx.save_for_backward(x, y, mx, my, a1, a2, b1, b2, inv, s)
        ctx.window = (win_size, sigma)
        return s.mean()

    @staticmethod
    def backward(ctx, grad):
        x, y, mx, my, a1, a2, b1, b2, inv, s = ctx.saved_tensors
        k = grad / s.numel()
        d = torch.empty((3, *s.shape), dtype=s.dtype)
        # ds/dmx = 2 my (a2 - a1) / (b1 b2) - 2 mx s (1/b1 - 1/b2); ds/dxx = -s / b2; ds/dxy = 2 a1 / (b1 b2)
        torch.mul(my * (a2 - a1) * inv - mx * s * (1 / b1 - 1 / b2), 2 * k, out=d[0])
        torch.mul(s / b2, -k, out=d[1])
        torch.mul(a1 * inv, 2 * k, out=d[2])
        t_mx, t_xx, t_xy = gaussian_filter_t(d, x.shape[-2], x.shape[-1], *ctx.window).unbind(0)
        return t_mx + 2 * x * t_xx + y * t_xy, None, None, None, None, None


def ssim_training(x: torch.Tensor, y: torch.Tensor, win_size: int = 11, sigma: float = 1.5,
                  target: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean SSIM of a batch, float32 and differentiable in x: the decoder attacker's training objective.

    The same statistic as `ssim` (Gaussian window, K1=0.01, K2=0.03, data range 1, 'valid'). The
    separable filter is two small matrix products (`_bands`), about 6x faster on CPU than the same
    filter as a depthwise convolution; `target` (from `ssim_target(y)`) skips the target's moments.
    Images filtered in strips (a side above STRIP + win - 1, e.g. 224x224) take the closed-form
    gradient (`_SSIMObjective`: 0.70-0.74x the CPU time of autograd's at 224x224, the same to ~1e-7
    relative); smaller ones (CIFAR's 32x32, where it saves nothing) keep autograd's, bit for bit
    the gradient they had. y gets no gradient.
    """
    my, yy = target if target is not None else ssim_target(y, win_size, sigma)
    y, my, yy = y.detach(), my.detach(), yy.detach()
    if max(my.shape[-2:]) > STRIP:
        return _SSIMObjective.apply(x, y, my, yy, win_size, sigma)
    x, y = x.contiguous(), y.contiguous()
    mx, xx, xy = gaussian_filter(torch.stack([x, x * x, x * y]), win_size, sigma).unbind(0)
    mxy, mx2, my2 = mx * my, mx * mx, my * my
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mxy + c1) * (2 * (xy - mxy) + c2)) / ((mx2 + my2 + c1) * (xx - mx2 + yy - my2 + c2))).mean()
