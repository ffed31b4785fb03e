"""Security review (engineer F): the CalTrain enclave driven in-process by a hostile host.

The training host relays every command, so it can replay, reorder, swap sealed blobs, and sign
commands with keys of its own. The fix for finding F-2 pins the owner's key in the enclave's
measured configuration, which the participants' policies pin in turn.
"""

from __future__ import annotations


import pytest
import torch

from enclaveml.crypto import SigningKey, seal_owner_command
from enclaveml.errors import ReplayedMessage, TamperedMessage, Unauthorized, UserInputError, PolicyViolation
from enclaveml.tee.sim import SimBackend
from enclaveml.train.enclave import ENCLAVE_CONFIG, START, CalTrainEnclave, enclave_config
from enclaveml.train.instances import make_upload
from enclaveml.train.partitioned import TrainConfig
from enclaveml.train.spec import ModelSpec
from image_helpers import random_png

SPEC = "darknet:width=4"
CFG = TrainConfig(epochs=1, batch=4, seed=1)
REFUSED = (TamperedMessage, Unauthorized, PolicyViolation, ReplayedMessage)
#: The owner the participants agreed to: pinned in the enclave's measured configuration (F-2 fix).
OWNER = SigningKey.generate()


@pytest.fixture()
def caltrain(tmp_path_factory):
    torch.set_num_threads(1)
    be = SimBackend(enclave_config(OWNER.public_key()), platform_dir=tmp_path_factory.getbasetemp() / "caltrain-platform",
                    lock_memory=False)
    enc = CalTrainEnclave(be)
    spec = ModelSpec.parse(SPEC)
    participants = [SigningKey.generate(), SigningKey.generate()]
    uploads = [make_upload(enc.hpke.public_bytes(), participants[i % 2], random_png(i), i % 10, plan=enc.plan_hash)[1] for i in range(6)]
    res = enc.ingest(uploads, spec)
    assert all(r["status"] == "accepted" for r in res), res
    enc.add_data([(r["tag"], r["sealed"]) for r in res])
    return enc, res


def _start_cmd(enc, signer: SigningKey, run_id: str = "run-1", nonce: bytes = b"owner-nonce-0001", **cfg):
    return seal_owner_command(signer, enc.hpke.public_bytes(), START, run_id, nonce,
                              {"model": SPEC, "split": 3, "plan": enc.plan_hash.hex(), "config": {**CFG.to_dict(), **cfg}})


def test_start_signed_by_a_key_the_participants_never_agreed_to_is_refused(caltrain):
    enc, _ = caltrain
    mallory = SigningKey.generate()  # e.g. the host operator
    with pytest.raises(REFUSED):
        enc.start(_start_cmd(enc, mallory), None)


def test_the_same_start_command_cannot_be_replayed(caltrain):
    enc, _ = caltrain
    owner = OWNER
    cmd = _start_cmd(enc, owner)
    try:
        enc.start(cmd, None)
    except REFUSED:
        return  # a fixed enclave may refuse unissued nonces outright: also no replay
    with pytest.raises(REFUSED):
        enc.start(cmd, None)


def test_host_cannot_pick_the_step_or_feed_malformed_scores(caltrain):
    enc, _ = caltrain
    owner = OWNER
    enc.start(_start_cmd(enc, owner), None)
    with pytest.raises(TamperedMessage):
        enc.forward(1)  # skipping a step
    with pytest.raises(TamperedMessage):
        enc.forward(-1)
    enc.forward(0)
    for bad in (torch.zeros(4, 9), torch.zeros(4, 10, dtype=torch.float64), torch.zeros(40)):
        with pytest.raises(TamperedMessage):
            enc.loss_grad(bad)


def test_sealed_instances_swapped_between_tags_are_refused(caltrain, tmp_path):
    enc, res = caltrain
    enc.add_data([(res[0]["tag"], res[1]["sealed"]), (res[1]["tag"], res[0]["sealed"])], reset=True)
    with pytest.raises(TamperedMessage):
        enc.start(_start_cmd(enc, OWNER), None)


def test_checkpoint_of_another_run_or_config_is_refused(caltrain):
    enc, _ = caltrain
    owner = OWNER
    enc.start(_start_cmd(enc, owner, run_id="run-a"), None)
    ck = enc.checkpoint()
    for cmd in (_start_cmd(enc, owner, run_id="run-b"), _start_cmd(enc, owner, run_id="run-a", lr=0.5)):
        with pytest.raises(TamperedMessage):
            enc.start(cmd, ck)
    with pytest.raises(Unauthorized):  # another key than the pinned owner, even with a valid checkpoint
        enc.start(_start_cmd(enc, SigningKey.generate(), run_id="run-a"), ck)
    bad = bytearray(ck)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(TamperedMessage):
        enc.start(_start_cmd(enc, owner, run_id="run-a"), bytes(bad))


def test_commands_before_a_run_are_user_errors(tmp_path):
    enc = CalTrainEnclave(SimBackend(ENCLAVE_CONFIG, platform_dir=tmp_path / "p", lock_memory=False))
    for call in (lambda: enc.forward(0), lambda: enc.checkpoint(), lambda: enc.finish(b"")):
        with pytest.raises(UserInputError):
            call()
    assert enc.records(0, 10) == []
