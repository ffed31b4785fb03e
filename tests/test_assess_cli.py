"""`enclaveml assess` end to end, as a user runs it: files written, contract kept, bad input refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from enclaveml.data.packaged import packaged_imagefolder

TINY = ["--decoder-steps", "15", "--decoder-train", "64", "--rmle-steps", "10", "--rmle-samples", "2", "--threads", "1"]


def darknet_weights(tmp_path) -> list[str]:
    """--weights for darknet: the trained file if `make zoo` ran, else the (real, untrained) initial weights."""
    from safetensors.torch import save_file

    from enclaveml.models import zoo

    e = zoo.entry("darknet")
    if e.weights_path.exists():
        return ["--weights", str(e.weights_path)]
    path = tmp_path / "darknet-init.safetensors"
    save_file({k: v.contiguous() for k, v in e.build().state_dict().items()}, str(path))
    return ["--weights", str(path)]


def run(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "enclaveml", "assess", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def _one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stdout[-500:], p.stderr[-2000:])
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_assess_writes_json_contract_and_report(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    p = run("darknet", "--data", cifar10_dir, "--samples", 4, "--points", "1,5,12", "--out", out, *TINY,
            *darknet_weights(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((out / "assessment.json").read_text())
    assert rec["model"] == "darknet" and [q["index"] for q in rec["points"]] == [1, 5, 12]
    for q in rec["points"]:
        assert set(q) >= {"index", "name", "kl", "inversion", "cost"}
        assert set(q["kl"]) >= {"min", "uniform", "leaks"} and isinstance(q["kl"]["leaks"], bool)
        assert set(q["inversion"]) >= {"ssim", "psnr"} and set(q["inversion"]["attacks"]) == {"decoder", "rmle"}
        assert q["inversion"]["ssim"] == max(a["ssim"] for a in q["inversion"]["attacks"].values())
        assert set(q["cost"]) >= {"params", "flops", "activation_bytes", "latency_ms"}
    assert rec["recommended"] is None or rec["recommended"] in (1, 5, 12)
    html = (out / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64," in html and "threshold 0.3" in html


@pytest.mark.parametrize("case", ["unknown-model", "empty-folder", "wrong-size", "wrong-mode", "bad-point", "bad-points-text",
                                  "bad-override"])
def test_bad_input_is_one_line_and_nonzero(case, tmp_path, cifar10_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    model, data, extra = "darknet", cifar10_dir, []
    if case == "unknown-model":
        model = "resnet9000"
    elif case == "empty-folder":
        data = empty
    elif case == "wrong-size":
        data = packaged_imagefolder("foolbox-imagenet")  # 224..512-pixel photos for a 32x32 model
    elif case == "wrong-mode":
        (tmp_path / "grey" / "a").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (32, 32), 100 + i).save(tmp_path / "grey" / "a" / f"{i}.png")
        data = tmp_path / "grey"
    elif case == "bad-point":
        extra = ["--points", "1,99"]
    elif case == "bad-override":
        extra = ["--point", "13"]
    else:
        extra = ["--points", "one"]
    p = run(model, "--data", data, "--samples", 2, "--out", tmp_path / "o", *extra, *TINY,
            *darknet_weights(tmp_path))
    line = _one_line_error(p)
    expect = {"unknown-model": "unknown", "empty-folder": "no class folders", "wrong-size": "expects 32x32",
              "wrong-mode": "mode L", "bad-point": "out of range", "bad-points-text": "integers", "bad-override": "out of range"}[case]
    assert expect in line, line


def test_corrupt_image_is_a_data_error(tmp_path):
    from enclaveml.assess.data import load_assess_data
    from enclaveml.data.preprocess import Preprocessing
    from enclaveml.errors import DataError

    (tmp_path / "a").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        load_assess_data(tmp_path, Preprocessing(resize=False), 1, 1)
    with pytest.raises(DataError, match="not a folder"):
        load_assess_data(tmp_path / "missing", Preprocessing(resize=False), 1, 1)
