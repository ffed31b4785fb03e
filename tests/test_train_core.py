"""CalTrain pure core: partitioned training equals plain training; fingerprints, trace, detectors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from enclaveml.models.zoo import darknet
from enclaveml.models import zoo
from enclaveml.train import detectors
from enclaveml.train.linkage import LinkageRecord, LinkageStore
from enclaveml.models.split import permute_classifier
from enclaveml.train.partitioned import (ClassMapping, EnclaveTrainer, HostTrainer, PlainTrainer, TrainConfig,
                                         partitioned_step, split_for_caltrain)
from enclaveml.train.trace import summarise, trace

torch.set_num_threads(1)
PRE = zoo.entry("darknet").preprocessing


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def test_partitioned_matches_plain_training():
    torch.manual_seed(0)
    base = darknet.build(width=8)
    plain_model = copy.deepcopy(base)
    cfg = TrainConfig(epochs=1, batch=16, lr=0.05, seed=3)
    x, y = _data(48)
    total = cfg.steps_per_epoch(len(y)) * cfg.epochs
    mapping = ClassMapping.random(10, torch.Generator().manual_seed(7))
    assert not torch.equal(mapping.perm, torch.arange(10))
    front, back = split_for_caltrain(base, 5, mapping)
    enc = EnclaveTrainer(front, mapping, PRE, cfg, total)
    host = HostTrainer(back, cfg, total)
    plain = PlainTrainer(plain_model, PRE, cfg, total)
    for step, _, idx in cfg.batches(len(y)):
        l1 = partitioned_step(enc, host, x[idx], y[idx])
        l2 = plain.train_step(x[idx], y[idx])
        assert abs(l1 - l2) < 1e-5
    permute_classifier(base, mapping, inverse=True)  # back to class order
    for (n1, p1), (n2, p2) in zip(base.state_dict().items(), plain_model.state_dict().items()):
        assert torch.allclose(p1.float(), p2.float(), atol=1e-5), n1
    # the host's classifier is really in the secret order, and the scores are permuted
    x0 = PRE.normalise(x[:4].float() / 255)
    base.eval(), plain_model.eval()
    assert torch.allclose(base(x0), plain_model(x0), atol=1e-4)


def test_state_roundtrip_resumes_exactly():
    cfg = TrainConfig(epochs=2, batch=16, seed=1)
    x, y = _data(32)
    total = cfg.steps_per_epoch(32) * 2

    def fresh():
        torch.manual_seed(0)
        return PlainTrainer(darknet.build(width=8), PRE, cfg, total)

    a = fresh()
    for step, _, idx in cfg.batches(32):
        a.train_step(x[idx], y[idx])
    b = fresh()
    for step, _, idx in cfg.batches(32):
        if step == 2:
            break
        b.train_step(x[idx], y[idx])
    blob = b.state_bytes()
    c = fresh()
    c.load_state_bytes(blob)
    assert c.step == 2
    for step, _, idx in cfg.batches(32, start_step=c.step):
        c.train_step(x[idx], y[idx])
    for p1, p2 in zip(a.module.state_dict().values(), c.module.state_dict().values()):
        assert torch.allclose(p1.float(), p2.float(), atol=1e-6)


def test_lr_schedule_shape():
    cfg = TrainConfig(lr=0.1, warmup=0.2)
    lrs = [cfg.lr_at(s, 100) for s in range(100)]
    assert max(lrs) == pytest.approx(0.1) and lrs[0] < 0.01 and lrs[-1] < 0.01


def test_linkage_store_encrypts_and_detects_tampering(tmp_path):
    key = bytes(range(32))
    recs = [LinkageRecord(np.random.rand(8).astype(np.float32), i % 3, bytes([i]) * 32, b"P" * 32, b"S" * 64)
            for i in range(5)]
    store = LinkageStore(tmp_path / "l.db", key)
    store.write_all(recs, "model-1")
    back = store.read_all()
    assert [r.label for r in back] == [r.label for r in recs]
    assert np.allclose(back[2].fingerprint, recs[2].fingerprint)
    raw = (tmp_path / "l.db").read_bytes()
    assert b"P" * 32 not in raw and b"S" * 64 not in raw
    # moving a record to another row is caught
    store._db.execute("UPDATE records SET token=(SELECT token FROM records WHERE seq=0) WHERE seq=1")
    store._db.commit()
    from enclaveml.errors import TamperedMessage
    with pytest.raises(TamperedMessage):
        store.read_all()
    store._db.execute("DELETE FROM records WHERE seq=4")
    store._db.commit()
    with pytest.raises(TamperedMessage):
        LinkageStore(tmp_path / "l.db", key).read_all()


def test_trace_and_detectors_find_a_planted_cluster():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 16
    labels = torch.randint(0, 4, (n,), generator=g)
    centres = torch.randn(4, d, generator=g) * 3
    fps = centres[labels] + torch.randn(n, d, generator=g)
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[:20] = True
    labels[:20] = 0
    fps[:20] = torch.randn(d, generator=g) * 3 + 0.3 * torch.randn(20, d, generator=g)  # a tight odd cluster
    fps = torch.nn.functional.normalize(fps, dim=1)
    participants = [b"M" * 32 if i < 30 else bytes([65 + i % 3]) * 32 for i in range(n)]
    hashes = [i.to_bytes(32, "big") for i in range(n)]
    q = fps[:20].mean(0)
    q = q / q.norm()
    res = trace(q, 0, fps, labels, hashes, participants, k=10)
    assert len(res.neighbours) == 10 and all(labels[nb.index] == 0 for nb in res.neighbours)
    assert res.summary[0][0] == (b"M" * 32).hex()
    for name in ("knn-trace", "activation-clustering", "spectral-signatures"):
        det = detectors.get(name)
        mask = det.flag(fps, labels, detectors.Queries(q.view(1, -1), torch.tensor([0])))
        in0 = labels == 0  # spectral signatures flag a share of every class; judge the attacked one
        p, r = detectors.precision_recall(mask & in0, poisoned)
        assert p > 0.5 and r > 0.3, (name, p, r)
    assert summarise(["a", "b", "b"]) == [("b", 2), ("a", 1)]
