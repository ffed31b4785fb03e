"""Label leakage to the CalTrain host: the defences' maths, the sealed head, and the attack itself.

The attack (`label_attack.py`) is what a host colluding with one participant runs on the rows the
enclave hands it; the leakage test trains a small model on synthetic class-coloured images and
shows it names every other participant's labels from dL/dscores and from cut-layer gradients, and
falls to near chance under the noise defence.
"""

from __future__ import annotations

import copy

import pytest
import torch

from enclaveml.errors import TamperedMessage, UserInputError
from enclaveml.models import zoo
from enclaveml.models.zoo import darknet
from enclaveml.train.defences import DefenceSpec, batch_mean, class_noise, group_mix, step_generator
from enclaveml.train.label_attack import (CentroidAttack, ColumnNamer, KnnAttack, ProbeAttack, exposed_columns,
                                          recovery)
from enclaveml.models.split import permute_classifier
from enclaveml.train.partitioned import (ClassMapping, EnclaveTrainer, HostTrainer, PlainTrainer, TrainConfig,
                                         check_head, host_layers, partitioned_step, split_with_head)

torch.set_num_threads(1)
PRE = zoo.entry("darknet").preprocessing


def _rows(n=64, d=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g)
    return centres[y] + 0.1 * torch.randn(n, d, generator=g), y


# -- the defences' maths ------------------------------------------------------------------------

def test_noise_keeps_the_batch_sum_and_is_unbiased():
    grad, y = _rows()
    outs = torch.stack([class_noise(grad, y, 2.0, step_generator(5, s)) for s in range(3000)])
    assert torch.allclose(outs[0].sum(0), grad.sum(0), atol=1e-4)  # the batch sum, exactly
    assert not torch.allclose(outs[0], grad, atol=0.1)  # and the rows really move
    noise = outs - grad
    spread = noise.std(0).mean()
    # unbiased: the mean noise over draws shrinks like 1/sqrt(draws) (3.5 sigma bound)
    assert noise.mean(0).abs().max() < 3.5 * spread / 3000 ** 0.5 * 1.5
    assert spread > 1.0


def test_noise_lies_along_the_class_mean_directions_and_classwise_keeps_class_sums():
    grad, y = _rows(d=64)
    out = class_noise(grad, y, 3.0, step_generator(1, 0), classwise=1)
    for c in range(10):
        assert torch.allclose(out[y == c].sum(0), grad[y == c].sum(0), atol=1e-4)
    means = torch.stack([grad[y == c].mean(0) for c in range(10)])
    basis = torch.linalg.qr((means - means.mean(0)).T).Q  # 64 x 10: the class-mean directions
    noise = out - grad
    assert torch.allclose(noise - (noise @ basis) @ basis.T, torch.zeros_like(noise), atol=1e-4)


def test_mix_keeps_the_batch_sum_and_gives_each_group_its_mean():
    grad, y = _rows(n=30)
    out = group_mix(grad, y, 4, step_generator(2, 3))
    assert torch.allclose(out.sum(0), grad.sum(0), atol=1e-4)
    groups = {}
    for i in range(30):
        groups.setdefault(tuple(out[i].tolist()), []).append(i)
    assert sorted(len(v) for v in groups.values()) == [2] + [4] * 7  # 30 = 7 groups of 4 + one of 2
    for members in groups.values():
        assert torch.allclose(out[members[0]], grad[members].mean(0), atol=1e-5)


def test_no_row_leaves_undefended_in_small_groups_or_classes():
    grad, y = _rows(n=9)
    out = group_mix(grad, y, 4, step_generator(0, 0))  # 9 = 4 + 5, not 4 + 4 + 1
    assert all(not torch.allclose(out[i], grad[i]) for i in range(9))
    y = torch.tensor([0, 0, 0, 0, 1, 2, 2, 1, 1, 3])  # class 3 has one row, class 2 two
    grad = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    out = class_noise(grad, y, 1.0, step_generator(0, 1), classwise=1)
    assert not torch.allclose(out[9], grad[9]) and not torch.allclose(out[5] + out[6], grad[5] + grad[6])
    assert torch.allclose(out[:4].sum(0), grad[:4].sum(0), atol=1e-5)  # class 0 (4 rows): its sum kept


def test_defence_randomness_is_a_function_of_seed_and_step():
    grad, y = _rows()
    a = class_noise(grad, y, 1.0, step_generator(7, 4))
    assert torch.equal(a, class_noise(grad, y, 1.0, step_generator(7, 4)))
    assert not torch.equal(a, class_noise(grad, y, 1.0, step_generator(7, 5)))
    assert not torch.equal(a, class_noise(grad, y, 1.0, step_generator(8, 4)))


def test_defence_specs_parse_and_refuse_bad_input():
    assert DefenceSpec.parse(None).to_dict() == {"name": "none", "settings": {}}
    d = DefenceSpec.parse("noise:scale=1.5")
    assert d.to_dict() == {"name": "noise", "settings": {"classwise": 0, "scale": 1.5}}
    assert DefenceSpec.from_dict(d.to_dict()) == d and DefenceSpec.parse(d.text) == d
    assert DefenceSpec.parse("mix:group=8").settings == {"group": 8}
    for bad in ("bogus", "noise:scale=0", "noise:scale=-1", "noise:power=2", "mix:group=1", "mix:group=2.5",
                "noise:scale=abc", "Noise", "none:scale=1", "noise:scale=1;rm"):
        with pytest.raises(UserInputError):
            DefenceSpec.parse(bad)
    for bad in ({"name": 3}, {"name": "noise", "settings": {"scale": "2"}}, {"name": "noise", "settings": [1]},
                {"name": "noise", "settings": {"scale": True}}, "noise"):
        with pytest.raises(UserInputError):
            DefenceSpec.from_dict(bad)
    with pytest.raises(UserInputError):
        d.apply(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), step_generator(0, 0))


def test_labelfree_gives_every_row_the_batch_mean_and_local_is_parsed_and_kept():
    grad, y = _rows(n=20)
    out = batch_mean(grad, y, step_generator(0, 0))
    assert torch.allclose(out.sum(0), grad.sum(0), atol=1e-4)
    assert all(torch.equal(out[0], out[i]) for i in range(20))  # rows cannot be told apart
    assert DefenceSpec.parse("labelfree").to_dict() == {"name": "labelfree", "settings": {"local": 1}}
    assert DefenceSpec.parse("labelfree").local_front and not DefenceSpec.parse("mix:group=4").local_front
    assert DefenceSpec.parse("mix:group=4,local=1").to_dict() == {"name": "mix", "settings": {"group": 4, "local": 1}}
    assert DefenceSpec.parse("noise:scale=1").to_dict()["settings"] == {"classwise": 0, "scale": 1.0}  # unchanged
    for bad in ("labelfree:local=0", "mix:local=2", "none:local=1", "noise:local=0.5"):
        with pytest.raises(UserInputError):
            DefenceSpec.parse(bad)


def test_knn_and_probe_attacks_name_clustered_rows_and_not_identical_ones():
    grad, y = _rows(n=200, d=32)
    known = torch.arange(200) % 3 == 0  # every class has known rows
    for att in (KnnAttack(10, k=5), KnnAttack(10, k=5, cosine=False), ProbeAttack(10)):
        assert recovery(att.step(grad, known, y[known])[~known], y[~known]) > 0.95
    same = grad.mean(0, keepdim=True).expand(200, -1)  # what `labelfree` hands the host
    for att in (KnnAttack(10, k=5), ProbeAttack(10), CentroidAttack(10)):
        guess = att.step(same, known, y[known])[~known]
        assert len(torch.unique(guess)) == 1 and recovery(guess, y[~known]) <= 0.1 + 1e-9


def test_a_secret_rotation_per_batch_does_not_hide_labels():
    """A candidate not offered: rotate each batch's cut-layer rows by a secret orthogonal matrix. Inner
    products within a batch survive, so the colluder's rows of the same batch still name the
    clusters (and the host's update would be wrong in its own coordinates anyway)."""
    grad, y = _rows(n=128, d=64)
    known = torch.arange(128) % 3 == 0
    att = CentroidAttack(10, window=1)  # only this batch's colluder rows: a fresh rotation each step
    for step in range(3):
        q = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(step))).Q
        assert recovery(att.step(grad @ q, known, y[known])[~known], y[~known]) > 0.95


# -- the sealed head ---------------------------------------------------------------------------

def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def test_sealed_head_trains_like_plain_and_the_host_gets_cut_layer_gradients_only():
    torch.manual_seed(0)
    base = darknet.build(width=8)
    plain_model = copy.deepcopy(base)
    cfg = TrainConfig(epochs=1, batch=16, lr=0.05, seed=3)
    x, y = _data(48)
    total = cfg.steps_per_epoch(48)
    mapping = ClassMapping.random(10, torch.Generator().manual_seed(7))
    front, middle, head = split_with_head(base, 5, 2, mapping)
    assert [n for n, _ in middle.named_children()][-1] == "conv7"  # gap and fc are in the enclave
    enc, host = EnclaveTrainer(front, mapping, PRE, cfg, total, head=head), HostTrainer(middle, cfg, total)
    plain = PlainTrainer(plain_model, PRE, cfg, total)
    for _, _, idx in cfg.batches(48):
        out = host.forward(enc.forward(x[idx], y[idx]))
        grad = enc.loss_grad(out)
        assert grad.shape == out.shape == (len(idx), 128, 2, 2)  # never (B, classes)
        enc.backward(host.backward(grad))
        plain.train_step(x[idx], y[idx])
        assert abs(enc.last_loss - float(torch.nn.functional.cross_entropy(
            torch.zeros(1, 10), torch.zeros(1, dtype=torch.long)))) < 5  # a real loss
    permute_classifier(base, mapping, inverse=True)
    for (n1, p1), (_, p2) in zip(base.state_dict().items(), plain_model.state_dict().items()):
        assert torch.allclose(p1.float(), p2.float(), atol=1e-5), n1
    assert list(dict(host_layers(darknet.build(width=8), 5, 2).named_children())) == ["conv4", "pool3", "conv5",
                                                                                       "conv6", "pool4", "conv7"]
    for bad in (-1, 8, True, "1"):
        with pytest.raises(UserInputError):
            check_head(base, 5, bad)


# -- the attack, and the defence against it ------------------------------------------------------

def _coloured(n: int, seed: int):
    """Images whose class is a colour tint plus noise: learnable in a few steps by a tiny model."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    tint = torch.rand(10, 3, 1, 1, generator=g) * 200
    x = tint[y] + torch.rand(n, 3, 32, 32, generator=g) * 55
    return x.clamp(0, 255).to(torch.uint8), y


def _leak(head: int, defence: str, channel: str = "gradient", attack: type = CentroidAttack) -> float:
    torch.manual_seed(0)
    model = darknet.build(width=4)
    x, y = _coloured(320, 1)
    owner = torch.randperm(320, generator=torch.Generator().manual_seed(2)) % 4  # participant 0 colludes
    cfg = TrainConfig(epochs=3, batch=32, lr=0.05, seed=0, augment=False)
    mapping = ClassMapping.random(10, torch.Generator().manual_seed(9))
    front, back, head_mod = split_with_head(model, 5, head, mapping)
    total = cfg.steps_per_epoch(320) * cfg.epochs
    enc = EnclaveTrainer(front, mapping, PRE, cfg, total, head_mod, DefenceSpec.parse(defence), defence_seed=123,
                         ir_shape=tuple(model.partition_points()[4].out_shape))
    host = HostTrainer(back, cfg, total, objective=DefenceSpec.parse(defence).host_objective())
    namer, attack = ColumnNamer(10), attack(10, window=10)
    guesses, truth = [], []
    for step, _, idx in cfg.batches(320):
        ir = enc.forward(x[idx], y[idx])
        out = host.forward(ir)
        grad = enc.loss_grad(out)
        enc.backward(host.backward(grad))
        known = owner[idx] == 0
        if channel == "ir":  # what the host receives in the forward pass: no gradient defence touches it
            guesses.append(attack.step(ir, known, y[idx][known])[~known])
        elif head == 0 and defence == "none":
            cols = exposed_columns(out, grad)
            namer.observe(cols[known], y[idx][known])
            guesses.append(cols[~known])  # named at the end, when every column has votes
        else:
            guesses.append(attack.step(grad, known, y[idx][known])[~known])
        truth.append(y[idx][~known])
    guess = torch.cat(guesses)
    if head == 0 and defence == "none" and channel == "gradient":
        guess = namer.name(guess)
    return recovery(guess, torch.cat(truth))


def test_colluding_host_names_labels_when_exposed_and_from_the_cut_layer_but_not_under_noise():
    assert _leak(0, "none") == 1.0  # dL/dscores: every label, exactly
    assert _leak(1, "none") > 0.9  # sealed head: cut-layer gradients still cluster by class
    assert _leak(1, "noise:scale=4") < 0.2  # chance is 0.1


def test_labelfree_leaves_no_label_in_the_gradient_for_any_attack():
    assert _leak(1, "none", attack=KnnAttack) > 0.5 and _leak(1, "none", attack=ProbeAttack) > 0.5  # both read it
    for attack in (CentroidAttack, KnnAttack, ProbeAttack):
        assert _leak(1, "labelfree", attack=attack) < 0.2  # chance is 0.1


def test_selfsup_leaves_no_label_in_the_gradient_for_any_attack():
    for attack in (CentroidAttack, KnnAttack, ProbeAttack):
        assert _leak(1, "selfsup", attack=attack) < 0.2  # chance is 0.1


def test_selfsup_rows_and_the_hosts_own_loss_do_not_depend_on_any_instances_label():
    """What the host learns from under `selfsup`: rows that are one vector per batch (whatever
    instance has whatever label, as long as the batch's class mix is the same) and a loss of its
    own inputs and outputs only; and the host's layers really move by that loss."""
    torch.manual_seed(0)
    model = darknet.build(width=4)
    mapping = ClassMapping.random(10, torch.Generator().manual_seed(1))
    front, back, head = split_with_head(model, 5, 1, mapping)
    cfg = TrainConfig(epochs=1, batch=16, lr=0.05, seed=0, augment=False)
    spec = DefenceSpec.parse("selfsup")
    x, y = _coloured(16, 4)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    rows, updates = [], []
    for labels in (y, y[perm]):  # the same images, the same class mix, labels on other instances
        f, b, h = (copy.deepcopy(m) for m in (front, back, head))
        enc = EnclaveTrainer(f, mapping, PRE, cfg, 1, h, spec, 5, ir_shape=(16, 8, 8))
        host = HostTrainer(b, cfg, 1, objective=spec.host_objective())
        out = host.forward(enc.forward(x, labels))
        grad = enc.loss_grad(out)
        rows.append(grad)
        enc.backward(host.backward(grad))
        updates.append(torch.cat([p.detach().flatten() for p in b.parameters()]))
    assert torch.equal(rows[0], rows[0][:1].expand_as(rows[0]))  # one vector per batch
    assert torch.allclose(rows[0], rows[1], atol=1e-7)  # the same (up to the order of the batch sum)
    assert torch.allclose(updates[0], updates[1], atol=1e-6)  # the host's layers end up the same
    before = torch.cat([p.detach().flatten() for p in back.parameters()])
    zero = HostTrainer(copy.deepcopy(back), cfg, 1, objective=spec.host_objective())
    ir = torch.randn(16, 16, 8, 8)
    zero.backward(torch.zeros_like(zero.forward(ir)))  # no row from the enclave at all: its own loss still trains it
    moved = torch.cat([p.detach().flatten() for p in zero.module.parameters()]) - before
    assert moved.abs().max() > 1e-3
    with pytest.raises(UserInputError):
        DefenceSpec.parse("selfsup:views=3")
    with pytest.raises(UserInputError):
        DefenceSpec.parse("selfsup:local=0")
    assert DefenceSpec.parse("selfsup:weight=0.1,views=1").host_objective().views == 1
    assert DefenceSpec.parse("labelfree").host_objective() is None


def test_host_flops_share_counts_the_hosts_layers():
    from enclaveml.train.costs import host_flops_share, layer_macs

    model = darknet.build(width=16)
    macs = layer_macs(model, (3, 32, 32))
    assert macs[0] == 32 * 32 * 16 * 27 and macs[1] == 0 and macs[-1] == 256 * 10  # conv1, pool1, fc
    assert abs(host_flops_share(model, 5, 1) - sum(macs[5:12]) / sum(macs)) < 1e-12
    assert round(host_flops_share(model, 5, 1), 3) == 0.716 and round(host_flops_share(model, 9, 1), 3) == 0.119
    two = host_flops_share(model, 5, 1, host_passes=2)  # selfsup's second view doubles the host's part
    assert abs(two - 2 * sum(macs[5:12]) / (sum(macs) + sum(macs[5:12]))) < 1e-12


def test_a_local_frontnet_learns_without_the_hosts_gradient():
    """`local=1`: the FrontNet's update is the same whatever dL/dIR the host returns (it learns from
    the enclave's local classifier), it does learn, and the classifier is in the enclave's state."""
    x, y = _coloured(64, 3)

    def run(host_grad):
        torch.manual_seed(0)
        model = darknet.build(width=4)
        cfg = TrainConfig(epochs=4, batch=16, lr=0.05, seed=0, augment=False)
        mapping = ClassMapping.random(10, torch.Generator().manual_seed(1))
        front, back, head_mod = split_with_head(model, 5, 1, mapping)
        enc = EnclaveTrainer(front, mapping, PRE, cfg, 16, head_mod, DefenceSpec.parse("mix:group=4,local=1"), 5,
                             ir_shape=(16, 8, 8))
        host, losses = HostTrainer(back, cfg, 16), []
        for _, _, idx in cfg.batches(64):
            d_ir = host.backward(enc.loss_grad(host.forward(enc.forward(x[idx], y[idx]))))
            losses.append(float(enc._local_loss.detach()))
            enc.backward(host_grad(d_ir))
        return enc, losses

    a, losses = run(lambda d: d)
    b, _ = run(lambda d: torch.randn_like(d) * 100)
    for (n, p), (_, q) in zip(a.front.state_dict().items(), b.front.state_dict().items()):
        assert torch.equal(p, q), n
    assert sum(losses[-4:]) < sum(losses[:4])  # the local classifier's loss falls: the FrontNet learns
    from safetensors.torch import load
    assert any(k.startswith("w.local.") for k in load(a.state_bytes()))
    with pytest.raises(TamperedMessage):
        a.forward(x[:16], y[:16])
        a.backward(torch.zeros(16, 16, 4, 4))  # still checked
    with pytest.raises(UserInputError):  # a local FrontNet needs to know the IR it classifies
        EnclaveTrainer(a.front, ClassMapping.random(10), PRE, TrainConfig(), 1, None, DefenceSpec.parse("labelfree"))


def test_a_gradient_defence_leaves_the_forward_pass_as_it_is():
    """The limit of every gradient defence: the host's own view of the data (here the IR of images
    whose class is their colour) clusters by class, and the colluder's labels name the clusters."""
    assert _leak(1, "noise:scale=4", channel="ir") > 0.3  # 0.425 here; chance 0.1


def _sim_enclave_with_eight_instances(tmp):
    """A sim training enclave holding 8 uploaded instances of one participant, and its owner key."""
    from enclaveml.crypto import SigningKey
    from enclaveml.tee.sim import SimBackend
    from enclaveml.train.enclave import CalTrainEnclave, enclave_config
    from enclaveml.train.instances import make_upload
    from image_helpers import random_png

    owner, part = SigningKey.generate(), SigningKey.generate()
    be = SimBackend(enclave_config(owner.public_key()), platform_dir=tmp, lock_memory=False)
    e = CalTrainEnclave(be)
    res = e.ingest([make_upload(e.hpke.public_bytes(), part, random_png(i), i % 10, plan=e.plan_hash)[1]
                    for i in range(8)])
    e.add_data([(r["tag"], r["sealed"]) for r in res])
    return e, owner


def test_enclave_checks_head_defence_and_the_host_output_shape_and_keeps_them_in_checkpoints():
    from enclaveml.crypto import seal_owner_command
    from enclaveml.train.enclave import START
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        e, owner = _sim_enclave_with_eight_instances(Path(tmp))
        cfg = TrainConfig(epochs=1, batch=4, seed=0)

        def start(nonce: bytes, **extra):
            return e.start(seal_owner_command(owner, e.hpke.public_bytes(), START, "r", nonce,
                                              {"model": "darknet:width=4", "split": 5, "config": cfg.to_dict(),
                                               "plan": e.plan_hash.hex(), **extra}), None)

        with pytest.raises(UserInputError):
            start(b"nonce-000001", head=8)
        with pytest.raises(UserInputError):
            start(b"nonce-000002", head=1, defence={"name": "bogus"})
        info, _ = start(b"nonce-000003", head=1, defence={"name": "noise", "settings": {"scale": 2}})
        assert info["head"] == 1 and info["defence"] == {"name": "noise", "settings": {"classwise": 0, "scale": 2.0}}
        e.forward(0)
        with pytest.raises(TamperedMessage):
            e.loss_grad(torch.zeros(4, 10))  # scores where the cut-layer features belong
        grad = e.loss_grad(torch.zeros(4, 64))
        assert grad.shape == (4, 64)
        e.backward(torch.zeros(4, 16, 8, 8))
        ckpt = e.checkpoint()
        with pytest.raises(TamperedMessage):  # a resume must use the options the run started with
            e.start(seal_owner_command(owner, e.hpke.public_bytes(), START, "r", b"nonce-000004",
                                       {"model": "darknet:width=4", "split": 5, "config": cfg.to_dict(), "head": 1,
                                        "plan": e.plan_hash.hex(),
                                        "defence": {"name": "mix", "settings": {"group": 2}}}), ckpt)
        info, _ = e.start(seal_owner_command(owner, e.hpke.public_bytes(), START, "r", b"nonce-000005",
                                             {"model": "darknet:width=4", "split": 5, "config": cfg.to_dict(),
                                              "plan": e.plan_hash.hex(), "head": 1,
                                              "defence": {"name": "noise", "settings": {"scale": 2}}}), ckpt)
        assert info["start_step"] == 1 and e.trainer.head is not None


def test_enclave_runs_and_resumes_labelfree_with_its_local_classifier():
    from enclaveml.crypto import seal_owner_command
    from enclaveml.train.enclave import START
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        e, owner = _sim_enclave_with_eight_instances(Path(tmp))
        args = {"model": "darknet:width=4", "split": 5, "config": TrainConfig(epochs=1, batch=4, seed=0).to_dict(),
                "plan": e.plan_hash.hex(), "head": 1, "defence": {"name": "labelfree", "settings": {}}}
        info, _ = e.start(seal_owner_command(owner, e.hpke.public_bytes(), START, "r", b"nonce-000001", args), None)
        assert info["defence"] == {"name": "labelfree", "settings": {"local": 1}}
        e.forward(0)
        grad = e.loss_grad(torch.randn(4, 64))
        assert all(torch.equal(grad[0], grad[i]) for i in range(4))  # one row for the whole batch
        e.backward(torch.zeros(4, 16, 8, 8))
        front = {k: v.clone() for k, v in e.trainer.front.state_dict().items()}
        ckpt = e.checkpoint()
        info, _ = e.start(seal_owner_command(owner, e.hpke.public_bytes(), START, "r", b"nonce-000002", args), ckpt)
        assert info["start_step"] == 1 and e.trainer.local is not None
        assert all(torch.equal(v, e.trainer.front.state_dict()[k]) for k, v in front.items())


class _RecordingHost:
    """A `TrainingHost` that keeps every tensor the enclave worker hands it (what a host sees)."""

    @staticmethod
    def make(store, owner_hex):
        from enclaveml.train.host import TrainingHost

        class Recording(TrainingHost):
            def call(self, op, tensors=None, blobs=None, timeout=600.0, **header):
                h, t, b = super().call(op, tensors, blobs, timeout, **header)
                self.seen.append((op, {k: v.clone() for k, v in (t or {}).items()}, dict(h)))
                return h, t, b

        host = Recording(store, owner=owner_hex)
        host.seen = []
        return host


def test_train_run_with_a_sealed_head_trains_through_the_worker_and_the_host_never_sees_scores(tmp_path):
    """The real system (enclave worker process, channel): `train run --head 1 --defence noise`."""
    import os
    import time

    from enclaveml.crypto import SigningKey, seal_owner_command
    from enclaveml.train.enclave import START
    from enclaveml.train.instances import make_upload
    from image_helpers import random_png

    owner, part = SigningKey.generate(), SigningKey.generate()
    host = _RecordingHost.make(tmp_path / "store", owner.public_key().to_bytes().hex())
    try:
        ev = host.evidence(os.urandom(16).hex())
        pub, plan = bytes.fromhex(ev["public_key"]), bytes.fromhex(ev["plan_hash"])
        res = host.contribute([make_upload(pub, part, random_png(i), i % 10, plan=plan)[1] for i in range(24)])
        assert all(r["status"] == "accepted" for r in res)
        cfg = TrainConfig(epochs=2, batch=8, seed=0)
        cmd = seal_owner_command(owner, pub, START, "sealed", os.urandom(16), {
            "model": "darknet:width=4", "split": 5, "config": cfg.to_dict(), "head": 1, "plan": plan.hex(),
            "defence": DefenceSpec.parse("noise:scale=2").to_dict()})
        st = host.start("sealed", cmd, checkpoint_every=2)
        for _ in range(600):
            st = host.status("sealed")
            if st["state"] != "running":
                break
            time.sleep(0.1)
        assert st["state"] == "done", st
        start = next(h for op, _, h in host.seen if op == "start")
        assert start["head"] == 1 and start["defence"]["name"] == "noise"
        grads = [t["grad"] for op, t, _ in host.seen if op == "loss"]
        assert len(grads) == cfg.steps_per_epoch(24) * cfg.epochs == 6
        assert all(g.shape == (8, 64) for g in grads)  # dL/dfeatures at the cut, never (8, 10) scores
        assert all(t["ir"].shape == (8, 16, 8, 8) for op, t, _ in host.seen if op == "forward")
    finally:
        host.close()


def test_train_run_with_selfsup_trains_through_the_worker_with_one_row_per_batch(tmp_path, monkeypatch):
    """The real system with a thin host: `train run --split 8 --head 3 --defence selfsup`: the
    enclave hands back one vector per batch, and the host runs its own label-free loss."""
    import os
    import time

    from enclaveml.crypto import SigningKey, seal_owner_command
    from enclaveml.train import selfsup
    from enclaveml.train.enclave import START
    from enclaveml.train.instances import make_upload
    from image_helpers import random_png

    calls = []
    real = selfsup.HostObjective.loss
    monkeypatch.setattr(selfsup.HostObjective, "loss", lambda self, *a: calls.append(1) or real(self, *a))
    owner, part = SigningKey.generate(), SigningKey.generate()
    host = _RecordingHost.make(tmp_path / "store", owner.public_key().to_bytes().hex())
    try:
        ev = host.evidence(os.urandom(16).hex())
        pub, plan = bytes.fromhex(ev["public_key"]), bytes.fromhex(ev["plan_hash"])
        res = host.contribute([make_upload(pub, part, random_png(i), i % 10, plan=plan)[1] for i in range(16)])
        assert all(r["status"] == "accepted" for r in res)
        cfg = TrainConfig(epochs=1, batch=8, seed=0)
        cmd = seal_owner_command(owner, pub, START, "thin", os.urandom(16), {
            "model": "darknet:width=4", "split": 8, "config": cfg.to_dict(), "head": 3, "plan": plan.hex(),
            "defence": DefenceSpec.parse("selfsup:weight=0.01").to_dict()})
        st = host.start("thin", cmd, checkpoint_every=2)
        for _ in range(600):
            st = host.status("thin")
            if st["state"] != "running":
                break
            time.sleep(0.1)
        assert st["state"] == "done", st
        start = next(h for op, _, h in host.seen if op == "start")
        assert start["split"] == 8 and start["head"] == 3 and start["defence"]["name"] == "selfsup"
        grads = [t["grad"] for op, t, _ in host.seen if op == "loss"]
        assert len(grads) == 2 and all(g.shape == (8, 32, 2, 2) for g in grads)  # conv6's, after pool4
        assert all(torch.equal(g, g[:1].expand_as(g)) for g in grads)  # one vector per batch
        assert len(calls) == 2  # the host's own loss ran at every step
    finally:
        host.close()


def test_train_run_refuses_bad_head_and_defence_before_contacting_anyone(tmp_path):
    from typer.testing import CliRunner

    from enclaveml.cli import app
    from enclaveml.errors import UserInputError

    base = ["train", "run", "--url", "http://127.0.0.1:9", "--policy", str(tmp_path / "p.toml"), "--model",
            "darknet:width=4", "--split", "5", "--key", str(tmp_path / "owner.key"), "--out", str(tmp_path / "m")]
    for extra, needle in ((["--head", "8"], "--head 8 is out of range"), (["--defence", "bogus"], "unknown defence"),
                          (["--defence", "noise:scale=0"], "out of range")):
        res = CliRunner().invoke(app, base + extra)
        assert res.exit_code != 0
        err = res.exception if isinstance(res.exception, UserInputError) else None
        assert needle in (str(err) if err else res.output), res.output
    assert not (tmp_path / "owner.key").exists()  # refused before the owner key was even created
