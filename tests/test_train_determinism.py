"""CalTrain runs are reproducible: the same owner, model, split, config and data in the same enclave
give the same secret class permutation and so the same training, bit for bit.

Why it matters: the secret permutation reorders the BackNet classifier's rows and the dL/dIR sum
over classes; two permutations give float32 results that differ in the last bit (~1e-8 at step 0),
and training amplifies that (0.61 max weight difference after 24 steps of `darknet:width=4` when
each run drew a fresh permutation; docs/caltrain.md). Also: the enclave's cached epoch order
belongs to one run (seed and data set), never to the next.
"""

from __future__ import annotations


import pytest
import torch

from enclaveml.crypto import SigningKey, seal_owner_command
from enclaveml.tee.sim import SimBackend
from enclaveml.train.enclave import START, CalTrainEnclave, enclave_config
from enclaveml.train.instances import make_upload
from enclaveml.train.partitioned import HostTrainer, TrainConfig
from enclaveml.train.spec import ModelSpec
from image_helpers import random_png

SPEC = "darknet:width=4"
OWNER = SigningKey.generate()


@pytest.fixture()
def enc(tmp_path):
    torch.set_num_threads(1)
    be = SimBackend(enclave_config(OWNER.public_key()), platform_dir=tmp_path / "platform", lock_memory=False)
    e = CalTrainEnclave(be)
    e._participant = SigningKey.generate()
    _add(e, range(20))
    return e


def _add(e: CalTrainEnclave, seeds, reset: bool = False) -> None:
    res = e.ingest([make_upload(e.hpke.public_bytes(), e._participant, random_png(i), i % 10, plan=e.plan_hash)[1] for i in seeds],
                   ModelSpec.parse(SPEC))
    e.add_data([(r["tag"], r["sealed"]) for r in res], reset=reset)


_nonce = iter(range(10**6))


def _start(e: CalTrainEnclave, cfg: TrainConfig, run_id: str = "r"):
    n = f"nonce-{next(_nonce):010d}".encode()
    cmd = seal_owner_command(OWNER, e.hpke.public_bytes(), START, run_id, n,
                             {"model": SPEC, "split": 4, "plan": e.plan_hash.hex(), "config": cfg.to_dict()})
    return e.start(cmd, None)


def _train(e: CalTrainEnclave, cfg: TrainConfig, run_id: str) -> list[tuple[torch.Tensor, ...]]:
    """A whole run as the training host drives it; every tensor that crosses the channel."""
    from safetensors.torch import load

    info, back_state = _start(e, cfg, run_id)
    _, back = ModelSpec.parse(SPEC).build().split(4)
    back.load_state_dict(load(back_state))
    host = HostTrainer(back, cfg, info["total_steps"])
    seen = []
    for step in range(info["total_steps"]):
        ir = e.forward(step)
        scores = host.forward(ir)
        grad = e.loss_grad(scores)
        d_ir = host.backward(grad)
        e.backward(d_ir)
        seen.append((ir, scores, grad, d_ir))
    return seen


def test_same_configuration_same_permutation_same_training(enc):
    cfg = TrainConfig(epochs=2, batch=8, lr=0.05, seed=1)
    a = _train(enc, cfg, "a")
    perm_a = enc.trainer.mapping.perm.clone()
    b = _train(enc, cfg, "b")  # another run id: the same training
    assert torch.equal(perm_a, enc.trainer.mapping.perm)
    assert not torch.equal(perm_a, torch.arange(10))
    for step, (ta, tb) in enumerate(zip(a, b)):
        for x, y in zip(ta, tb):
            assert torch.equal(x, y), step
    # another seed is another training: (almost surely) another permutation
    perms = set()
    for seed in range(2, 6):
        _start(enc, TrainConfig(epochs=1, batch=8, seed=seed), f"s{seed}")
        perms.add(tuple(enc.trainer.mapping.perm.tolist()))
    assert len(perms) > 1


def test_another_enclave_platform_draws_another_permutation(enc, tmp_path):
    cfg = TrainConfig(epochs=1, batch=8, seed=1)
    _start(enc, cfg)
    p1 = enc.trainer.mapping.perm.clone()
    be = SimBackend(enclave_config(OWNER.public_key()), platform_dir=tmp_path / "other", lock_memory=False)
    other = CalTrainEnclave(be)
    other._participant = enc._participant
    _add(other, range(20))
    perms = {tuple(p1.tolist())}
    for seed in (1, 2, 3):  # the key is secret to each platform: not a function of the config alone
        _start(other, TrainConfig(epochs=1, batch=8, seed=seed))
        _start(enc, TrainConfig(epochs=1, batch=8, seed=seed))
        perms.add(tuple(other.trainer.mapping.perm.tolist()))
        perms.add(tuple(enc.trainer.mapping.perm.tolist()))
    assert len(perms) > 2


def test_epoch_order_is_never_carried_over_to_the_next_run(enc):
    one = TrainConfig(epochs=1, batch=8, seed=1)
    _train(enc, one, "first")  # leaves epoch 0's order of seed 1 behind
    two = TrainConfig(epochs=1, batch=8, seed=2)
    _start(enc, two, "second")
    assert torch.equal(enc._indices(0), two.epoch_order(20, 0)[:8])
    assert not torch.equal(two.epoch_order(20, 0)[:8], one.epoch_order(20, 0)[:8])
    # more data for the next run: its order covers all of it
    _add(enc, range(20, 30))
    _start(enc, one, "third")
    idx = torch.cat([enc._indices(s) for s in range(one.steps_per_epoch(30))])
    assert sorted(idx.tolist()) == list(range(30))


def test_host_cannot_rebuild_the_initial_model_from_the_config_seed(enc):
    """The host gets the config (its seed included) and the BackNet's initial weights. Were the
    model built from `torch.manual_seed(config seed)`, the host could build the same model, match
    the classifier rows to recover the secret class order, and know the FrontNet at step 0."""
    from safetensors.torch import load

    cfg = TrainConfig(epochs=1, batch=8, seed=123)
    info, back_state = _start(enc, cfg)
    secret = load(back_state)
    torch.manual_seed(info["config"]["seed"])
    public = ModelSpec.parse(info["model"]).build()
    rows = public.layers.fc.weight.detach()
    assert not any(bool((rows == row).all(1).any()) for row in secret["fc.weight"])
    public_back = dict(public.split(4)[1].state_dict())
    same = [n for n, t in secret.items() if n in public_back and t.shape == public_back[n].shape
            and t.numel() > 1 and t.dtype.is_floating_point and t.std() > 0 and torch.equal(t, public_back[n])]
    assert same == [], f"BackNet tensors equal to a public-seed build: {same}"
