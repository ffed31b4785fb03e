"""Model cards (model.json beside the weights) replace flags for assess, partition and serve;
`attest policy --allow-factory/--card` pins the measurement of a server that allows that factory."""

from __future__ import annotations

import json

import pytest
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from enclaveml.errors import UserInputError
from enclaveml.models import examples
from enclaveml.models.card import find_card, read_card
from enclaveml.models.loading import load_model

SPEC = "enclaveml.models.examples:resnet_cifar"


def _card(tmp_path, **fields):
    (tmp_path / "model.json").write_text(json.dumps(fields))
    return tmp_path / "model.json"


def test_a_card_beside_the_weights_replaces_input_size_preprocessing_and_classes(tmp_path):
    m = examples.resnet_cifar()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    _card(tmp_path, input_size="3x32x32", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
          classes=[f"c{i}" for i in range(10)], factory=SPEC)
    assert find_card(tmp_path / "w.safetensors") == tmp_path / "model.json"
    lm, pre, classes = load_model(SPEC, str(tmp_path / "w.safetensors"))  # no --input-size, --mean, --std
    assert lm.input_shape == (3, 32, 32) and classes == [f"c{i}" for i in range(10)]
    assert pre.mean == (0.5,) * 3 and pre.std == (0.25,) * 3
    # flags win over the card
    _, pre, _ = load_model(SPEC, str(tmp_path / "w.safetensors"), mean=[0, 0, 0], std=[1, 1, 1])
    assert pre.mean == (0.0,) * 3


def test_raw_pixel_cards_and_class_files(tmp_path):
    (tmp_path / "names.txt").write_text("cat\ndog\n\n")
    c = read_card(_card(tmp_path, pixels="0-255", mean=[127, 127, 127], std=[128, 128, 128],
                        classes_file="names.txt", input_size=[3, 224, 224]))
    assert c.mean == pytest.approx((127 / 255,) * 3) and c.std == pytest.approx((128 / 255,) * 3)
    assert c.classes == ("cat", "dog") and c.input_size == (3, 224, 224)


@pytest.mark.parametrize("fields,words", [
    ({"inputsize": "3x32x32"}, "unknown model card field"),
    ({"mean": [0, 0, 0]}, "go together"),
    ({"mean": [0, 0], "std": [1, 1]}, "three numbers"),
    ({"pixels": "0-65535"}, "pixels"),
    ({"input_size": [1, 32, 32]}, "input_size"),
    ({"classes": []}, "classes"),
    ({"factory": "os.system"}, "package.module:function"),
])
def test_bad_cards_are_one_line(tmp_path, fields, words):
    with pytest.raises(UserInputError, match=words):
        read_card(_card(tmp_path, **fields))


@pytest.fixture(scope="module")
def attest_app() -> typer.Typer:
    from enclaveml.tee import commands

    a = typer.Typer()

    @a.callback()
    def _root() -> None:
        pass

    commands.register(a)
    return a


def test_attest_policy_derives_the_enclave_configuration_the_way_serve_does(attest_app, tmp_path):
    from enclaveml.models.servable import enclave_config
    from enclaveml.tee.sim import SimBackend, expected_sim_measurement

    # what `serve --allow-factory SPEC` measures: the worker's backend with enclave_config([SPEC])
    served = SimBackend(config=enclave_config([SPEC]), lock_memory=False).measurement()
    assert served != expected_sim_measurement({})
    r = CliRunner().invoke(attest_app, ["attest", "measure", "--allow-factory", SPEC])
    assert r.exit_code == 0 and r.output.strip() == served
    out = tmp_path / "policy.toml"
    r = CliRunner().invoke(attest_app, ["attest", "policy", "--card", str(_card(tmp_path, factory=SPEC)), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert served in out.read_text()
    r = CliRunner().invoke(attest_app, ["attest", "policy", "--allow-factory", SPEC, "--config",
                                        json.dumps({"allowed_factories": [SPEC]})])
    assert isinstance(r.exception, UserInputError) and "not both" in str(r.exception)
