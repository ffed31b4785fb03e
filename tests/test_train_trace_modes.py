"""Trace modes on synthetic fingerprints: `mislabel` finds planted flipped labels, `nearest` a backdoor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from enclaveml.train import detectors
from enclaveml.train.trace import MODES, centroid_margins, rank_same_label, trace

N_CLASSES, DIM, PER_CLASS = 4, 16, 100


def _clusters(seed: int = 0):
    """Unit fingerprints in 4 well-separated clusters; labels equal the cluster (true class)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(N_CLASSES, DIM, generator=g) * 3
    true = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    fps = F.normalize(centres[true] + torch.randn(len(true), DIM, generator=g), dim=1)
    return fps, true.clone(), true, g


def _flipped(seed: int = 0, per_class: int = 5):
    """Flip `per_class` labels of each class c to c+1, as the mislabelling attacker does."""
    fps, labels, true, g = _clusters(seed)
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(N_CLASSES):
        idx = torch.nonzero(true == c, as_tuple=True)[0]
        pick = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        labels[pick] = (c + 1) % N_CLASSES
        flipped[pick] = True
    return fps, labels, true, flipped


def _ids(n: int, bad: torch.Tensor):
    participants = [b"M" * 32 if bool(bad[i]) else bytes([65 + i % 3]) * 32 for i in range(n)]
    return [i.to_bytes(32, "big") for i in range(n)], participants


def test_centroid_margins_are_negative_exactly_for_flipped_labels():
    fps, labels, _, flipped = _flipped()
    for refine in (False, True):
        m = centroid_margins(fps, labels, refine)
        assert m.shape == (len(labels),)
        assert bool((m[flipped] < 0).all()) and bool((m[~flipped] > 0).all())
    clean = centroid_margins(fps, _clusters()[1])
    assert bool((clean > 0).all())


def test_centroid_margins_edge_cases():
    fps = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    single = centroid_margins(fps, torch.zeros(6, dtype=torch.long), refine=False)  # one label: cos to centroid
    assert torch.allclose(single, fps @ F.normalize(fps.sum(0), dim=0), atol=1e-6)
    for refine in (False, True):
        gap = centroid_margins(fps, torch.tensor([0, 0, 0, 3, 3, 3]), refine)  # labels 1, 2 have no instances
        assert bool(torch.isfinite(gap).all())
    # a label all of whose members sit among another class keeps its first centroid when refined
    pair = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.05]]), dim=1)
    m = centroid_margins(pair, torch.tensor([0, 0, 1]))
    assert bool(torch.isfinite(m).all()) and m.shape == (3,)
    assert centroid_margins(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_mislabel_mode_ranks_planted_flips_first_and_names_their_contributor():
    fps, labels, true, flipped = _flipped()
    hashes, participants = _ids(len(labels), flipped)
    # a class-0 image the model wrongly calls 1: it lies between the two clusters, nearer class 1
    c0, c1 = (F.normalize(fps[(labels == c) & ~flipped].mean(0), dim=0) for c in (0, 1))
    q = F.normalize(0.4 * c0 + 0.6 * c1, dim=0)
    planted = set(torch.nonzero(flipped & (labels == 1), as_tuple=True)[0].tolist())
    mis = trace(q, 1, fps, labels, hashes, participants, k=5, mode="mislabel")
    assert {n.index for n in mis.neighbours} == planted
    assert all(n.margin is not None and n.margin < 0 for n in mis.neighbours)
    assert mis.summary[0] == ((b"M" * 32).hex(), 5) and mis.to_dict()["mode"] == "mislabel"
    near = trace(q, 1, fps, labels, hashes, participants, k=5)  # the plain trace finds clean class-1 points
    assert not {n.index for n in near.neighbours} & planted
    assert "margin" not in near.to_dict()["neighbours"][0]


def test_mislabel_mode_on_clean_labels_returns_the_nearest_consistent_points():
    fps, labels, _, _ = _clusters()
    q = F.normalize(fps[labels == 2].mean(0), dim=0)
    idx, dist = rank_same_label(q, 2, fps, labels, 10, "mislabel")
    assert len(idx) == 10 and bool((labels[idx] == 2).all())
    assert bool((centroid_margins(fps, labels)[idx] > 0).all())
    assert bool((dist[1:] >= 0).all())


def test_nearest_mode_still_finds_a_backdoor_cluster_that_mislabel_mode_ranks_last():
    fps, labels, _, g = _clusters()
    n_bad = 20
    bad = torch.zeros(len(labels), dtype=torch.bool)
    bad[:n_bad] = True  # class-0 slots taken over by a tight triggered cluster, labelled 1
    labels[:n_bad] = 1
    fps[:n_bad] = F.normalize(torch.randn(DIM, generator=g) * 3 + 0.3 * torch.randn(n_bad, DIM, generator=g), dim=1)
    hashes, participants = _ids(len(labels), bad)
    q = F.normalize(fps[:n_bad].mean(0), dim=0)
    near = trace(q, 1, fps, labels, hashes, participants, k=10)
    assert all(bool(bad[n.index]) for n in near.neighbours) and near.summary[0][0] == (b"M" * 32).hex()
    Q = detectors.Queries(q.view(1, -1), torch.tensor([1]))
    p, _ = detectors.precision_recall(detectors.get("knn-trace", k=10).flag(fps, labels, Q), bad)
    assert p == 1.0


def test_mislabel_detector_flags_the_planted_flips_of_the_traced_labels():
    fps, labels, _, flipped = _flipped(seed=3)
    qs, ys = [], []
    for y in range(N_CLASSES):  # one query per label, between its source class and itself
        src = (y - 1) % N_CLASSES
        cs, cy = (F.normalize(fps[(labels == c) & ~flipped].mean(0), dim=0) for c in (src, y))
        qs.append(F.normalize(0.4 * cs + 0.6 * cy, dim=0))
        ys.append(y)
    Q = detectors.Queries(torch.stack(qs), torch.tensor(ys))
    mis = detectors.get("mislabel-trace", k=5).flag(fps, labels, Q)
    near = detectors.get("knn-trace", k=5).flag(fps, labels, Q)
    assert detectors.precision_recall(mis, flipped) == (1.0, 1.0)
    assert detectors.precision_recall(near, flipped)[0] < 0.5


def test_unknown_mode_is_refused():
    fps, labels, _, _ = _clusters()
    assert MODES == ("nearest", "mislabel")
    with pytest.raises(ValueError):
        rank_same_label(fps[0], 0, fps, labels, 3, "farthest")


def _model_folder(tmp_path, n: int = 60):
    """A released-model folder (untrained tiny darknet) whose linkage holds synthetic records."""
    import io
    import json

    from PIL import Image
    from safetensors.torch import save_file

    from enclaveml.crypto import generate_key
    from enclaveml.train.linkage import LinkageRecord, LinkageStore
    from enclaveml.train.spec import ModelSpec

    spec = ModelSpec.parse("darknet:width=4")
    torch.manual_seed(0)
    model = spec.build()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    px = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(px, "RGB").save(buf, "PNG")
    (tmp_path / "q.png").write_bytes(buf.getvalue())
    with torch.no_grad():
        dim = model.penultimate(spec.preprocessing()(buf.getvalue()).unsqueeze(0)).shape[1]
    labels = torch.arange(n) % 3
    fps = F.normalize(torch.randn(3, dim, generator=g)[labels] * 3 + torch.randn(n, dim, generator=g), dim=1)
    labels[[0, 2, 3]] = 1  # flipped: true classes 0, 2, 0 labelled 1
    recs = [LinkageRecord(fps[i].numpy(), int(labels[i]), i.to_bytes(32, "big"), bytes([i % 4]) * 32, b"s" * 64)
            for i in range(n)]
    key = generate_key()
    store = LinkageStore(tmp_path / "linkage.db", key)
    store.write_all(recs, "t")
    store.close()
    (tmp_path / "linkage.key").write_bytes(key)
    meta = {"model": spec.text, "classes": list(spec.classes), "instances": n}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    return tmp_path


def test_cli_trace_mode_option(tmp_path):
    import json

    from typer.testing import CliRunner

    from enclaveml.cli import app
    from enclaveml.errors import UserInputError
    from enclaveml.train.owner import TracedModel

    folder = _model_folder(tmp_path)
    base = ["train", "trace", str(folder / "q.png"), "--label", "1", "-k", "4", "--model-dir", str(folder), "--json"]
    run = CliRunner().invoke
    near = run(app, base)
    assert near.exit_code == 0, near.output
    near = json.loads(near.output)
    assert near["mode"] == "nearest" and len(near["neighbours"]) == 4 and "margin" not in near["neighbours"][0]
    mis = run(app, base + ["--mode", "mislabel"])
    assert mis.exit_code == 0, mis.output
    mis = json.loads(mis.output)
    tm = TracedModel(folder)
    fp, _ = tm.fingerprint((folder / "q.png").read_bytes())
    want = trace(fp, 1, tm.fps, tm.labels, [r.instance_hash for r in tm.records], [r.participant for r in tm.records],
                 k=4, mode="mislabel")
    assert [n["index"] for n in mis["neighbours"]] == [n.index for n in want.neighbours]
    assert {n["index"] for n in mis["neighbours"][:3]} == {0, 2, 3}  # the flipped records lead
    assert all(n["margin"] < 0 for n in mis["neighbours"][:3]) and mis["neighbours"][3]["margin"] > 0
    assert "signature" in mis["neighbours"][0]
    assert mis["predicted"] == near["predicted"] and mis["label_name"] == near["label_name"]
    text = run(app, base[:-1] + ["--mode", "mislabel"])  # the human-readable form shows the margins
    assert text.exit_code == 0 and "margin=-" in text.output and "per participant:" in text.output
    bad = run(app, base + ["--mode", "farthest"])
    assert bad.exit_code != 0 and isinstance(bad.exception, UserInputError)
