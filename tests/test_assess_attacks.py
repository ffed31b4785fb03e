"""The leakage tests on a real model and real CIFAR-10 images: the attacks must actually work.

A shallow IR must be invertible (high SSIM) and a deep one must not; the KL test must find
leaking channels right after the first conv and fewer at depth.
"""

from dataclasses import replace

import pytest
import torch

from enclaveml.assess import leakage
from enclaveml.assess.config import AssessConfig
from enclaveml.assess.data import load_assess_data
from enclaveml.assess.kl import channel_images
from enclaveml.assess.leakage import AssessContext, PointData
from enclaveml.models import zoo


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: why one thread


def _darknet(require_trained: bool):
    e = zoo.entry("darknet")
    if e.weights_path.exists():
        return zoo.load("darknet"), e.preprocessing
    if require_trained:
        pytest.skip("darknet has no trained weights yet (make zoo)")
    return zoo.load("darknet", pretrained=False), e.preprocessing


def _context(cifar10_dir, model, pre, cfg):
    data = load_assess_data(cifar10_dir, replace(pre, resize=False), cfg.samples, cfg.decoder_train, seed=0)
    x_test, x_train = data.x_test.float() / 255, data.x_train.float() / 255
    with torch.no_grad():
        probs = torch.softmax(model(pre.normalise(x_test)), -1)
    return AssessContext(model, pre, x_test, x_train, probs, cfg)


def _point(ctx, k):
    front, _ = ctx.model.split(k)
    pt = next(p for p in ctx.model.partition_points() if p.index == k)
    with torch.no_grad():
        return PointData(pt, front, front(ctx.pre.normalise(ctx.x_test)), front(ctx.pre.normalise(ctx.x_train)))


def test_channel_images_are_unit_range_and_flag_blank_channels():
    ir = torch.randn(2, 4, 8, 8)
    ir[0, 1] = 3.0  # a dead (constant) channel
    imgs, blank = channel_images(ir, (32, 32))
    assert imgs.shape == (8, 1, 32, 32) and float(imgs.min()) >= 0 and float(imgs.max()) <= 1
    assert blank.tolist() == [False, True, False, False, False, False, False, False]
    vec, vblank = channel_images(torch.randn(3, 5), (32, 32))  # a pooled (vector) IR: nothing to show
    assert bool(vblank.all()) and float(vec.abs().max()) == 0.0


def test_rmle_inverts_a_shallow_point_but_not_a_deep_one(cifar10_dir):
    model, pre = _darknet(require_trained=False)
    cfg = AssessConfig(samples=4, decoder_train=10, rmle_samples=4, rmle_steps=100)
    ctx = _context(cifar10_dir, model, pre, cfg)
    rmle = leakage.get("rmle")(cfg)
    shallow = rmle.evaluate(ctx, _point(ctx, 1)).summary["ssim"]
    deep = rmle.evaluate(ctx, _point(ctx, 11)).summary["ssim"]
    assert shallow > 0.7, shallow
    assert deep < shallow - 0.3, (shallow, deep)


def test_decoder_learns_an_inverse_at_a_shallow_point(cifar10_dir):
    model, pre = _darknet(require_trained=False)
    cfg = AssessConfig(samples=8, decoder_train=300, decoder_steps=60, decoder_batch=32)
    ctx = _context(cifar10_dir, model, pre, cfg)
    dec = leakage.get("decoder")(cfg)
    res = dec.evaluate(ctx, _point(ctx, 1))
    deep = dec.evaluate(ctx, _point(ctx, 12)).summary["ssim"]  # pooled vector IR
    assert res.summary["ssim"] > 0.5 and res.summary["ssim"] > deep + 0.2, (res.summary, deep)
    assert res.images["reconstructions"].shape[1:] == (3, 32, 32)


def test_kl_test_finds_leaking_channels_after_the_first_conv(cifar10_dir):
    model, pre = _darknet(require_trained=True)
    cfg = AssessConfig(samples=8, decoder_train=10)
    ctx = _context(cifar10_dir, model, pre, cfg)
    kl = leakage.get("kl")(cfg)
    first = kl.evaluate(ctx, _point(ctx, 1))
    s = first.summary
    assert s["channels"] == 32 and s["leaks"] and s["any_channel_beats_uniform"]
    assert s["min"] < 0.2 * s["uniform"] and s["min"] < s["control_min"]
    assert first.images["channels"].shape[1:] == (1, 32, 32)
    last = kl.evaluate(ctx, _point(ctx, 12)).summary  # pooled: only a blank image to show
    assert last["leak_fraction"] == last["chance_fraction"] and not last["leaks"]
