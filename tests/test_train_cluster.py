"""Cluster-level backdoor tracing (train/cluster.py), the blended trigger, and the detector registry.

Synthetic fingerprints with a known answer: ten classes of unit vectors, and in the target
class a poison group that shares a "trigger" direction with the traced inputs (triggered
inputs from other classes). Real-model figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch

from enclaveml.train import detectors, poison
from enclaveml.train.cluster import cluster_summary, poison_cluster, trace_cluster


def _world(n_per=150, n_poison=40, dim=48, seed=0, trigger=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, dim, generator=g)
    trig = torch.randn(dim, generator=g)
    labels = torch.arange(10).repeat_interleave(n_per)
    x = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=g)
    # the attacker's images of classes 1..9 with the trigger, labelled 0
    src = torch.randint(1, 10, (n_poison,), generator=g)
    px = centres[src] * 0.3 + trigger * 2.5 * trig + 0.5 * torch.randn(n_poison, dim, generator=g)
    fps = torch.nn.functional.normalize(torch.cat([x, px]), dim=1)
    labels = torch.cat([labels, torch.zeros(n_poison, dtype=torch.long)])
    poisoned = torch.cat([torch.zeros(len(x), dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)])
    qsrc = torch.randint(1, 10, (30,), generator=g)
    q = torch.nn.functional.normalize(centres[qsrc] * 0.3 + trigger * 2.5 * trig + 0.5 * torch.randn(30, dim, generator=g), dim=1)
    return fps, labels, poisoned, q


def test_the_cluster_is_the_poison_group_exactly():
    fps, labels, poisoned, q = _world()
    res = poison_cluster(q, 0, fps, labels)
    got = torch.zeros(len(fps), dtype=torch.bool)
    got[res.members] = True
    assert torch.equal(got, poisoned) and res.separation > 1.15 * res.bar
    # from one traced input: the K-nearest trace returns 10 of the 40, the cluster all of them
    one = poison_cluster(q[:1], 0, fps, labels)
    hit = poisoned[one.members]
    assert int(hit.sum()) == 40 and len(one.members) <= 41
    knn = detectors.get("knn-trace", k=10).flag(fps, labels, detectors.Queries(q[:1], torch.zeros(1, dtype=torch.long)))
    assert int((knn & poisoned).sum()) == 10


def test_no_separated_cluster_means_an_empty_answer():
    fps, labels, poisoned, q = _world()
    # ordinary errors: inputs of class 3 traced under label 5, where nothing was poisoned
    g = torch.Generator().manual_seed(4)
    idx = torch.nonzero(labels == 3, as_tuple=True)[0][:20]
    res = poison_cluster(fps[idx] + 0.01 * torch.randn(20, fps.shape[1], generator=g), 5, fps, labels)
    assert len(res.members) == 0 and res.separation < 1.15 * res.bar
    assert len(poison_cluster(q, 7, fps, labels[:0].new_full(labels.shape, 7)[:0], ).members) == 0  # no candidates


def test_each_traced_input_is_answered_from_the_cluster_and_names_the_poisoner():
    fps, labels, poisoned, q = _world()
    parts = [b"\x01" * 32 if p else bytes([2 + i % 3]) * 32 for i, p in enumerate(poisoned.tolist())]
    hashes = [i.to_bytes(32, "big") for i in range(len(fps))]
    res, answers = trace_cluster(q, 0, fps, labels, hashes, parts, k=10)
    assert len(answers) == len(q)
    for a in answers:
        assert a.mode == "cluster" and len(a.neighbours) == 10
        assert a.summary[0] == ((b"\x01" * 32).hex(), 10)
    s = cluster_summary(res, parts, hashes)
    assert s["accepted"] and s["members"] == 40 and s["participants"][0]["participant"] == (b"\x01" * 32).hex()
    # without a cluster, each input still gets its nearest same-label instances
    _, plain = trace_cluster(q[:2], 5, fps, labels, hashes, parts, k=3)
    assert all(a.mode == "nearest" and len(a.neighbours) == 3 for a in plain)


def test_cluster_trace_detector_flags_the_union_per_traced_label():
    fps, labels, poisoned, q = _world()
    mask = detectors.get("cluster-trace").flag(fps, labels, detectors.Queries(q, torch.zeros(len(q), dtype=torch.long)))
    assert torch.equal(mask, poisoned)
    assert not detectors.get("cluster-trace").flag(fps, labels, None).any()


def test_blended_trigger_changes_every_pixel_a_little_and_is_fixed():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = poison.apply("blend", x)
    diff = (y.int() - x.int()).abs()
    assert diff.max() <= round(0.2 * 255) + 1 and (diff > 0).float().mean() > 0.9
    assert torch.equal(y, poison.apply_blend(x))  # the same key pattern every time
    assert torch.equal(poison.apply("patch", x), poison.apply_trigger(x))
    with pytest.raises(ValueError):
        poison.apply("sticker", x)
    with pytest.raises(ValueError):
        poison.apply_blend(x, alpha=0.0)
