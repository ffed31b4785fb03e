"""Points whose IR is a per-channel affine copy of an earlier point's (owner side, assessment).

A user's model often makes every layer its own point: conv, then batch norm, then ReLU. Batch
norm in eval mode maps each channel x -> a*x + b, so the IR after it carries exactly what the IR
before it carries. An attack on the second IR is the attack on the first, composed with the
inverse map x -> (x - b)/a: the decoder attacker trained on one serves both, and the KL test's
channel images of the two are the same images wherever a > 0 (min-max normalisation removes a
and b). A reshape (flatten after global pooling: `256x1x1` -> `256`, a view, an identity) is the
same case with a = 1, b = 0: the same values in another shape. The white-box attacker knows the
map too, so its reconstruction from the source IR serves the copy as well. Found from the test
samples' IRs, with a tight tolerance: pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AffineCopy:
    """IR_point = scale * IR_source + shift, per channel (scale and shift shaped to broadcast over one
    IR of this point), where IR_source is read in this point's shape when `source_shape` (the source's
    per-sample shape) differs from it: a reshape."""

    source: int
    scale: torch.Tensor
    shift: torch.Tensor
    source_shape: tuple[int, ...] | None = None

    def to_source(self, ir: torch.Tensor) -> torch.Tensor:
        """The source point's IR from this point's."""
        x = (ir - self.shift) / self.scale
        return x if self.source_shape is None else x.reshape(x.shape[0], *self.source_shape)


def is_reshape(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether `dst` holds exactly `src`'s values per sample, in the same or another shape (identity,
    flatten, view): an affine copy with scale 1 that needs no fit (and allows constant channels)."""
    return (src.dim() >= 2 and dst.dim() >= 2 and src.shape[0] == dst.shape[0]
            and src[0].numel() == dst[0].numel() and torch.equal(src.reshape(dst.shape), dst))


def fit_affine(src: torch.Tensor, dst: torch.Tensor, rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) per channel with dst = scale * src + shift on every value, or None.

    Both (n, C, ...) of the same shape. Refused when a channel is constant in `src` (nothing to
    map) or the largest residual exceeds `rtol` of the channel's range in `dst`.
    """
    if src.shape != dst.shape or src.dim() < 2:
        return None
    c = src.shape[1]
    s = src.double().transpose(0, 1).reshape(c, -1)
    d = dst.double().transpose(0, 1).reshape(c, -1)
    sm, dm = s.mean(1, keepdim=True), d.mean(1, keepdim=True)
    var = (s - sm).pow(2).mean(1, keepdim=True)
    if bool((var <= 1e-12 * s.abs().amax(1, keepdim=True).pow(2).clamp_min(1e-30)).any()):
        return None
    a = ((s - sm) * (d - dm)).mean(1, keepdim=True) / var
    b = dm - a * sm
    resid = (d - (a * s + b)).abs().amax(1)
    span = (d.amax(1) - d.amin(1)).clamp_min(1e-12)
    if bool((resid > rtol * span).any()) or bool((a.abs() < 1e-12).any()):
        return None
    shape = (c,) + (1,) * (src.dim() - 2)
    return a.float().reshape(shape), b.float().reshape(shape)


def affine_copies(irs: dict[int, torch.Tensor]) -> dict[int, AffineCopy]:
    """For each point whose IR is an affine copy of an earlier point's (itself not a copy), that map.

    `irs`: point -> the IR of the same samples. Only consecutive points are compared (a copy is
    made by the layer in between), chained back to the first point of the run.
    """
    out: dict[int, AffineCopy] = {}
    ks = sorted(irs)
    for prev, k in zip(ks, ks[1:]):
        shape = tuple(irs[k].shape[1:])
        if is_reshape(irs[prev], irs[k]):
            if prev in out:  # IR_prev = A*src + B in prev's shape: the same map, read in k's shape
                first, whole = out[prev], tuple(irs[prev].shape[1:])
                a = first.scale.expand(whole).reshape(shape)
                b = first.shift.expand(whole).reshape(shape)
                src = first.source
            else:
                a, b, src = torch.ones(()), torch.zeros(()), prev
            source_shape = tuple(irs[src].shape[1:])
            out[k] = AffineCopy(src, a, b, None if source_shape == shape else source_shape)
            continue
        fit = fit_affine(irs[prev], irs[k])
        if fit is None:
            continue
        a, b = fit
        if prev in out:  # chain to the original: IR_k = a*(A*src + B) + b
            first = out[prev]
            a, b = a * first.scale, a * first.shift + b
            out[k] = AffineCopy(first.source, a, b, first.source_shape)
        else:
            out[k] = AffineCopy(prev, a, b)
    return out
