"""`enclaveml partition`: bundles from zoo and user models, K from an assessment, clear refusals."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT
from enclaveml import keyfiles
from enclaveml.crypto import SigningKey
from enclaveml.errors import PartitionError, UnknownModel, UserInputError
from enclaveml.models import zoo
from enclaveml.models.bundle import load_manifest, load_model_key, open_enclave_parts, read_public_bundle

ENCLAVEML = [sys.executable, "-m", "enclaveml"]
USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn
    from enclaveml.models import LayeredModel

    def build():
        return LayeredModel([("conv", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())),
                             ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())),
                             ("hidden", nn.Sequential(nn.Linear(32, 16), nn.ReLU())),
                             ("fc", nn.Linear(16, 4))], (3, 16, 16), 4)
''')


def _run(args, cwd, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([*ENCLAVEML, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_user_model_bundle_end_to_end(tmp_path):
    """Subprocess: a user factory model with weights; the bundle reproduces the model's outputs."""
    (tmp_path / "mymodels.py").write_text(USER_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodels

        torch.manual_seed(1)
        ref = mymodels.build().eval()
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
        (tmp_path / "a.json").write_text(json.dumps({"recommended": 2, "model": "mymodels:build"}))
        env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT / 'src'}", "ENCLAVEML_HOME": str(tmp_path / "home")}
        r = _run(["partition", "mymodels:build", "--weights", "w.safetensors", "--assessment", "a.json",
                  "--classes", "a,b,c,d", "--out", "bundle"], tmp_path, env)
        assert r.returncode == 0, r.stderr
        assert "k=2" in r.stdout
        key_file = tmp_path / "bundle.modelkey"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert not (tmp_path / "bundle" / "bundle.modelkey").exists()
        owner = keyfiles.load_signing_key(tmp_path / "home" / "owner.key")
        assert stat.S_IMODE((tmp_path / "home" / "owner.key").stat().st_mode) == 0o600
        man = load_manifest(tmp_path / "bundle", expected_owner=owner.public_key())
        assert man.k == 2 and man.arch == {"factory": "mymodels:build"} and man.name == "bundle"
        with pytest.raises(UserInputError, match="not allowed"):  # readers build factories only when told to
            read_public_bundle(tmp_path / "bundle")
        allowed = frozenset({"mymodels:build"})
        _, back = read_public_bundle(tmp_path / "bundle", allowed_factories=allowed)
        front, mapping = open_enclave_parts(tmp_path / "bundle", load_model_key(key_file), owner.public_key(),
                                            allowed_factories=allowed)
        assert mapping.labels == ("a", "b", "c", "d")
        x = torch.randn(5, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(front(x), ref.run(x, 0, 2))
            assert torch.allclose(mapping.to_original(back(front(x))), ref(x), rtol=0, atol=1e-5)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodels", None)


def test_refusal_is_one_line_exit_2_and_writes_nothing(tmp_path):
    r = _run(["partition", "darknet", "--at", "13", "--out", "b", "--untrained"], tmp_path,
             {"ENCLAVEML_HOME": str(tmp_path / "home")})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "out of range" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_trained_zoo_model_if_available(tmp_path):
    name = "darknet"
    if not zoo.entry(name).weights_path.exists():
        pytest.skip("darknet has no trained weights yet")
    r = _run(["partition", name, "--at", "4", "--out", "b", "--owner-key", "o.key"], tmp_path)
    assert r.returncode == 0, r.stderr
    ref = zoo.load(name)
    _, back = read_public_bundle(tmp_path / "b")
    front, mapping = open_enclave_parts(tmp_path / "b", load_model_key(tmp_path / "b.modelkey"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = mapping.to_original(back(front(x)))
        assert torch.equal(logits.argmax(1), ref(x).argmax(1))
        assert torch.allclose(logits, ref(x), rtol=0, atol=1e-4)


# In-process checks of each refusal (fast): the exception type is what the CLI prints as one line.
@pytest.fixture()
def cli(tmp_path, monkeypatch):
    from enclaveml.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, ["partition", *map(str, args)])
    return invoke


@pytest.mark.parametrize("args,exc,words", [
    (["darknet", "--out", "b", "--untrained"], UserInputError, "--at K"),
    (["nosuch", "--at", "3", "--out", "b"], UnknownModel, "unknown zoo model"),
    (["darknet", "--at", "0", "--out", "b", "--untrained"], PartitionError, "out of range"),
    (["darknet", "--assessment", "missing.json", "--out", "b", "--untrained"], UserInputError, "cannot read"),
    (["darknet", "--assessment", "bad.json", "--out", "b", "--untrained"], UserInputError, "recommended"),
    (["darknet", "--assessment", "leaky.json", "--at", "2", "--out", "b", "--untrained"], UserInputError, "shallower"),
    (["darknet", "--assessment", "other.json", "--out", "b", "--untrained"], UserInputError, "not 'darknet'"),
    (["darknet", "--assessment", "none.json", "--out", "b", "--untrained"], UserInputError, "recommends no"),
    (["mymod:build", "--at", "1", "--out", "b"], UserInputError, "--weights"),
])
def test_refusals(cli, tmp_path, args, exc, words):
    (tmp_path / "bad.json").write_text('{"points": []}')
    (tmp_path / "leaky.json").write_text('{"recommended": 5}')
    (tmp_path / "other.json").write_text('{"recommended": 5, "model": "densenet"}')
    (tmp_path / "none.json").write_text('{"recommended": null}')
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli(*args)
    assert isinstance(r.exception, exc), r.output
    assert words in str(r.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_assessment_default_and_existing_outputs(cli, tmp_path):
    (tmp_path / "a.json").write_text('{"recommended": 3, "model": "densenet"}')
    r = cli("densenet", "--assessment", "a.json", "--out", "b", "--untrained", "--owner-key", "o.key")
    assert r.exit_code == 0, r.output
    assert load_manifest(tmp_path / "b").k == 3
    # deeper than recommended is allowed; an existing bundle or key is never overwritten
    r = cli("densenet", "--assessment", "a.json", "--at", "6", "--out", "b", "--untrained", "--owner-key", "o.key")
    assert isinstance(r.exception, UserInputError) and "already exists" in str(r.exception)
    (tmp_path / "c.modelkey").write_text("x")
    r = cli("densenet", "--at", "6", "--out", "c", "--untrained", "--owner-key", "o.key")
    assert isinstance(r.exception, UserInputError) and not (tmp_path / "c").exists()
    r = cli("densenet", "--assessment", "a.json", "--at", "6", "--out", "d", "--untrained", "--owner-key", "o.key")
    assert r.exit_code == 0 and load_manifest(tmp_path / "d").k == 6


def test_inspect_verifies_bundle(cli, tmp_path):
    from enclaveml.cli import app
    from enclaveml.errors import TamperedMessage

    r = cli("densenet", "--at", "2", "--out", "b", "--untrained", "--owner-key", "o.key")
    assert r.exit_code == 0, r.output
    fp = keyfiles.load_signing_key(tmp_path / "o.key").public_key().fingerprint()
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", "b", "--owner", fp[:16]])
    assert r.exit_code == 0 and fp in r.output and "k=2" in r.output
    r = runner.invoke(app, ["inspect", "b", "--owner", "0" * 16])
    assert isinstance(r.exception, TamperedMessage)
    data = bytearray((tmp_path / "b" / "frontnet.sealed").read_bytes())
    data[-1] ^= 1
    (tmp_path / "b" / "frontnet.sealed").write_bytes(bytes(data))
    r = runner.invoke(app, ["inspect", "b"])
    assert isinstance(r.exception, TamperedMessage) and "frontnet.sealed" in str(r.exception)
