"""Work the assessment shares between points, or skips, must not change what it measures.

A reshape (flatten after global pooling) or an identity is a copy: its decoder and white-box search
are the source point's; the KL screen's margin starts from the error it measures, so a model with
tiny KL values does not recompute every image in float32 while every minimum stays exact; a
decoder in its final decay is not validated (nothing is left to decide); an in-place op at the
start of a segment does not overwrite the IR taken before it.
"""

import pytest
import torch
from torch import nn

from enclaveml.assess.affine import affine_copies, is_reshape
from enclaveml.assess.config import AssessConfig
from enclaveml.assess.decoder_training import train_decoders
from enclaveml.assess.forward import PointForward
from enclaveml.assess.leakage import AssessContext, PointData
from enclaveml.assess.rmle import RMLEInversion
from enclaveml.data.preprocess import Preprocessing
from enclaveml.models.layers import LayeredModel


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: why one thread


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    return bn


def test_reshape_and_identity_are_copies_mapped_back_exactly():
    torch.manual_seed(0)
    pooled = torch.randn(5, 8, 1, 1)
    pooled[:, 3] = 0.0  # a dead unit: constant over the samples (no affine fit, still a reshape)
    flat = pooled.flatten(1)
    found = affine_copies({1: pooled, 2: flat, 3: flat.clone(), 4: flat * 2})
    assert sorted(found) == [2, 3] and found[2].source == 1 and found[3].source == 1  # 4: a dead unit, no fit
    assert torch.equal(found[2].to_source(flat), pooled) and torch.equal(found[3].to_source(flat), pooled)
    assert is_reshape(pooled, flat) and not is_reshape(pooled, flat + 1) and not is_reshape(pooled, flat[:, :4])
    # a batch norm, then a flatten: chained back to the conv, in the conv's shape
    conv = torch.randn(5, 4, 2, 2)
    bn = _bn(4)
    with torch.no_grad():
        normed = bn(conv)
    chained = affine_copies({1: conv, 2: normed, 3: normed.flatten(1)})
    assert chained[2].source == 1 and chained[3].source == 1
    back = chained[3].to_source(normed.flatten(1))
    assert back.shape == conv.shape and torch.allclose(back, conv, atol=1e-5)
    # a flatten, then an affine map of the flat vector
    two = affine_copies({1: conv, 2: conv.flatten(1), 3: 3 * conv.flatten(1) - 1})
    assert two[3].source == 1 and torch.allclose(two[3].to_source(3 * conv.flatten(1) - 1), conv, atol=1e-5)


def _small_model() -> LayeredModel:
    torch.manual_seed(0)
    layers = [("conv", nn.Conv2d(3, 4, 3, padding=1)), ("bn", _bn(4)), ("relu", nn.ReLU()),
              ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(4, 3))]
    return LayeredModel(layers, (3, 8, 8), 3).eval()


def test_rmle_searches_once_for_a_copy_and_gives_it_the_sources_images():
    m = _small_model()
    pre = Preprocessing(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    points = m.partition_points()
    irs, logits = PointForward(m, [p.index for p in points])(pre.normalise(x), logits=True)
    cfg = AssessConfig(samples=3, rmle_samples=3, rmle_steps=4, rmle_early_stop=False)
    ctx = AssessContext(m, pre, x, x, torch.softmax(logits, -1), cfg, oracle=m)
    pds = [PointData(p, m.split(p.index)[0], irs[p.index]) for p in points]
    test = RMLEInversion(cfg)
    test.prepare(ctx, pds)
    assert test._copies == {2: 1, 5: 4}  # bn after conv, flatten after pool
    assert sorted(test._done) == [1, 3, 4]  # searched: no row for the copies
    res = {pt.point.index: test.evaluate(ctx, pt) for pt in pds}
    assert res[2].summary["search_of"] == 1 and res[5].summary["search_of"] == 4
    assert "search_of" not in res[1].summary and "search_of" not in res[3].summary
    assert torch.equal(res[2].images["reconstructions"], res[1].images["reconstructions"])
    assert res[5].summary["ssim"] == res[4].summary["ssim"]


def test_kl_margin_starts_from_the_measured_error_on_tiny_kl_values():
    from enclaveml.assess.kl_screen import channel_kl

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 10, generator=g)

    def oracle(grey, low):  # a near-uniform model (untrained): KL values ~1e-3, bfloat16-like error ~1e-5
        logits = (torch.nn.functional.adaptive_avg_pool2d(grey, 8).flatten(1) - 0.5) @ w * 0.1
        if low:
            logits = logits + 1e-3 * torch.sin(1e3 * logits)
        return torch.softmax(logits, -1)

    ir = torch.randn(6, 40, 4, 4, generator=g)
    p = torch.softmax(torch.randn(6, 10, generator=g) * 0.1, -1)
    blank_q = oracle(torch.zeros(1, 1, 16, 16), False)[0]
    own, ctl, _, _ = channel_kl(oracle, ir, p, blank_q, (16, 16), 50, screen=False)
    own_s, ctl_s, how, _ = channel_kl(oracle, ir, p, blank_q, (16, 16), 50, screen=True, batch_float32=20)
    # exact up to float32 rounding (the passes' batches differ), far below the bfloat16 error
    assert torch.allclose(own_s.min(1).values, own.min(1).values, rtol=1e-3, atol=0)
    assert torch.allclose(ctl_s.min(1).values, ctl.min(1).values, rtol=1e-3, atol=0)
    assert torch.equal(own_s.argmin(1), own.argmin(1)) and torch.equal(ctl_s.argmin(1), ctl.argmin(1))
    assert 0 < how.margin < 1e-3 and how.margin >= 3 * how.max_error
    assert how.float32 < how.live / 2, how  # with the fixed 0.1 margin every image went through float32


def test_no_validation_once_the_final_decay_has_begun():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 3, 8, 8, generator=g)
    source = lambda idx, upto: {1: x[idx]}  # noqa: E731
    # 40 steps: warmup 6, decay from step 32; chunks of 16 steps, a check every 8: at 16 and 32 steps
    res = train_decoders(source, x, {1: (3, 8, 8)}, steps=40, batch=4, lr=1e-3, seed=0, check_every=8,
                         patience=5, chunk=64, width=32)
    assert res.info[1]["steps"] == 40 and len(res.info[1]["val_curve"]) == 1  # checked at 16 only


def test_an_in_place_op_after_a_point_leaves_its_ir_alone():
    torch.manual_seed(0)
    layers = [("conv", nn.Conv2d(3, 4, 3, padding=1)), ("relu", nn.ReLU(inplace=True)),
              ("conv2", nn.Conv2d(4, 4, 3, padding=1)), ("act", nn.LeakyReLU(0.1, inplace=True)),
              ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(4, 3))]
    m = LayeredModel(layers, (3, 8, 8), 3).eval()
    x = torch.randn(2, 3, 8, 8)
    fwd = PointForward(m, [1, 2, 3, 4])
    irs, logits = fwd(x, logits=True)
    with torch.no_grad():
        for k in (1, 2, 3, 4):
            assert torch.equal(irs[k], m.split(k)[0](x)), k
        assert torch.equal(logits, m(x))
    assert bool((irs[1] < 0).any())  # the conv's IR, not the ReLU's



def test_a_one_by_one_map_is_decoded_as_the_vector_it_is():
    from enclaveml.assess.decoder_net import Decoder, channel_stats

    ir = torch.randn(4, 16, 1, 1)
    square = Decoder((16, 1, 1), (8, 8), *channel_stats(ir), base=32)
    flat = Decoder((16,), (8, 8), *channel_stats(ir.flatten(1)), base=32)
    assert isinstance(square.stem[1], nn.Linear) and isinstance(flat.stem[1], nn.Linear)
    assert [p.shape for p in square.parameters()] == [p.shape for p in flat.parameters()]
    assert square(ir).shape == flat(ir.flatten(1)).shape == (4, 3, 8, 8)


def test_decoder_output_is_a_float32_nchw_sigmoid_with_a_channels_last_gradient():
    """The decoder's last step (`decoder_net._SigmoidImage`): `sigmoid(z).float()` bit for bit, but NCHW
    contiguous for the loss, and its gradient, bit for bit, in the logits' channels-last layout."""
    from enclaveml.assess.decoder_net import _SigmoidImage

    g = torch.Generator().manual_seed(6)
    up = torch.randn(4, 3, 16, 16, generator=g)
    for dtype in (torch.bfloat16, torch.float32):
        z = (3 * torch.randn(4, 3, 16, 16, generator=g)).to(dtype).contiguous(memory_format=torch.channels_last)
        zr, zi = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
        ref = torch.sigmoid(zr).float()
        ref.backward(up)
        y = _SigmoidImage.apply(zi)
        assert y.dtype == torch.float32 and y.is_contiguous() and torch.equal(y, ref.detach())
        y.backward(up)
        assert zi.grad.dtype == dtype and zi.grad.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(zi.grad, zr.grad)


def test_rmle_searches_again_with_every_step_where_a_cut_budget_comes_near_the_threshold():
    """A FrontNet above `rmle_full_flops` gets fewer rMLE steps; where that search's SSIM comes within
    `rmle_full_near` of the SSIM threshold (or above it) more steps could flip the inversion verdict,
    so the point is searched again with all `rmle_steps` (the review's safeguard)."""
    from enclaveml.assess.rmle import near_threshold

    assert near_threshold({1: 0.25, 2: 0.19, 3: 0.9}, 0.3, 0.1) == [1, 3]
    m = _small_model()
    pre = Preprocessing(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    points = m.partition_points()
    irs, logits = PointForward(m, [p.index for p in points])(pre.normalise(x), logits=True)
    pds = [PointData(p, m.split(p.index)[0], irs[p.index]) for p in points]
    steps = {}
    for threshold in (0.0, 2.0):  # every SSIM near (or above) it; none within reach of it
        cfg = AssessConfig(samples=3, rmle_samples=3, rmle_steps=6, rmle_early_stop=False, rmle_full_flops=1.0,
                           rmle_min_steps=2, ssim_threshold=threshold, rmle_full_near=0.1)
        ctx = AssessContext(m, pre, x, x, torch.softmax(logits, -1), cfg, oracle=m)
        test = RMLEInversion(cfg)
        test.prepare(ctx, pds)
        res = {pt.point.index: test.evaluate(ctx, pt).summary for pt in pds}
        steps[threshold] = {k: (r["steps"], r["step_budget"], r.get("extended", False)) for k, r in res.items()}
    assert all(v == (6, 6, True) for v in steps[0.0].values()), steps  # searched again, every step
    assert all(v == (2, 2, False) for v in steps[2.0].values()), steps  # the cut budget stands
