"""SSIM, PSNR and KL against independent references (scikit-image, scipy)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from enclaveml.assess.metrics import kl_divergence, kl_to_uniform, psnr, ssim


@pytest.mark.parametrize("noise", [0.02, 0.2, 0.6])
def test_ssim_matches_scikit_image(noise):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = ssim(x, y)
    ref = [structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), np.array(ref), atol=1e-4)


def test_ssim_orders_similarity_and_is_one_on_identity():
    x = torch.rand(1, 3, 32, 32)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    near, far = (x + 0.05 * torch.randn_like(x)).clamp(0, 1), torch.rand_like(x)
    assert float(ssim(x, near)) > 0.8 > 0.2 > float(ssim(x, far))
    with pytest.raises(ValueError):
        ssim(x, x[:, :1])


def test_psnr_matches_scikit_image():
    x = torch.rand(2, 3, 16, 16)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ref = [peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=1.0) for i in range(2)]
    np.testing.assert_allclose(psnr(x, y).numpy(), ref, rtol=1e-4)
    assert float(psnr(x[:1], x[:1])) == 100.0


def test_kl_matches_scipy_and_uniform_baseline():
    p = torch.softmax(torch.randn(4, 10), -1)
    q = torch.softmax(torch.randn(4, 10), -1)
    ref = [entropy(p[i].numpy(), q[i].numpy()) for i in range(4)]
    np.testing.assert_allclose(kl_divergence(p, q).numpy(), ref, rtol=1e-4)
    h = [entropy(p[i].numpy()) for i in range(4)]
    np.testing.assert_allclose(kl_to_uniform(p).numpy(), [math.log(10) - v for v in h], rtol=1e-4)
    assert torch.all(kl_divergence(p, p) == 0)
    # broadcasting: one p against many q
    assert kl_divergence(p[0], q).shape == (4,)


def test_training_ssim_is_the_ssim_statistic_and_differentiable():
    from enclaveml.assess.metrics import ssim_target, ssim_training

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = (x.detach() + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim_training(x, y)
    assert float(s) == pytest.approx(float(ssim(x.detach(), y).mean()), abs=1e-5)
    assert float(ssim_training(x, y, target=ssim_target(y))) == pytest.approx(float(s), abs=1e-7)
    (grad,) = torch.autograd.grad(s, x)
    assert float(grad.abs().sum()) > 0
    small = torch.rand(2, 3, 8, 8, generator=g)  # smaller than the window: the window shrinks, as in `ssim`
    assert float(ssim_training(small, small)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim_training(small, 1 - small)) == pytest.approx(float(ssim(small, 1 - small).mean()), abs=1e-5)


def _ssim_depthwise_reference(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The previous implementation: the 2-D Gaussian window as one float64 depthwise convolution."""
    import torch.nn.functional as F

    x, y = x.double(), y.double()
    win = min(win, x.shape[-1], x.shape[-2])
    win -= (win + 1) % 2
    ax = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    w = torch.outer(g, g).expand(c, 1, win, win).contiguous()

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    vx, vy, vxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("shape", [(1, 1, 224, 224), (1, 3, 96, 160), (2, 1, 9, 6)])
def test_ssim_by_matrix_products_equals_the_depthwise_window(shape):
    """224x224 (ImageNet) and non-square inputs, and one smaller than the window: the same SSIM."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(*shape, generator=g)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours, ref = ssim(x, y), _ssim_depthwise_reference(x, y)
    assert float((ours.double() - ref).abs().max()) < 1e-6
    if shape[-1] >= 11:
        sk = structural_similarity(x[0].numpy(), y[0].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=1.0)
        assert float(ours[0]) == pytest.approx(sk, abs=1e-4)


def test_training_ssim_in_strips_at_224_is_the_ssim_statistic():
    """At 224x224 the training objective filters in strips (`metrics.STRIP`): the same statistic and
    gradient as the full banded products."""
    from enclaveml.assess.metrics import _bands, gaussian_filter, ssim_training

    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 224, 224, generator=g).requires_grad_()
    y = (x.detach() + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim_training(x, y)
    assert float(s) == pytest.approx(float(ssim(x.detach(), y).mean()), abs=1e-6)
    bh, bwt = _bands(224, 224, 11, 1.5, torch.float32)
    full = bh @ x @ bwt
    strips = gaussian_filter(x)
    assert float((strips - full).abs().max()) < 1e-6
    (ga,) = torch.autograd.grad(strips.square().sum(), x)
    (gb,) = torch.autograd.grad(full.square().sum(), x)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6)


def _ssim_autograd_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training objective as autograd recorded it before the closed-form gradient (float64 here)."""
    from enclaveml.assess.metrics import gaussian_filter

    my, yy = gaussian_filter(torch.stack([y, y * y])).unbind(0)
    mx, xx, xy = gaussian_filter(torch.stack([x, x * x, x * y])).unbind(0)
    mxy, mx2, my2 = mx * my, mx * mx, my * my
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mxy + c1) * (2 * (xy - mxy) + c2)) / ((mx2 + my2 + c1) * (xx - mx2 + yy - my2 + c2))).mean()


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (1, 2, 224, 224), (2, 1, 9, 70), (2, 2, 8, 8)])
def test_training_ssim_gradient_in_closed_form_equals_autograd(shape):
    """The decoder's SSIM term in closed form (three adjoint filters; `ssim_training` uses it for images
    filtered in strips, such as 224x224): the same value and gradient as autograd's through the
    formula, in strips, with a shrunken window (8x8) and non-square; a channels-last input gives the
    same; below the strip size `ssim_training` is autograd's formula itself."""
    from enclaveml.assess.metrics import _SSIMObjective, ssim_target, ssim_training

    g = torch.Generator().manual_seed(4)
    y = torch.rand(*shape, generator=g)
    x = (y + 0.25 * torch.randn(shape, generator=g)).clamp(0, 1)
    big = shape[-1] > 64  # float64 matrix products are slow: the 224x224 reference in float32
    xd = (x.clone() if big else x.double()).requires_grad_()
    ref = _ssim_autograd_reference(xd, y if big else y.double())
    (gref,) = torch.autograd.grad(ref, xd)
    for xin in (x.clone(), x.contiguous(memory_format=torch.channels_last)):
        xin.requires_grad_()
        my, yy = ssim_target(y)
        s = _SSIMObjective.apply(xin, y, my, yy, 11, 1.5)
        (grad,) = torch.autograd.grad(3.0 * s, xin)  # an upstream factor reaches the gradient
        (used,) = torch.autograd.grad(ssim_training(xin, y, target=(my, yy)), xin)
        if max(my.shape[-2:]) > 54:  # filtered in strips (metrics.STRIP)
            assert torch.equal(used, torch.autograd.grad(_SSIMObjective.apply(xin, y, my, yy, 11, 1.5), xin)[0])
        else:
            (auto,) = torch.autograd.grad(_ssim_autograd_reference(xin, y), xin)
            assert torch.equal(used, auto)
        assert float(s) == pytest.approx(float(ref), abs=1e-6)
        assert torch.equal(s.detach(), _ssim_autograd_reference(x, y))  # float32: the same value to the bit
        assert grad.shape == x.shape
        assert float((grad.double() - 3.0 * gref).abs().max()) <= 1e-5 * float(gref.abs().max() * 3.0)


def test_adjoint_filter_is_the_transpose_of_the_filter():
    """<G u, v> = <u, G^T v> at a small size (one product) and at 224x224 (strips over a padded map)."""
    from enclaveml.assess.metrics import gaussian_filter, gaussian_filter_t

    g = torch.Generator().manual_seed(5)
    for h, w in ((32, 32), (224, 224), (9, 70)):
        u = torch.randn(2, h, w, generator=g, dtype=torch.float64)
        gu = gaussian_filter(u)
        v = torch.randn(gu.shape, generator=g, dtype=torch.float64)
        assert float((gu * v).sum()) == pytest.approx(float((u * gaussian_filter_t(v, h, w)).sum()), rel=1e-10)
    with pytest.raises(ValueError, match="adjoint"):
        gaussian_filter_t(torch.zeros(2, 5, 5), 32, 32)
