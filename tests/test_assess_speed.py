"""The assessment's speed machinery must not change what it measures.

One forward pass per batch gives every point's IR bit-identical to that point's FrontNet; training
all decoders on those shared batches gives bit-identical decoders to training on separate
per-point forwards, whatever the number of worker threads; early stopping stops a decoder that has
nothing left to learn and leaves one that still improves.
"""

import pytest
import torch
from torch import nn

from enclaveml.assess.config import AssessConfig
from enclaveml.assess.decoder_training import Plateau, WSDSchedule, split_validation, train_decoders
from enclaveml.assess.forward import PointForward
from enclaveml.models import zoo
from enclaveml.models.layers import LayeredModel


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: why one thread


def _darknet():
    torch.manual_seed(0)
    m = zoo.load("darknet", pretrained=False).eval()
    return m.to(memory_format=torch.channels_last)


def test_one_forward_gives_every_points_ir_bit_identical_to_its_frontnet():
    m = _darknet()
    ks = [p.index for p in m.partition_points()]
    x = torch.randn(5, *m.input_shape)
    irs, logits = PointForward(m, ks)(x, logits=True)
    assert sorted(irs) == ks
    with torch.no_grad():
        for k in ks:
            assert torch.equal(irs[k], m.split(k)[0](x)), k
        assert torch.equal(logits, m(x))
    part, _ = PointForward(m, ks)(x, upto=4)  # a pass cut at the deepest consumer still training
    assert sorted(part) == [k for k in ks if k <= 4] and torch.equal(part[4], irs[4])


class _SplitOnly(nn.Module):
    """A model that can be split but has no `run`: the per-FrontNet fallback."""

    def __init__(self, inner: LayeredModel):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)

    def split(self, k):
        return self.inner.split(k)


def test_fallback_without_run_gives_the_same_irs():
    m = _darknet()
    x = torch.randn(3, *m.input_shape)
    a, la = PointForward(m, [2, 7])(x, logits=True)
    b, lb = PointForward(_SplitOnly(m), [2, 7])(x, logits=True)
    assert all(torch.equal(a[k], b[k]) for k in (2, 7)) and torch.equal(la, lb)
    with pytest.raises(ValueError):
        PointForward(m, [])


def _params(decoders):
    return {k: [p.detach().clone() for p in d.parameters()] for k, d in decoders.items()}


def test_shared_forward_training_equals_separate_forwards_and_is_thread_independent():
    m = _darknet()
    ks = [1, 4, 10]
    x = torch.rand(80, *m.input_shape)  # 8 validation + 72 training images: 4 minibatches an epoch
    fwd = PointForward(m, ks)
    fronts = {k: m.split(k)[0] for k in ks}
    shapes = {k: tuple(p.out_shape) for p in m.partition_points() for k in ks if p.index == k}

    def separate(idx, upto):
        with torch.no_grad():
            return {k: fronts[k](x[idx]) for k in ks if k <= upto}

    kw = dict(steps=6, batch=16, lr=2e-3, seed=3, chunk=32)
    shared = train_decoders(lambda idx, upto: fwd(x[idx], upto=upto)[0], x, shapes, workers=1, **kw)
    alone = train_decoders(separate, x, shapes, workers=1, **kw)
    threaded = train_decoders(lambda idx, upto: fwd(x[idx], upto=upto)[0], x, shapes, workers=2, **kw)
    a, b, c = _params(shared.decoders), _params(alone.decoders), _params(threaded.decoders)
    for k in ks:
        assert all(torch.equal(p, q) for p, q in zip(a[k], b[k])), k
        assert all(torch.equal(p, q) for p, q in zip(a[k], c[k])), k
    assert all(shared.info[k]["steps"] == 6 for k in ks)
    assert shared.chunks == 3  # 2 chunks of 32 (4 steps), then 1 more (2 steps): one model pass per chunk


def test_schedule_warmup_stable_decay_and_early_decay():
    s = WSDSchedule(100)
    assert (s.warmup, s.decay, s.end) == (15, 20, 100)
    assert s.factor(0) == pytest.approx(1 / 25) and s.factor(15) == 1.0 and s.factor(79) == 1.0
    assert s.factor(80) == 1.0 and s.factor(90) == pytest.approx(0.5) and not s.done(99) and s.done(100)
    s.begin_decay(40)
    assert s.end == 60 and s.factor(50) == pytest.approx(0.5) and s.done(60)
    s.begin_decay(45)  # the first plateau wins
    assert s.end == 60
    late = WSDSchedule(100)
    late.begin_decay(95)  # a plateau after the budget's own decay began changes nothing
    assert late.end == 100
    with pytest.raises(ValueError):
        WSDSchedule(0)


def test_plateau_rule():
    p = Plateau(patience=2, min_delta=0.01)
    assert [p.update(v) for v in (1.0, 0.5, 0.3, 0.299, 0.2985)] == [False, False, False, False, True]
    q = Plateau(patience=2, min_delta=0.01)
    assert [q.update(v) for v in (1.0, 0.995, 0.9)] == [False, False, False]  # improvement resets the count
    with pytest.raises(FloatingPointError):
        q.update(float("nan"))


def test_validation_split_is_disjoint_and_absent_for_tiny_sets():
    g = torch.Generator().manual_seed(0)
    tr, va, has = split_validation(1000, g)
    assert has and va.numel() == 100 and tr.numel() == 900 and not set(tr.tolist()) & set(va.tolist())
    tr, va, has = split_validation(50, g)
    assert not has and tr.numel() == 50


def test_early_stop_stops_a_decoder_with_nothing_to_learn():
    """IR = the image (learnable) beside IR = noise independent of the image (only the mean is learnable)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(400, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(base, size=(8, 8), mode="bilinear", align_corners=False)
    noise = torch.randn(400, 4, 8, 8, generator=g)
    source = lambda idx, upto: {1: x[idx], 2: noise[idx]}  # noqa: E731
    shapes = {1: (3, 8, 8), 2: (4, 8, 8)}
    kw = dict(steps=300, batch=16, lr=2e-3, seed=0, check_every=10)
    res = train_decoders(source, x, shapes, early_stop=True, **kw)
    full = train_decoders(source, x, shapes, early_stop=False, **kw)
    assert res.info[2]["stopped_early"] and res.info[2]["steps"] < 200, res.info[2]
    assert res.info[1]["steps"] > res.info[2]["steps"]
    assert all(full.info[k]["steps"] == 300 and not full.info[k]["stopped_early"] for k in shapes)
    # stopping early did not cost the learnable decoder its quality
    assert res.info[1]["val_mse"] < 1.5 * full.info[1]["val_mse"]
    assert res.info[1]["val_mse"] < 0.5 * res.info[2]["val_mse"]


def test_bfloat16_decoder_training_keeps_float32_state_and_learns_as_well():
    """bfloat16 autocast changes the arithmetic of the decoder's convolutions (the result differs from
    float32 training), not what it learns: the same validation MSE within a few percent, float32
    weights and Adam moments, a finite loss from the first step."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(120, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(base, size=(8, 8), mode="bilinear", align_corners=False)
    source = lambda idx, upto: {1: x[idx] * 2 - 1}  # noqa: E731  (IR: the image, affinely mapped)
    kw = dict(steps=40, batch=16, lr=4e-3, seed=0, early_stop=False, width=64, ssim_weight=0.05)
    f32 = train_decoders(source, x, {1: (3, 8, 8)}, **kw)
    b16 = train_decoders(source, x, {1: (3, 8, 8)}, bf16=True, **kw)
    assert f32.info[1]["precision"] == "float32" and b16.info[1]["precision"] == "bfloat16 autocast"
    pf, pb = list(f32.decoders[1].parameters()), list(b16.decoders[1].parameters())
    assert all(p.dtype == torch.float32 for p in pb)
    assert not all(torch.equal(p, q) for p, q in zip(pf, pb))  # bfloat16 really ran
    mf, mb = f32.info[1]["val_mse"], b16.info[1]["val_mse"]
    assert torch.isfinite(torch.tensor(mb)) and abs(mb - mf) < 0.1 * mf + 1e-4, (mf, mb)
    dec = train_decoders(source, x, {1: (3, 8, 8)}, **{**kw, "steps": 1}).decoders[1]
    with torch.no_grad():  # one decoder's output in both precisions: equal to bfloat16 rounding
        ir = source(torch.arange(16), 1)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = dec(ir)
        y32 = dec(ir)
    # the image comes back float32 (decoder_net._SigmoidImage) but holds the bfloat16 sigmoid's values
    assert y16.dtype == torch.float32 and torch.equal(y16, y16.bfloat16().float())
    assert 0 < float((y16 - y32).abs().max()) < 0.02


def test_the_oracle_copy_is_the_same_function_and_leaves_the_model_alone():
    from enclaveml.assess.inference import folded

    m = _darknet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fast = folded(m, m.input_shape)
    assert fast is not m and not any(isinstance(x, torch.nn.BatchNorm2d) for x in fast.modules())
    x = torch.randn(4, *m.input_shape)
    with torch.no_grad():
        assert torch.allclose(fast(x), m(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # the original keeps its layers

    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return x * 2 if float(x.sum()) > 0 else x  # data-dependent control flow: fx cannot trace it

    u = Untraceable()
    assert folded(u, (3, 4, 4)) is u


def test_rmle_stops_once_converged():
    from enclaveml.assess.rmle import converged, reconstruct
    from enclaveml.data.preprocess import Preprocessing

    assert not converged([5.0, 4.0], 2, 0.01) and converged([5.0, 1.0, 0.999, 0.995], 2, 0.01)
    assert not converged([5.0, 1.0, 0.9, 0.8], 2, 0.01)
    pre = Preprocessing(size=(8, 8), mean=(0.0,) * 3, std=(1.0,) * 3)
    target = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    front = torch.nn.AvgPool2d(2)  # an easy IR to match: the search converges well before the budget
    # the TV prior gives the objective a floor, which the search reaches well before the budget
    recon, steps = reconstruct(front, pre, front(target), (3, 8, 8), 500, 0.05, 0.02, window=30)
    full, all_steps = reconstruct(front, pre, front(target), (3, 8, 8), 500, 0.05, 0.02, window=0)
    assert steps < 300 and all_steps == 500
    err = lambda r: float((r - target).abs().mean())  # noqa: E731
    assert err(recon) < 0.9 * float((0.5 - target).abs().mean())  # better than the grey start
    assert err(recon) < err(full) + 0.02  # and about as good as the whole budget


def test_batched_rmle_is_each_points_own_search():
    """All points' searches in one staircase batch give each point's own search (to float rounding)."""
    from enclaveml.assess.inference import folded, folded_layers
    from enclaveml.assess.rmle import point_groups, reconstruct, reconstruct_points

    m = _darknet()
    pre = zoo.entry("darknet").preprocessing
    x = torch.rand(3, *m.input_shape, generator=torch.Generator().manual_seed(0))
    fast = folded_layers(m, m.input_shape)
    with torch.no_grad():
        assert torch.allclose(fast(pre.normalise(x)), m(pre.normalise(x)), rtol=1e-4, atol=1e-4)
        targets = {k: m.split(k)[0](pre.normalise(x)) for k in (1, 4, 10)}
    together = reconstruct_points(fast, pre, targets, m.input_shape, 12, 0.05, 0.02)
    for k, t in targets.items():
        alone, steps = reconstruct(folded(m.split(k)[0], m.input_shape), pre, t, m.input_shape, 12, 0.05, 0.02)
        assert together[k][1] == steps == 12
        assert torch.allclose(together[k][0], alone, atol=1e-4), k
    # a point that converges leaves the batch with its images; the others go on as they would alone
    early = reconstruct_points(fast, pre, targets, m.input_shape, 40, 0.05, 0.02, window=4, min_delta=0.2)
    steps = {}
    for k, t in targets.items():
        alone, steps[k] = reconstruct(folded(m.split(k)[0], m.input_shape), pre, t, m.input_shape, 40, 0.05, 0.02,
                                      window=4, min_delta=0.2)
        diff = float((early[k][0] - alone).abs().max())
        assert early[k][1] == steps[k] and diff < 1e-2, (k, early[k][1], steps[k], diff)  # Adam amplifies rounding
    assert len(set(steps.values())) > 1 and min(steps.values()) < 40, steps  # they left at different steps
    assert point_groups([1, 2, 3], 8, 224 * 224) == [[1, 2], [3]] and point_groups([1, 2], 8, 1024) == [[1, 2]]
    # a budget per point: each point searches exactly as it would alone with its own budget
    budgeted = reconstruct_points(fast, pre, targets, m.input_shape, {1: 12, 4: 5, 10: 8}, 0.05, 0.02)
    for k, n in ((4, 5), (10, 8)):
        alone, steps = reconstruct(folded(m.split(k)[0], m.input_shape), pre, targets[k], m.input_shape, n, 0.05, 0.02)
        assert budgeted[k][1] == steps == n and torch.allclose(budgeted[k][0], alone, atol=1e-4), k
    assert budgeted[1][1] == 12 and torch.allclose(budgeted[1][0], together[1][0], atol=1e-5)
    # bfloat16 passes: other arithmetic (not the float32 images), the same search (as close a fit)
    low = reconstruct_points(fast, pre, targets, m.input_shape, 12, 0.05, 0.02, bf16=True)
    with torch.no_grad():
        for k, t in targets.items():
            fit = {name: float((m.split(k)[0](pre.normalise(r[k][0])) - t).pow(2).mean() / t.pow(2).mean())
                   for name, r in (("float32", together), ("bfloat16", low))}
            assert not torch.equal(low[k][0], together[k][0]) and low[k][1] == 12, k
            assert fit["bfloat16"] < 1.1 * fit["float32"] + 1e-4, (k, fit)


def _toy_oracle(noise: float):
    """A fixed nonlinear 'model' of grey images; its low-precision answers are off by up to `noise` logits."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 10, generator=g)

    def oracle(grey, low):
        feats = torch.nn.functional.adaptive_avg_pool2d(grey, 8).flatten(1)
        logits = (feats - 0.5) @ w * 3
        if low:  # a deterministic error, as large as `noise`
            logits = logits + noise * torch.sin(1e3 * logits)
        return torch.softmax(logits, -1)
    return oracle


def test_kl_screen_keeps_every_minimum_exact_and_computes_few_images_in_float32():
    from enclaveml.assess.kl_screen import channel_kl

    g = torch.Generator().manual_seed(0)
    ir = torch.randn(6, 40, 4, 4, generator=g)
    ir[2, 5] = 1.0  # a blank channel
    p = torch.softmax(torch.randn(6, 10, generator=g) * 2, -1)
    for noise in (0.01, 0.5):  # small error: a narrow margin; large error: the margin must grow to stay exact
        oracle = _toy_oracle(noise)
        blank_q = oracle(torch.zeros(1, 1, 16, 16), False)[0]
        own, ctl, how, _ = channel_kl(oracle, ir, p, blank_q, (16, 16), 50, screen=False)
        own_s, ctl_s, how_s, _ = channel_kl(oracle, ir, p, blank_q, (16, 16), 50, screen=True, margin=0.01)
        assert torch.allclose(own_s.min(1).values, own.min(1).values, atol=1e-6), noise
        assert torch.allclose(ctl_s.min(1).values, ctl.min(1).values, atol=1e-6), noise
        assert torch.equal(own_s.argmin(1), own.argmin(1))
        assert how.float32 == how.live == 6 * 40 - 1 and not how.screened
        assert how_s.screened and how_s.margin >= 3 * how_s.max_error > 0
        if noise == 0.01:
            assert how_s.float32 < how_s.live / 2, how_s


def test_affine_copies_found_after_batch_norm_and_mapped_back_exactly():
    from enclaveml.assess.affine import affine_copies, fit_affine

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(-2, 2), bn.bias.uniform_(-1, 1)
    conv = torch.randn(5, 6, 4, 4)
    with torch.no_grad():
        after_bn = bn(conv)
    relu = after_bn.clamp_min(0)
    found = affine_copies({3: conv, 4: after_bn, 5: relu, 6: 2 * relu + 1})
    assert sorted(found) == [4, 6] and found[4].source == 3 and found[6].source == 5
    assert torch.allclose(found[4].to_source(after_bn), conv, atol=1e-4)
    assert fit_affine(conv, torch.randn(5, 6, 4, 4)) is None and fit_affine(conv, conv[:, :3]) is None
    chained = affine_copies({1: conv, 2: after_bn, 3: 3 * after_bn - 2})
    assert chained[3].source == 1 and torch.allclose(chained[3].to_source(3 * after_bn - 2), conv, atol=1e-4)


def test_side_by_side_keeps_order_and_runs_each_item_single_threaded():
    from enclaveml.assess.threads import side_by_side

    torch.set_num_threads(2)
    seen = side_by_side(lambda i: (i, torch.get_num_threads()), range(5), workers=2)
    assert [i for i, _ in seen] == list(range(5)) and all(n == 1 for _, n in seen)
    assert torch.get_num_threads() == 2  # restored
    assert side_by_side(lambda i: torch.get_num_threads(), [0], workers=2) == [2]  # one item: a plain call


def test_shared_cores_run_every_callers_items_on_one_pool_and_charge_each_caller():
    """Tests that run at once send their items to one pool of `workers` single-threaded threads;
    each caller gets its own items' answers in order, and its account holds their CPU time."""
    import threading
    import time as _time

    from enclaveml.assess.threads import Account, charging, shared_cores, side_by_side

    torch.set_num_threads(2)
    workers_seen: set[str] = set()

    def item(i):
        workers_seen.add(threading.current_thread().name)
        t = _time.thread_time()
        while _time.thread_time() - t < 0.002:  # a little CPU time to charge
            pass
        return i, torch.get_num_threads(), side_by_side(lambda j: j + 1, [i, i])  # nested: a plain loop there

    out, accounts = {}, {c: Account() for c in "ab"}

    def caller(c):
        with charging(accounts[c]):
            out[c] = side_by_side(item, range(6), workers=2)

    with shared_cores(2):
        assert torch.get_num_threads() == 1
        threads = [threading.Thread(target=caller, args=(c,)) for c in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torch.get_num_threads() == 2  # restored
    for c in "ab":
        assert out[c] == [(i, 1, [i + 1, i + 1]) for i in range(6)]
        assert accounts[c].items_cpu >= 6 * 0.002
    assert len(workers_seen) <= 2 and all(n.startswith("assess-core") for n in workers_seen)
    with shared_cores(2), shared_cores(2):  # a second block (another assessment) shares the pool
        assert side_by_side(lambda i: threading.current_thread().name, [0, 1])[0].startswith("assess-core")
    assert side_by_side(lambda i: threading.current_thread().name, [0], workers=1) == [threading.current_thread().name]


def test_shared_cores_take_lower_priority_items_first():
    import threading

    from enclaveml.assess.threads import Account, charging, shared_cores, side_by_side

    gate, started, ran = threading.Event(), threading.Event(), []

    def blocker(_):
        started.set()
        gate.wait(5)

    def caller(name, priority, n):
        with charging(Account(priority)):
            side_by_side(lambda i: ran.append((name, i)), range(n), workers=1)

    with shared_cores(1):
        first = threading.Thread(target=lambda: side_by_side(blocker, [0], workers=1))
        first.start()
        started.wait(5)  # the one worker is busy: what follows queues up
        late = threading.Thread(target=caller, args=("kl", 1, 3))
        late.start()
        _wait_queued(3)
        early = threading.Thread(target=caller, args=("decoder", 0, 2))
        early.start()
        _wait_queued(5)
        gate.set()
        for t in (first, late, early):
            t.join()
    assert ran == [("decoder", 0), ("decoder", 1), ("kl", 0), ("kl", 1), ("kl", 2)]


def _wait_queued(n: int) -> None:
    """Until `n` items wait in the shared pool's queue (at most 5 s)."""
    import time as _time

    from enclaveml.assess import threads

    end = _time.monotonic() + 5
    while threads._shared._queue.qsize() < n and _time.monotonic() < end:
        _time.sleep(0.001)


def test_balanced_batches_and_point_sets():
    from enclaveml.assess.kl_screen import balanced_batch
    from enclaveml.assess.rmle import balanced_sets

    assert balanced_batch(2048, 512, 2) == 512 and balanced_batch(1500, 512, 2) == 375
    assert balanced_batch(10, 512, 2) == 5 and balanced_batch(1000, 512, 1) == 500 and balanced_batch(0, 512, 2) == 512
    for n, b, w in [(777, 100, 2), (4097, 512, 3), (10, 512, 3)]:
        per = balanced_batch(n, b, w)
        assert 1 <= per <= b and -(-n // per) % w == 0, (n, b, w, per)  # no worker idles on the last round
    sets = balanced_sets({1: 1.0, 2: 1.0, 3: 10.0, 4: 10.0, 5: 20.0}, 2)
    assert sorted(k for s in sets for k in s) == [1, 2, 3, 4, 5] and all(s == sorted(s) for s in sets)
    loads = sorted(sum({1: 1.0, 2: 1.0, 3: 10.0, 4: 10.0, 5: 20.0}[k] for k in s) for s in sets)
    assert loads == [21.0, 21.0]
    assert balanced_sets({3: 1.0}, 2) == [[3]]


def test_kl_and_rmle_side_by_side_give_the_answers_of_one_worker():
    """Spreading the oracle's batches or the points' searches over two workers changes nothing."""
    from enclaveml.assess.inference import folded_layers
    from enclaveml.assess.kl_screen import channel_kl
    from enclaveml.assess.rmle import balanced_sets, frontnet_flops, reconstruct_points

    m = _darknet()
    pre = zoo.entry("darknet").preprocessing
    fast = folded_layers(m, m.input_shape)
    x = torch.rand(4, *m.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(m(pre.normalise(x)), -1)
        ir = m.split(3)[0](pre.normalise(x))

    def oracle(g, low):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            return torch.softmax(fast(pre.normalise(g.expand(-1, 3, -1, -1))).float(), -1)

    blank_q = oracle(torch.zeros(1, 1, 32, 32), False)[0]
    one = channel_kl(oracle, ir, p, blank_q, (32, 32), 40, True, workers=1)
    two = channel_kl(oracle, ir, p, blank_q, (32, 32), 40, True, workers=2)
    assert torch.allclose(one[0], two[0], atol=1e-6) and torch.allclose(one[1], two[1], atol=1e-6)
    assert torch.equal(one[0].argmin(1), two[0].argmin(1)) and one[2].float32 == two[2].float32
    ks = [1, 4, 8, 10]
    with torch.no_grad():
        targets = {k: m.split(k)[0](pre.normalise(x)) for k in ks}
    together = reconstruct_points(fast, pre, targets, m.input_shape, 5, 0.05, 0.02)
    flops = frontnet_flops(fast, ks, m.input_shape)
    assert [flops[k] for k in ks] == sorted(flops[k] for k in ks) and flops[1] > 0
    for s in balanced_sets(flops, 2):
        apart = reconstruct_points(fast, pre, {k: targets[k] for k in s}, m.input_shape, 5, 0.05, 0.02)
        for k in s:
            assert torch.allclose(apart[k][0], together[k][0], atol=1e-5), k


def test_the_fold_reaches_conv_subclasses_and_branches_on_default_arguments():
    """TensorFlow-style 'same'-padding convolutions (nn.Conv2d subclasses, as EfficientNet ports write
    them) and a forward that branches on an optional argument: torch.fx's own `fuse` folds nothing
    there; this fold removes every batch norm and every pad, and keeps the function."""
    from torch import nn

    from enclaveml.assess.inference import folded

    class SameConv(nn.Conv2d):
        def __init__(self, cin, cout, k, stride=1, groups=1):
            super().__init__(cin, cout, k, stride, groups=groups, bias=False)
            total = k - stride  # 'same' for an even input side
            self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

        def forward(self, x):
            return nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, 1, self.groups)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = SameConv(8, 8, 3), nn.BatchNorm2d(8)
            self.down, self.bn2 = SameConv(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8)  # asymmetric pad

        def forward(self, x, drop_rate=None):
            y = torch.relu(self.bn(self.conv(x)))
            if drop_rate:  # a branch on an optional argument: traced at its default
                y = nn.functional.dropout(y, drop_rate)
            return self.bn2(self.down(y + x))

    torch.manual_seed(0)
    block = Block().eval()
    for bn in (block.bn, block.bn2):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    fast = folded(block, (8, 12, 12))
    assert fast is not block and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    # both plain: the asymmetric pad (0, 1) as a symmetric pad of 1 with a zero first row and column of taps
    assert [type(m).__name__ for m in convs] == ["Conv2d", "Conv2d"]
    assert sorted((m.kernel_size, m.padding) for m in convs) == [((3, 3), (1, 1)), ((4, 4), (1, 1))]
    x = torch.randn(3, 8, 12, 12)
    with torch.no_grad():
        assert torch.allclose(fast(x), block(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in block.modules())  # the original is untouched


def test_a_training_set_of_one_chunk_is_passed_through_the_model_once():
    """4 held-out ImageNet photos, 200 steps: the IRs once, not 200 model passes over the same images;
    the decoders are those of the streamed training (same minibatches, same IRs)."""
    m = _darknet()
    ks = [2, 7]
    x = torch.rand(24, *m.input_shape)  # < 80 images: no validation split, all train
    fwd = PointForward(m, ks)
    shapes = {k: tuple(p.out_shape) for p in m.partition_points() for k in ks if p.index == k}
    calls = []

    def counted(idx, upto):
        calls.append(idx.numel())
        return fwd(x[idx], upto=upto)[0]

    kw = dict(steps=9, batch=8, lr=2e-3, seed=1, early_stop=False)
    once = train_decoders(counted, x, shapes, workers=1, chunk=32, **kw)
    assert sum(calls) == 24 and once.chunks == 3  # one pass over the 24 images, 3 epochs of 3 minibatches
    calls.clear()
    streamed = train_decoders(counted, x, shapes, workers=1, chunk=8, **kw)  # chunks smaller than the set
    assert sum(calls) == 24 * 4  # the validation pass, then every epoch again
    a, b = _params(once.decoders), _params(streamed.decoders)
    for k in ks:
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a[k], b[k])), k


def test_rmle_step_budgets_keep_small_frontnets_whole():
    """Step budgets per point: every step up to rmle_full_flops, then the same compute, at least the floor."""
    from enclaveml.assess.rmle import step_budgets

    cfg = AssessConfig()
    darknet = {1: 1.8e6, 10: 67.8e6, 12: 77.3e6}  # every darknet and cnn26 FrontNet is below 1e8 FLOPs
    assert step_budgets(darknet, cfg.rmle_steps, cfg.rmle_full_flops, cfg.rmle_min_steps) == {1: 150, 10: 150, 12: 150}
    lite0 = {1: 22e6, 3: 100e6, 4: 152e6, 5: 188e6, 18: 768e6}
    assert step_budgets(lite0, 150, 1e8, 50) == {1: 150, 3: 150, 4: 99, 5: 80, 18: 50}
    assert step_budgets(lite0, 30, 1e8, 50) == {1: 30, 3: 30, 4: 30, 5: 30, 18: 30}  # never above --rmle-steps



def test_kl_screen_margin_counts_only_overestimates_near_the_minima():
    """What can hide a minimum: a bfloat16 overestimate near it; not the minimum's own underestimate, nor far errors."""
    from enclaveml.assess.kl_screen import _max_error

    own = torch.tensor([[1.0, 1.2, 1.3, 5.0]])  # float32 KLs of one row's four channel images
    own16 = torch.tensor([[0.0, 1.25, 1.6, 8.0]])  # bfloat16: min underestimated by 1, 0.05 and 0.3 over, far 3 over
    fresh = torch.ones(1, 4, dtype=torch.bool)
    anchor = torch.tensor([[True, False, False, False]])
    exact = fresh.clone()
    ctl, ctl16 = own.clone(), own.clone()  # the control agrees in both precisions
    assert abs(_max_error(own, ctl, own16, ctl16, fresh, anchor, exact, 1.0) - 0.3) < 1e-6
    assert abs(_max_error(own, ctl, own16, ctl16, fresh, anchor, exact, 0.3) - 0.05) < 1e-6  # 1.6 is outside
    assert abs(_max_error(own, ctl, own16, ctl16, fresh, anchor, exact, 10.0) - 3.0) < 1e-6
    # far above the minimum, an overestimate counts only when it is large against its distance (1.5 e >= d)
    from enclaveml.assess.kl_screen import _widest_violation

    m = own.min(1, keepdim=True).values
    assert _widest_violation(own, ctl, own16, ctl16, fresh, m, m) == 0.0  # 3 over at 7 above: harmless
    own16_far = torch.tensor([[0.0, 1.25, 1.6, 4.0]])  # 5.0 read as 4.0: an underestimate, harmless too
    assert _widest_violation(own, ctl, own16_far, ctl16, fresh, m, m) == 0.0
    own16_bad = torch.tensor([[0.0, 1.25, 1.6, 13.0]])  # 8 over at 12 above the minimum: the band must reach 12
    assert abs(_widest_violation(own, ctl, own16_bad, ctl16, fresh, m, m) - 12.0) < 1e-6


def test_a_caller_that_finds_the_pool_as_it_shuts_down_runs_its_items_itself():
    """A caller holding the pool just as the last `shared_cores` block ends must not queue items
    that no worker will take (its call would hang): a closed pool runs them in the caller; and
    the intra-op thread count is restored only when the last of two overlapping blocks ends."""
    from enclaveml.assess import threads

    pool = threads._CorePool(2)
    assert pool.map(lambda x: x * 2, [1, 2, 3], 0) == [2, 4, 6]
    pool.shutdown()
    assert pool.map(lambda x: x + 1, [1, 2], 0) == [2, 3]  # returns at once, in order
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = threads.shared_cores(2), threads.shared_cores(2)
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)  # the first block ends while the second still runs
        assert torch.get_num_threads() == 1
        b.__exit__(None, None, None)
        assert torch.get_num_threads() == 2 and threads._shared is None
    finally:
        torch.set_num_threads(before)
