"""The CalTrain step pipeline and the end of a run, against the plain sequence they replace.

What changed for speed (docs/caltrain.md, "Where a run's time goes"): the enclave opens,
re-verifies and prepares the next step's batch while the host runs its BackNet; `backward` can
answer the next step's IR in the same round trip; the fingerprint pass goes chunk by chunk and
does not re-check signatures this run already checked. Each must leave the training bit for bit
as it was, and a bad instance must still be refused before any step uses it.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from enclaveml.crypto import SigningKey, open_sealed, seal, seal_owner_command
from enclaveml.errors import TamperedMessage
from enclaveml.tee.sim import SimBackend
from enclaveml.train import instances as inst_mod
from enclaveml.train.enclave import START, CalTrainEnclave, enclave_config
from enclaveml.train.enclave_worker import make_handler
from enclaveml.train.fingerprint import fingerprints
from enclaveml.train.instances import EnclaveDataset, make_upload
from enclaveml.train.partitioned import HostTrainer, TrainConfig
from enclaveml.train.spec import ModelSpec
from image_helpers import random_png

SPEC = "darknet:width=4"
SPLIT = 4
OWNER = SigningKey.generate()
CFG = TrainConfig(epochs=2, batch=8, lr=0.05, seed=3)
_nonce = iter(range(10**6))


@pytest.fixture()
def enc(tmp_path):
    torch.set_num_threads(1)
    be = SimBackend(enclave_config(OWNER.public_key()), platform_dir=tmp_path / "platform", lock_memory=False)
    e = CalTrainEnclave(be)
    part = SigningKey.generate()
    res = e.ingest([make_upload(e.hpke.public_bytes(), part, random_png(i), i % 10, plan=e.plan_hash)[1]
                    for i in range(20)])
    assert all(r["status"] == "accepted" for r in res)
    e._sealed = [(r["tag"], r["sealed"]) for r in res]
    e.add_data(e._sealed)
    return e


def _start(e: CalTrainEnclave, cfg: TrainConfig = CFG, run_id: str = "r"):
    from safetensors.torch import load

    cmd = seal_owner_command(OWNER, e.hpke.public_bytes(), START, run_id, f"nonce-{next(_nonce):010d}".encode(),
                             {"model": SPEC, "split": SPLIT, "plan": e.plan_hash.hex(), "config": cfg.to_dict()})
    info, back_state = e.start(cmd, None)
    _, back = ModelSpec.parse(SPEC).build().split(SPLIT)
    back.load_state_dict(load(back_state))
    return info, HostTrainer(back, cfg, info["total_steps"])


def _bad_signature(e: CalTrainEnclave, tag: str, token: bytes) -> bytes:
    """A token the enclave's data key opens, holding a signature that does not verify (what the
    per-batch re-check exists for: the seal alone must not be trusted)."""
    aad = inst_mod._sealed_aad(e.plan_hash, tag)
    body = bytearray(open_sealed(e._data_key, token, aad))
    sig = 4 + 32 + 32 + 32  # magic, hash, participant id, public key, then the signature
    body[sig] ^= 1
    return seal(e._data_key, bytes(body), aad)


def _train_sequential(e: CalTrainEnclave) -> list[torch.Tensor]:
    """The plain sequence: forward, loss, backward, one op at a time, nothing loaded ahead."""
    e.prefetch = False
    info, host = _start(e)
    seen = []
    for step in range(info["total_steps"]):
        ir = e.forward(step)
        grad = e.loss_grad(host.forward(ir))
        e.backward(host.backward(grad))
        seen += [ir, grad]
    return seen


def _train_pipelined(e: CalTrainEnclave, checkpoint_every: int = 3) -> list[torch.Tensor]:
    """As the training host drives the worker now: through the ops, `backward` answering the next
    IR except before a checkpoint, the host's SGD step after it sent dL/dIR."""
    e.prefetch = True
    handle = make_handler(e)
    info, host = _start(e)
    total, seen, ir = info["total_steps"], [], None
    for step in range(total):
        if ir is None:
            ir = handle({"op": "forward", "step": step}, {}, {})[1]["ir"]
        grad = handle({"op": "loss"}, {"scores": host.forward(ir)}, {})[1]["grad"]
        seen += [ir, grad]
        d_ir = host.backward_input(grad)
        ckpt = (step + 1) % checkpoint_every == 0
        h, t, _ = handle({"op": "backward", "then_forward": not ckpt}, {"grad": d_ir}, {})
        host.apply_step()
        assert h["step"] == step + 1
        ir = None if t is None else t["ir"]
        if ckpt:
            handle({"op": "checkpoint"}, {}, {})
    assert ir is None  # no forward past the last step
    return seen


def test_pipelined_steps_are_the_sequential_steps_bit_for_bit(enc):
    a = _train_sequential(enc)
    weights_a = {k: v.clone() for k, v in enc.trainer.module.state_dict().items()}
    b = _train_pipelined(enc)
    assert len(a) == len(b) == 2 * 2 * CFG.steps_per_epoch(20)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), i
    for k, v in enc.trainer.module.state_dict().items():
        assert torch.equal(v, weights_a[k]), k
    assert enc.clock.snapshot()["batch_wait"]["n"] > 0  # the batches did come from the prefetch


@pytest.mark.parametrize("bad_step", [0, 1, 2])  # epoch 0: each instance first used there
def test_an_instance_whose_signature_fails_is_refused_before_its_step_runs(enc, bad_step):
    info, host = _start(enc)  # to learn the order (the host never does)
    victim = int(enc._indices(bad_step)[0])
    tag, token = enc.ds.items[victim]
    enc.add_data([(t, tok if t != tag else _bad_signature(enc, t, tok)) for t, tok in enc._sealed], reset=True)
    info, host = _start(enc)  # the seal opens: start accepts it (signatures are checked per batch)
    assert int(enc._indices(bad_step)[0]) == victim
    for step in range(bad_step):  # the steps before it run (their batch after it is prefetched)
        e_ir = enc.forward(step)
        enc.backward(host.backward(enc.loss_grad(host.forward(e_ir))))
    before = {k: v.clone() for k, v in enc.trainer.module.state_dict().items()}
    with pytest.raises(TamperedMessage):
        enc.forward(bad_step)
    assert enc.trainer.step == bad_step and enc.trainer._ir is None  # the FrontNet never saw the batch
    for k, v in enc.trainer.module.state_dict().items():
        assert torch.equal(v, before[k]), k  # not even BatchNorm statistics moved


def test_the_fingerprint_pass_equals_one_pass_over_every_instance(enc):
    _train_pipelined(enc)
    pre = enc.plan.preprocessing()
    x_all, _ = enc.ds.batch(torch.arange(len(enc.ds)))  # every signature checked again
    separate = fingerprints(enc.model, x_all, pre, channels_last=True)
    assert torch.equal(enc._fingerprints(chunk=512), separate)
    assert torch.equal(enc._fingerprints(chunk=256), separate)  # chunks of whole 256-batches
    # channels-last is a layout: the same fingerprints as the default pass, up to float rounding
    default = fingerprints(enc.model, x_all, pre)
    assert torch.allclose(separate, default, atol=1e-5)
    assert enc.model.layers[0][0].weight.is_contiguous()  # the released model keeps its layout
    enc.fingerprint_workers = 1
    serial = enc._fingerprints(chunk=8)  # 3 chunks
    enc.fingerprint_workers = 2
    assert torch.equal(enc._fingerprints(chunk=8), serial)  # chunks on 2 threads: the same values, in order
    enc.channels_last = False
    assert torch.equal(enc._fingerprints(), default)


def test_the_fingerprint_pass_checks_every_signature_the_run_did_not(enc):
    tag, token = enc._sealed[5]
    items = [(t, tok if t != tag else _bad_signature(enc, t, tok)) for t, tok in enc._sealed]
    ds = EnclaveDataset(enc._data_key, items, sort=True, plan=enc.plan_hash)
    bad = [t for t, _ in ds.items].index(tag)
    others = torch.tensor([i for i in range(len(ds)) if i != bad])
    ds.batch(others)  # as a run's batches would: all but the bad one checked
    assert ds.verified_count() == len(ds) - 1
    with pytest.raises(TamperedMessage):
        ds.all_pixels()
    with pytest.raises(TamperedMessage):
        ds.batch(torch.tensor([bad]), reverify=False)


def test_the_host_pipelines_steps_and_reports_where_the_time_went(tmp_path):
    """The real worker process: a run with every step merged equals one with none merged (a
    checkpoint after every step) bit for bit (the BackNet's final state), the long poll answers
    as soon as the run ends, and the stage totals name the step loop and the enclave's work."""
    from enclaveml.train.host import TrainingHost
    from enclaveml.train.store import RunStore

    torch.set_num_threads(1)
    host = TrainingHost(tmp_path / "store", owner=OWNER.public_key().to_bytes().hex(), supervise=False)
    try:
        ev = host.evidence(os.urandom(16).hex())
        pub, plan = bytes.fromhex(ev["public_key"]), bytes.fromhex(ev["plan_hash"])
        part = SigningKey.generate()
        res = host.contribute([make_upload(pub, part, random_png(i), i % 10, plan=plan)[1] for i in range(16)])
        assert all(r["status"] == "accepted" for r in res)
        cfg = TrainConfig(epochs=3, batch=8, seed=0)
        finals = []
        for run_id, every in (("merged", 10**6), ("unmerged", 1)):
            cmd = seal_owner_command(OWNER, pub, START, run_id, os.urandom(16), {
                "model": SPEC, "split": 5, "config": cfg.to_dict(), "plan": plan.hex()})
            host.start(run_id, cmd, checkpoint_every=every)
            t0 = time.monotonic()
            st = host.status(run_id, wait=30.0)
            assert st["state"] == "done", st
            assert time.monotonic() - t0 < 25.0
            finals.append(RunStore(host.root, run_id).load_checkpoint())
        assert finals[0][0] == finals[1][0] == 6
        from safetensors.torch import load

        a, b = load(finals[0][2]), load(finals[1][2])
        assert a.keys() == b.keys() and len(a) > 2
        for k in a:  # the BackNet's weights and momentum, bit for bit
            assert torch.equal(a[k], b[k]), k
        stages = host.stages()
        for name in ("step_host_forward", "step_enclave_loss", "step_enclave_backward_forward", "finish_enclave",
                     "finish_write_linkage", "start_add_data"):
            assert stages["host"][name]["n"] > 0, name
        assert stages["host"]["step_enclave_forward"]["n"] == 1 + 6  # once per run + each step after a checkpoint
        for name in ("front_forward", "front_backward", "loss", "fingerprints_forward", "seal_records"):
            assert stages["enclave"][name]["n"] > 0, name
    finally:
        host.close()
