"""Model bundles: the partitioned model computes what the whole model computes; parts are bound."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from enclaveml.crypto import SigningKey, generate_key
from enclaveml.errors import PartitionError, TamperedMessage, UserInputError
from enclaveml.models import zoo
from enclaveml.models.bundle import (BACKNET, CLASSMAP, FRONTNET, MANIFEST, SIGNATURE, build_arch, bundle_files,
                                     load_manifest, make_bundle, open_enclave_parts, read_public_bundle)
from enclaveml.models.classmap import ClassMapping


@pytest.fixture(scope="module")
def owner() -> SigningKey:
    return SigningKey.generate()


def _model(name: str):
    torch.manual_seed(0)
    m = zoo.load(name, pretrained=False)
    # non-trivial batch-norm statistics, so that a wrong or missing buffer would show
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _upto_last(seq, x):
    for layer in list(seq)[:-1]:
        x = layer(x)
    return x


def _bundle(tmp_path, owner, name="darknet", k=4, sub="b"):
    m = _model(name)
    e = zoo.entry(name)
    man, key = make_bundle(m, k, tmp_path / sub, {"zoo": name}, e.preprocessing, list(e.classes), owner)
    return m, man, key, tmp_path / sub


@pytest.mark.parametrize("name,k", [("darknet", 1), ("darknet", 7), ("darknet", 12), ("densenet", 5), ("extraction", 14)])
def test_partitioned_model_matches_whole_model(tmp_path, owner, name, k):
    m, man, key, d = _bundle(tmp_path, owner, name, k)
    manifest, back = read_public_bundle(d, expected_owner=owner.public_key())
    front, mapping = open_enclave_parts(d, key, expected_owner=owner.public_key())
    assert manifest == man and manifest.k == k and manifest.layers == m.names
    assert len(front) == k and len(back) == len(m) - k
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref_front, ref_back = m.split(k)
        ir = front(x)
        assert tuple(ir.shape[1:]) == manifest.ir_shape
        assert torch.equal(ir, ref_front(x))  # FrontNet: bit-identical
        assert torch.equal(_upto_last(back, ir), _upto_last(ref_back, ir))  # BackNet up to fc: bit-identical
        host = back(ir)
        full = m(x)
        logits = mapping.to_original(host)
    # last layer: exactly the original rows, permuted
    assert torch.equal(back[-1].weight, m.layers[-1].weight[list(mapping.permutation)])
    assert torch.equal(mapping.to_original(back[-1].bias), m.layers[-1].bias)
    # the GEMM on permuted rows may round differently in the last bit (BLAS tiling), nothing more
    assert torch.allclose(logits, full, rtol=0, atol=1e-5)
    assert torch.equal(logits.argmax(1), full.argmax(1))
    assert not torch.allclose(host, full)  # the host sees scores in the secret order


def test_bundle_layout_and_public_parts(tmp_path, owner):
    m, man, key, d = _bundle(tmp_path, owner)
    assert sorted(p.name for p in d.iterdir()) == sorted([MANIFEST, SIGNATURE, BACKNET, FRONTNET, CLASSMAP])
    meta = json.loads((d / MANIFEST).read_text())
    assert meta["arch"] == {"zoo": "darknet"} and meta["k"] == 4 and meta["num_classes"] == 10
    assert meta["owner"] == owner.public_key().to_bytes().hex()
    assert set(meta["parts"]) == {BACKNET, FRONTNET, CLASSMAP}
    assert len(key) == 32 and key not in b"".join(bundle_files(d).values())
    # the FrontNet weights are not in any public file
    w = m.layers[0][0].weight.detach().numpy().tobytes()[:64]
    for f in d.iterdir():
        assert w not in f.read_bytes()
    # the labels and permutation are sealed; the manifest carries no label names
    assert b"airplane" not in (d / MANIFEST).read_bytes() and b"airplane" not in (d / CLASSMAP).read_bytes()
    assert "permutation" not in repr(open_enclave_parts(d, key)[1])


def test_wrong_model_key_fails(tmp_path, owner):
    _, _, _, d = _bundle(tmp_path, owner)
    with pytest.raises(TamperedMessage):
        open_enclave_parts(d, generate_key())


def test_swapped_parts_between_bundles_fail(tmp_path, owner):
    m = _model("darknet")
    e = zoo.entry("darknet")
    key = generate_key()  # even under the SAME model key, parts are bound to their bundle
    make_bundle(m, 4, tmp_path / "a", {"zoo": "darknet"}, e.preprocessing, list(e.classes), owner, model_key=key)
    make_bundle(m, 4, tmp_path / "b", {"zoo": "darknet"}, e.preprocessing, list(e.classes), owner, model_key=key)
    for part in (FRONTNET, CLASSMAP):
        files = bundle_files(tmp_path / "a")
        files[part] = (tmp_path / "b" / part).read_bytes()
        with pytest.raises(TamperedMessage):
            open_enclave_parts(files, key)
    # swapping the two sealed parts inside one bundle also fails, even with a re-signed manifest
    files = bundle_files(tmp_path / "a")
    man = load_manifest(files)
    from enclaveml.models.bundle import MANIFEST_LABEL
    parts = dict(man.parts)
    parts[FRONTNET], parts[CLASSMAP] = parts[CLASSMAP], parts[FRONTNET]
    files[FRONTNET], files[CLASSMAP] = files[CLASSMAP], files[FRONTNET]
    from dataclasses import replace
    raw = replace(man, parts=parts).to_json()
    files[MANIFEST] = raw
    files[SIGNATURE] = json.dumps({"alg": "Ed25519", "owner": owner.public_key().to_bytes().hex(),
                                   "signature": owner.sign(MANIFEST_LABEL + raw).hex()}).encode()
    with pytest.raises(TamperedMessage):
        open_enclave_parts(files, key)


@pytest.mark.parametrize("part", [MANIFEST, SIGNATURE, BACKNET, FRONTNET, CLASSMAP])
def test_tampered_part_fails(tmp_path, owner, part):
    _, _, key, d = _bundle(tmp_path, owner)
    files = bundle_files(d)
    data = bytearray(files[part])
    data[len(data) // 2] ^= 0x01
    files[part] = bytes(data)
    with pytest.raises(TamperedMessage):
        if part == BACKNET:
            read_public_bundle(files)
        else:
            open_enclave_parts(files, key)


def test_manifest_resigned_by_another_owner(tmp_path, owner):
    _, _, key, d = _bundle(tmp_path, owner)
    mallory = SigningKey.generate()
    files = bundle_files(d)
    from enclaveml.models.bundle import MANIFEST_LABEL
    files[SIGNATURE] = json.dumps({"alg": "Ed25519", "owner": mallory.public_key().to_bytes().hex(),
                                   "signature": mallory.sign(MANIFEST_LABEL + files[MANIFEST]).hex()}).encode()
    with pytest.raises(TamperedMessage):
        open_enclave_parts(files, key)  # manifest names the owner, signer differs
    with pytest.raises(TamperedMessage):
        load_manifest(bundle_files(d), expected_owner=mallory.public_key())


def test_bad_inputs_write_nothing(tmp_path, owner):
    m = _model("darknet")
    e = zoo.entry("darknet")
    for k in (0, len(m), -1):
        with pytest.raises(PartitionError):
            make_bundle(m, k, tmp_path / "x", {"zoo": "darknet"}, e.preprocessing, list(e.classes), owner)
    with pytest.raises(UserInputError):
        make_bundle(m, 3, tmp_path / "x", {"zoo": "darknet"}, e.preprocessing, ["a", "b"], owner)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserInputError):
        make_bundle(m, 3, tmp_path / "full", {"zoo": "darknet"}, e.preprocessing, list(e.classes), owner)


FACTORY = "enclaveml.models.zoo.extraction:build"


def test_factory_arch_only_when_the_caller_allows_it(tmp_path, owner):
    m = zoo.load("extraction", pretrained=False)
    e = zoo.entry("extraction")
    arch = {"factory": FACTORY, "kwargs": {"num_classes": 10}}
    man, key = make_bundle(m, 3, tmp_path / "f", arch, e.preprocessing, list(e.classes), owner)
    # the default (what a host or enclave gets unless its configuration names the factory): refused
    with pytest.raises(UserInputError, match="not allowed by this enclave's configuration"):
        open_enclave_parts(tmp_path / "f", key)
    with pytest.raises(UserInputError, match="not allowed"):
        read_public_bundle(tmp_path / "f")
    with pytest.raises(UserInputError, match="not allowed"):
        open_enclave_parts(tmp_path / "f", key, allowed_factories={"enclaveml.models.zoo.darknet:build"})
    with pytest.raises(TypeError):  # one string is not a set of names
        open_enclave_parts(tmp_path / "f", key, allowed_factories=FACTORY)
    front, mapping = open_enclave_parts(tmp_path / "f", key, allowed_factories=frozenset({FACTORY}))
    _, back = read_public_bundle(tmp_path / "f", allowed_factories={FACTORY})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(front(x), m.split(3)[0](x))
        assert torch.allclose(mapping.to_original(back(front(x))), m(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", [
    {"factory": "os:makedirs", "kwargs": {"name": "x"}},  # not in the allow-list
    {"factory": FACTORY, "kwargs": {"num_classes": [10]}},  # kwargs must be scalars
    {"factory": FACTORY, "kwargs": {"num_classes": {"a": 1}}},
    {"factory": FACTORY, "kwargs": {"__class__": 1}},
    {"factory": FACTORY, "kwargs": {"not an identifier": 1}},
    {"factory": FACTORY, "kwargs": {"no_such_kwarg": 1}},  # an allowed factory that fails: still UserInputError
    {"factory": FACTORY, "kwargs": [1]},
    {"factory": "os.system"}, {"factory": "a:b:c"}, {"factory": ":b"}, {"factory": 5},
    {"zoo": "darknet", "factory": FACTORY}, {"zoo": 5}, {"zoo": "no-such-model"}, {}, [], "darknet",
])
def test_build_arch_refuses_everything_but_zoo_and_allowed_factories(arch):
    with pytest.raises(UserInputError):
        build_arch(arch, (3, 32, 32), 10, allowed_factories={FACTORY})


def test_build_arch_kwargs_reach_an_allowed_factory():
    m = build_arch({"factory": FACTORY, "kwargs": {"num_classes": 7}}, allowed_factories={FACTORY})
    assert m.num_classes == 7
    assert build_arch({"zoo": "darknet"}).num_classes == 10  # zoo: no allow-list needed


def test_make_bundle_refuses_an_arch_no_reader_would_build(tmp_path, owner):
    m = zoo.load("extraction", pretrained=False)
    e = zoo.entry("extraction")
    with pytest.raises(UserInputError, match="plain JSON scalar"):
        make_bundle(m, 3, tmp_path / "f", {"factory": FACTORY, "kwargs": {"num_classes": [10]}}, e.preprocessing,
                    list(e.classes), owner)
    assert not (tmp_path / "f").exists()


def test_classmap_round_trip_and_validation():
    cm = ClassMapping.random(10, [f"c{i}" for i in range(10)])
    assert sorted(cm.permutation) == list(range(10)) and list(cm.permutation) != list(range(10))
    again = ClassMapping.from_bytes(cm.to_bytes())
    assert again == cm
    s = torch.randn(3, 10)
    assert torch.equal(cm.to_original(cm.to_host(s)), s)
    assert cm.to_host(s)[0, cm.host_index(7)] == s[0, 7]
    with pytest.raises(UserInputError):
        ClassMapping([0, 0, 1], ["a", "b", "c"])
    with pytest.raises(TamperedMessage):
        ClassMapping.from_bytes(b'{"v":1,"permutation":[1,1],"labels":["a","b"]}')
    fc = torch.nn.Linear(4, 10)
    pfc = cm.permute_linear(fc)
    x = torch.randn(5, 4)
    assert torch.allclose(cm.to_original(pfc(x)), fc(x), atol=1e-6)


def test_model_key_file(tmp_path):
    from enclaveml.models.bundle import load_model_key, model_key_path, save_model_key

    key = generate_key()
    path = model_key_path(tmp_path / "bundles" / "darknet")
    assert path == tmp_path / "bundles" / "darknet.modelkey"
    (tmp_path / "bundles").mkdir()
    save_model_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_model_key(path) == key
    with pytest.raises(UserInputError):
        save_model_key(path, generate_key())  # never overwritten
    assert load_model_key(path) == key
    path.write_text("abcd\n")
    with pytest.raises(UserInputError):
        load_model_key(path)
    with pytest.raises(UserInputError):
        load_model_key(tmp_path / "missing.modelkey")
