"""Model identity against an active host (issue 9): each test is the attack as the host would run it.

The host controls the server process, its store and its routing. It may wipe the store and
redeploy the same public zoo model split at k=1 under the owner's name, squat the name first,
route a request to another deployment, loosen the pin it relays, or match a zoo bundle's final
rows against the published weights. The client's pin (owner key, bundle ids, smallest k), checked
before any image leaves and again inside the enclave, must defeat each of these.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from enclaveml import errors as E
from enclaveml.client import EnclaveClient
from enclaveml.crypto import SigningKey, frame_fresh, seal_key_release
from enclaveml.models import zoo
from enclaveml.models.bundle import bundle_files, make_bundle, open_enclave_parts, read_public_bundle
from enclaveml.models.classmap import ClassMapping
from enclaveml.models.public_weights import match_rows
from enclaveml.protocol import ModelIdentity, ModelPin, ModelRef, Target
from enclaveml.protocol import infer as protocol
from enclaveml.serve.enclave import EnclaveService
from enclaveml.serve.launcher import ServerProcess, local_sim_policy, server_env, snapshot_package
from enclaveml.tee import get_backend
from enclaveml.tee.policy import load_policy, write_policy

MODEL = "darknet"
ENTRY = zoo.entry(MODEL)


def _hex(key: SigningKey) -> str:
    return key.public_key().to_bytes().hex()


def _bundle(path: Path, owner: SigningKey, k: int, head: int = 0, pretrained: bool = False, name: str = MODEL):
    torch.manual_seed(0)
    model = zoo.load(MODEL, pretrained=pretrained)
    manifest, key = make_bundle(model, k, path, {"zoo": MODEL}, ENTRY.preprocessing, list(ENTRY.classes), owner,
                                name=name, head=head)
    return model, manifest, key


def _deploy(svc: EnclaveService, owner: SigningKey, name: str, key: bytes, files: dict, nonce: bytes) -> dict:
    nonce = svc.issue_nonce(nonce)
    return svc.deploy(name, seal_key_release(owner, svc.public_key(), name, key, nonce), files)


def _seal(svc: EnclaveService, target: Target, images, top_k: int = 3, logits: bool = True):
    return protocol.seal_infer(svc.public_key(), target, frame_fresh(protocol.encode_payload(images, top_k, logits)))


@pytest.fixture()
def svc(tmp_path):
    torch.set_num_threads(1)
    return EnclaveService(get_backend("sim", platform_dir=tmp_path / "platform", lock_memory=False))


def _image(cifar10_dir: Path, cls: str = "cat", i: int = 0) -> bytes:
    return sorted((cifar10_dir / "test" / cls).glob("*.jpg"))[i].read_bytes()


# -- in the enclave (sans-I/O) -----------------------------------------------------------------

def test_the_enclave_refuses_a_deployment_its_pin_does_not_accept_before_decoding(svc, tmp_path):
    owner = SigningKey.generate()
    _, manifest, key = _bundle(tmp_path / "b", owner, k=2)
    _deploy(svc, owner, MODEL, key, bundle_files(tmp_path / "b"), b"nonce-0000000001")
    ref = ModelRef(_hex(owner), MODEL)
    junk = b"not an image at all"  # a decode would say DataError: the pin check must come first
    for pin, why in ((ModelPin(ref.owner, (manifest.bundle_id,), 5), "shallower than the pinned minimum k=5"),
                     (ModelPin(ref.owner, ("ab" * 16,), 1), "not among the pinned bundle ids")):
        body, _, _ = _seal(svc, Target(ref, pin), junk)
        with pytest.raises(E.PolicyViolation, match=why):
            svc.front(str(ref), body)
    body, _, _ = _seal(svc, Target(ref, ModelPin(ref.owner, (manifest.bundle_id,), 2)), junk)
    with pytest.raises(E.DataError):  # the pinned deployment itself: now the image is decoded (and refused)
        svc.front(str(ref), body)


def test_a_request_routed_by_the_host_to_another_deployment_is_refused(svc, tmp_path):
    """The host sends the client's request (for the owner's darknet) to its own darknet at k=1."""
    owner, mallory = SigningKey.generate(), SigningKey.generate()
    _bundle(tmp_path / "o", owner, k=6)
    _, _, mkey = _bundle(tmp_path / "m", mallory, k=1)
    _, okey = make_bundle(zoo.load(MODEL, pretrained=False), 6, tmp_path / "o2", {"zoo": MODEL}, ENTRY.preprocessing,
                          list(ENTRY.classes), owner)
    _deploy(svc, mallory, MODEL, mkey, bundle_files(tmp_path / "m"), b"nonce-0000000002")
    _deploy(svc, owner, MODEL, okey, bundle_files(tmp_path / "o2"), b"nonce-0000000003")
    oref, mref = ModelRef(_hex(owner), MODEL), ModelRef(_hex(mallory), MODEL)
    assert svc.models() == sorted([str(oref), str(mref)])  # squatting first blocked nothing
    target = Target(oref, ModelPin(oref.owner))
    body, _, _ = _seal(svc, target, b"x")
    with pytest.raises(E.TamperedMessage, match="another deployment"):
        svc.front(str(mref), body)
    msg, _ = protocol.seal_infer(svc.public_key(), target, frame_fresh(b""))[:2]
    with pytest.raises(E.TamperedMessage):
        svc.identity(str(mref), msg)


def test_the_identity_answer_is_sealed_to_the_client_and_names_the_deployment(svc, tmp_path):
    from enclaveml.crypto import seal_request
    from enclaveml.protocol import decode_identity, frame_target, identity_aad

    owner = SigningKey.generate()
    _, manifest, key = _bundle(tmp_path / "b", owner, k=4, head=1)
    _deploy(svc, owner, MODEL, key, bundle_files(tmp_path / "b"), b"nonce-0000000004")
    target = Target(ModelRef(_hex(owner), MODEL), ModelPin(_hex(owner)))
    raw = target.to_bytes()
    msg, ctx = seal_request(svc.public_key(), frame_fresh(b""), identity_aad(raw))
    sealed = svc.identity(str(target.ref), frame_target(target, msg))
    ident = decode_identity(ctx.open_response(sealed, identity_aad(raw)))
    assert ident == ModelIdentity(_hex(owner), MODEL, manifest.bundle_id, 4, 1)
    _, other_ctx = seal_request(svc.public_key(), frame_fresh(b""), identity_aad(raw))
    with pytest.raises(E.TamperedMessage):  # a host replaying an identity answer to another client
        other_ctx.open_response(sealed, identity_aad(raw))
    with pytest.raises(E.ReplayedMessage):  # the same identity request twice
        svc.identity(str(target.ref), frame_target(target, msg))


def test_row_matching_recovers_the_class_order_of_a_zoo_bundle_and_the_head_defeats_it(svc, tmp_path, cifar10_dir):
    """With the zoo's published weights the class mapping hides nothing from a host holding the
    BackNet: nearest-row matching recovers the secret order exactly, even after noise of twice the
    weights' spread. With `--head 1` the BackNet holds no class rows and its outputs are not scores."""
    owner = SigningKey.generate()
    model, _, key = _bundle(tmp_path / "plain", owner, k=10, pretrained=True)
    published = model.layers.fc.weight.detach()
    _, back = read_public_bundle(tmp_path / "plain")
    host_rows = back.fc.weight.detach()
    secret = list(open_enclave_parts(tmp_path / "plain", key).mapping.permutation)
    assert match_rows(published, host_rows) == secret
    g = torch.Generator().manual_seed(0)
    noisy = host_rows + 2 * published.std() * torch.randn(host_rows.shape, generator=g)
    assert match_rows(published, noisy) == secret

    model, manifest, key = _bundle(tmp_path / "head", owner, k=10, head=1, pretrained=True)
    _, back = read_public_bundle(tmp_path / "head")
    assert not any(name.startswith("fc.") for name in back.state_dict())  # no class rows on the host
    _deploy(svc, owner, MODEL, key, bundle_files(tmp_path / "head"), b"nonce-0000000005")
    target = Target(ModelRef(_hex(owner), MODEL), ModelPin(_hex(owner), (manifest.bundle_id,), 10))
    images = [_image(cifar10_dir, c) for c in ("cat", "ship", "frog")]
    body, ctx, aad = _seal(svc, target, images)
    handle, ir = svc.front(str(target.ref), body)
    with torch.no_grad():
        host_out = back(ir)
        ref = model(torch.stack([ENTRY.preprocessing(i) for i in images]))
    assert host_out.shape[1] != ENTRY.classes.__len__()  # the host sees features, not class scores
    res = protocol.decode_results(ctx.open_response(svc.finish(handle, host_out), aad), 3, expected=target)
    got = torch.tensor([r["logits"] for r in res])
    assert torch.allclose(got, ref, atol=1e-5) and all(r["head"] == 1 and r["k"] == 10 for r in res)


def test_partition_warns_when_the_weights_are_the_zoos_own(tmp_path):
    env = server_env(tmp_path / "home")

    def partition(*extra):
        return subprocess.run([sys.executable, "-m", "enclaveml", "partition", MODEL, "--at", "10", *extra],
                              env=env, capture_output=True, text=True, timeout=120)

    r = partition("--out", str(tmp_path / "pub"))
    assert r.returncode == 0 and "warning: this model's weights are the zoo's published ones" in r.stderr
    assert "--head N" in r.stderr
    r = partition("--out", str(tmp_path / "untrained"), "--untrained")
    assert r.returncode == 0 and "warning" not in r.stderr
    r = partition("--out", str(tmp_path / "head"), "--head", "1")
    assert r.returncode == 0 and "head       enclave also runs fc" in r.stdout
    r = partition("--out", str(tmp_path / "nohost"), "--head", "3")  # k + head leaves no BackNet layer
    assert r.returncode != 0 and "leaves no BackNet layer" in r.stderr


def test_the_sealed_class_map_size_does_not_reveal_label_lengths():
    short = ClassMapping([1, 0, 2], ["a", "b", "c"])
    long = ClassMapping([2, 0, 1], ["x" * 256, "\"\\" * 128, "\u00e9" * 128])
    assert len(short.to_bytes()) == len(long.to_bytes())
    assert ClassMapping.from_bytes(long.to_bytes()).labels == long.labels
    for bad in (["x" * 257, "b", "c"], ["tab\there", "b", "c"]):
        with pytest.raises(E.UserInputError):
            ClassMapping([0, 1, 2], bad)


def test_policy_pins_round_trip_and_fail_closed(tmp_path):
    from enclaveml.tee import Policy

    p = Policy(allowed_backends=["sim"], models={MODEL: {"owner": "AB" * 32, "bundle_ids": ["cd" * 16], "min_k": 9}})
    write_policy(p, tmp_path / "p.toml")
    q = load_policy(tmp_path / "p.toml")
    assert q.pin(MODEL) == ModelPin("ab" * 32, ("cd" * 16,), 9)
    with pytest.raises(E.PolicyViolation, match="pins no model named 'other'"):
        q.pin("other")
    for bad in ({"owner": "zz"}, {"owner": "ab" * 32, "min_k": 0}, {"owner": "ab" * 32, "bundle_ids": "cd"},
                {"owner": "ab" * 32, "colour": 1}, {"bundle_ids": []}):
        with pytest.raises(E.UserInputError):
            Policy(models={MODEL: bad})


# -- against a real server: the store-wipe substitution ------------------------------------------

def test_substitution_after_a_store_wipe_is_refused_before_any_image_leaves(tmp_path, cifar10_dir):
    """The issue's attack: the owner deploys darknet at k=10 and hands out a pinned policy; the host
    restarts its server on an empty store (same platform), deploys the same public model split at
    k=1 under the name darknet with its own key, and reroutes the client's requests to it."""
    home = tmp_path / "home"
    pkg = snapshot_package(tmp_path / "pkg")
    owner, mallory = SigningKey.generate(), SigningKey.generate()
    _, _, key = _bundle(tmp_path / "owner-bundle", owner, k=10)
    _, _, mkey = _bundle(tmp_path / "host-bundle", mallory, k=1)
    write_policy(local_sim_policy(home, pkg), tmp_path / "policy.toml")
    r = subprocess.run([sys.executable, "-m", "enclaveml", "attest", "pin", str(tmp_path / "owner-bundle"),
                        "--policy", str(tmp_path / "policy.toml")], env=server_env(home, pkg),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    images = [_image(cifar10_dir, "dog", i) for i in range(2)]
    with ServerProcess(tmp_path / "store1", tmp_path / "s1.log", env=server_env(home, pkg)) as srv:
        with EnclaveClient(srv.url, local_sim_policy(home, pkg)) as c:
            c.deploy(tmp_path / "owner-bundle", key, owner)
        with EnclaveClient(srv.url, tmp_path / "policy.toml") as c:
            assert len(c.infer(images, model=MODEL)) == 2  # the owner's model, as pinned

    with ServerProcess(tmp_path / "wiped-store", tmp_path / "s2.log", env=server_env(home, pkg)) as srv:
        with EnclaveClient(srv.url, local_sim_policy(home, pkg)) as host:
            host.deploy(tmp_path / "host-bundle", mkey, mallory, model_id=MODEL)  # the squatter's darknet, k=1
        with EnclaveClient(srv.url, tmp_path / "policy.toml") as c:
            with pytest.raises(E.UnknownModel, match="no model"):
                c.infer(images, model=MODEL)  # the identity query finds no darknet of the pinned owner
            # A host that reroutes the client's identity query and requests to its own deployment:
            target = c.target(MODEL)
            att = c.attest()
            body, _, _ = protocol.seal_infer(att.public_key, target, frame_fresh(protocol.encode_payload(images[0])))
            mref = ModelRef(_hex(mallory), MODEL)
            for route in ("identity", "infer"):
                resp = httpx.post(f"{srv.url}/v1/models/{mref}/{route}", content=body, timeout=60)
                assert resp.status_code == 400 and resp.json()["error"] == "TamperedMessage"
            metrics = c.metrics()
        served = sum(x["value"] for x in metrics["counters"]
                     if x["name"] == "inferences_total" and x["labels"].get("outcome") == "ok")
        assert served == 0  # no image of the client's ever reached the substitute's FrontNet

    # The CLI says so in one line and exits 2.
    (tmp_path / "x.jpg").write_bytes(images[0])
    with ServerProcess(tmp_path / "wiped-store", tmp_path / "s3.log", env=server_env(home, pkg)) as srv:
        r = subprocess.run([sys.executable, "-m", "enclaveml", "infer", str(tmp_path / "x.jpg"), "--url", srv.url,
                            "--policy", str(tmp_path / "policy.toml")], env=server_env(home, pkg),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
