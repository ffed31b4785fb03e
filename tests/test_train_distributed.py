"""Data-parallel CalTrain with real processes: `train serve --enclaves 2` (rank 0: uvicorn + its
enclave worker; rank 1: a `train peer` host process + its own enclave worker; torch.distributed
gloo on loopback), participants uploading CIFAR-10 images over HTTP, the owner's `train run
--enclaves 2`.

Checks: every instance is trained on and traced exactly once (the one linkage store holds all
shards' records); the release says 2 enclaves; an owner who asks for another group size is
refused; a SIGKILL of the peer's enclave worker mid-run fails the run, the server restarts the
peer, and the same run id resumes from enclave 0's sealed checkpoint to the weights of an
uninterrupted run, bit for bit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from enclaveml.keyfiles import load_or_create_signing_key, load_signing_key
from enclaveml.errors import PolicyViolation
from enclaveml.train import demo
from enclaveml.train.client import HostClient
from enclaveml.train.linkage import LinkageStore
from enclaveml.train.owner import TracedModel, run
from enclaveml.train.participant import contribute
from enclaveml.train.partitioned import TrainConfig
from test_train_system import Server, _pin_policy

pytestmark = pytest.mark.slow  # about 100 s on 2 busy cores: 4 processes, 4 trainings
torch.set_num_threads(1)
CFG = TrainConfig(epochs=2, batch=10, lr=0.05, seed=2)
MODEL = "darknet:width=4"


@pytest.fixture(scope="module")
def group(tmp_path_factory, cifar10_dir):
    base = tmp_path_factory.mktemp("caltrain-dp")
    data = base / "data"
    demo.split_folder(cifar10_dir / "train", data, 2, 4)  # 2 participants x 40 images
    owner = load_or_create_signing_key(base / "owner.key").public_key().to_bytes().hex()
    srv = Server(base / "store", base / "home", owner, ("--enclaves", "2"))
    policy = base / "policy.toml"
    _pin_policy(srv, policy)
    for i in (1, 2):
        rep = contribute(data / f"participant{i}", srv.url, policy, base / f"p{i}.key", batch=40)
        assert rep.counts["accepted"] == 40
    d = {"base": base, "data": data, "policy": policy, "owner": base / "owner.key", "srv": srv}
    yield d
    d["srv"].kill()


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _peer_enclave_pid(srv) -> int:
    peers = [p for p in _children(srv.proc.pid) if "train peer" in _cmdline(p)]
    assert len(peers) == 1, peers
    workers = [p for p in _children(peers[0]) if "enclave_worker" in _cmdline(p)]
    assert len(workers) == 1 and "--group" in _cmdline(workers[0])
    return workers[0]


def test_two_enclaves_train_every_instance_once_and_one_trace_sees_all(group, tmp_path):
    srv = group["srv"]
    with pytest.raises(PolicyViolation, match="asks for 3 enclaves"):
        run(srv.url, group["policy"], MODEL, 4, CFG, group["owner"], tmp_path / "x", run_id="wrong-n", enclaves=3)
    res = run(srv.url, group["policy"], MODEL, 4, CFG, group["owner"], tmp_path / "m", run_id="dp", poll=0.1,
              enclaves=2)
    assert res["state"] == "done" and res["instances"] == 80 and res["enclaves"] == 2, res
    assert 0 < res["shard"] < 80  # rank 0's shard; the peer trained on the rest
    assert res["bytes_per_step"] > 0
    key = (tmp_path / "m" / "linkage.key").read_bytes()
    with LinkageStore(tmp_path / "m" / "linkage.db", key) as store:
        recs = store.read_all()
    assert len(recs) == 80 and len({r.instance_hash for r in recs}) == 80
    p1, p2 = (load_signing_key(group["base"] / f"p{i}.key").public_key() for i in (1, 2))
    assert {r.participant for r in recs} == {bytes.fromhex(p1.fingerprint()), bytes.fromhex(p2.fingerprint())}
    # the trace sees the instances of both shards: an image is its own nearest neighbour wherever it trained
    from enclaveml.data.preprocess import load_image_bytes

    tm = TracedModel(tmp_path / "m")
    found = 0
    for p in (group["data"] / "participant1" / "cat", group["data"] / "participant2" / "cat"):
        for img in sorted(p.iterdir())[:2]:
            tr = tm.trace(load_image_bytes(img), "cat", 3)
            found += tr["neighbours"][0]["distance"] < 1e-3
    assert found == 4


def test_resume_after_sigkill_of_the_peer_enclave(group, tmp_path):
    srv = group["srv"]
    ref = run(srv.url, group["policy"], MODEL, 4, CFG, group["owner"], tmp_path / "ref", run_id="dp-ref", poll=0.1,
              checkpoint_every=3)
    assert ref["state"] == "done"
    st = run(srv.url, group["policy"], MODEL, 4, CFG, group["owner"], tmp_path / "m", run_id="dp-kill",
             checkpoint_every=3, wait=False)
    c = HostClient(srv.url)
    while st.get("checkpoint") is None and st["state"] == "running":
        time.sleep(0.02)
        st = c.get("/train/status", run_id="dp-kill").json()
    assert st["state"] == "running", f"the run ended before the kill: {st}"
    os.kill(_peer_enclave_pid(srv), signal.SIGKILL)
    for _ in range(600):
        st = c.get("/train/status", run_id="dp-kill").json()
        if st["state"] != "running":
            break
        time.sleep(0.1)
    c.close()
    assert st["state"] == "failed", st
    res = run(srv.url, group["policy"], MODEL, 4, CFG, group["owner"], tmp_path / "m", run_id="dp-kill", poll=0.1,
              checkpoint_every=3)
    assert res["state"] == "done" and res["resumed_from"] >= 3 and res["instances"] == 80, res
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "m" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    key = (tmp_path / "m" / "linkage.key").read_bytes()
    with LinkageStore(tmp_path / "m" / "linkage.db", key) as store:
        recs = store.read_all()
    assert len(recs) == 80 and len({r.instance_hash for r in recs}) == 80
