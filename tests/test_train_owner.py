"""F-2 / F-3 / F-13: the training enclave's owner is fixed by its measured configuration, owner
commands are one-time, and the owner/participant client treats the host's answers as hostile."""

from __future__ import annotations


import pytest
import torch

from enclaveml.crypto import HpkeKeyPair, SigningKey, seal_owner_command
from enclaveml.errors import ReplayedMessage, TamperedMessage, Unauthorized, UserInputError
from enclaveml.tee.sim import SimBackend, expected_sim_measurement
from enclaveml.train.client import json_of
from enclaveml.train.enclave import ENCLAVE_CONFIG, RELEASE, START, CalTrainEnclave, enclave_config, parse_owner
from enclaveml.train.instances import make_upload
from enclaveml.train.partitioned import TrainConfig
from enclaveml.train.spec import ModelSpec
from image_helpers import random_png

SPEC = "darknet:width=4"
CFG = TrainConfig(epochs=1, batch=4, seed=1)


OWNER = SigningKey.generate()


@pytest.fixture()
def owned(tmp_path_factory):
    torch.set_num_threads(1)
    be = SimBackend(enclave_config(OWNER.public_key()),
                    platform_dir=tmp_path_factory.getbasetemp() / "caltrain-platform", lock_memory=False)
    enc = CalTrainEnclave(be)
    p = SigningKey.generate()
    res = enc.ingest([make_upload(enc.hpke.public_bytes(), p, random_png(i), i % 10, plan=enc.plan_hash)[1] for i in range(6)],
                     ModelSpec.parse(SPEC))
    enc.add_data([(r["tag"], r["sealed"]) for r in res])
    return enc


def _cmd(enc, signer, kind=START, nonce=b"nonce-0000000001", run_id="run-1"):
    args = {"model": SPEC, "split": 3, "plan": enc.plan_hash.hex(), "config": CFG.to_dict()} if kind == START else \
        {"reply_to": HpkeKeyPair.generate().public_bytes().hex()}
    return seal_owner_command(signer, enc.hpke.public_bytes(), kind, run_id, nonce, args)


def test_the_owner_is_part_of_the_measurement():
    a, b = SigningKey.generate().public_key(), SigningKey.generate().public_key()
    ms = {expected_sim_measurement(c) for c in (ENCLAVE_CONFIG, enclave_config(a), enclave_config(b))}
    assert len(ms) == 3  # a participant's policy pins one owner
    assert enclave_config(a)["owner"] == a.to_bytes().hex()
    assert parse_owner(a.to_bytes().hex()) == a


def test_only_the_configured_owner_can_start_or_release(owned):
    enc = owned
    mallory = SigningKey.generate()
    assert enc.allowed_owner == OWNER.public_key()
    with pytest.raises(Unauthorized):
        enc.start(_cmd(enc, mallory), None)
    with pytest.raises(Unauthorized):
        enc.release(_cmd(enc, mallory, RELEASE, b"nonce-0000000002"), b"")
    info, _ = enc.start(_cmd(enc, OWNER), None)
    assert info["run_id"] == "run-1"


def test_owner_commands_are_one_time(owned):
    enc = owned
    cmd = _cmd(enc, OWNER)
    enc.start(cmd, None)
    with pytest.raises(ReplayedMessage):
        enc.start(cmd, None)
    with pytest.raises(ReplayedMessage):  # the same nonce in another command
        enc.start(_cmd(enc, OWNER, run_id="run-2"), None)
    enc.start(_cmd(enc, OWNER, nonce=b"nonce-0000000003", run_id="run-2"), None)


def test_a_training_host_needs_an_owner(tmp_path):
    from enclaveml.train.host import TrainingHost

    with pytest.raises(UserInputError):
        TrainingHost(tmp_path / "store")
    with pytest.raises(UserInputError):
        parse_owner("not a key")


class _Answer:
    def __init__(self, content: bytes):
        self.content = content


@pytest.mark.parametrize("raw", [b"[" * 100000, b"not json", b"[1, 2]", b'{"a": 1e999}', b"\xff\xfe"])
def test_malformed_host_answers_are_refused_clearly(raw):
    with pytest.raises(TamperedMessage):
        json_of(_Answer(raw))
    assert json_of(_Answer(b'{"state": "done"}')) == {"state": "done"}
