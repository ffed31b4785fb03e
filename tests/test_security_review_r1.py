"""Reviewer R1's attacks on the model-identity change (issue 9), one test per finding (F-25..F-28).

Each test is the attack as the active host (or a co-tenant) would run it, and failed on the code
before its fix. docs/security-review.md records each finding.
"""

from __future__ import annotations

import pytest
import torch

from enclaveml import errors as E
from enclaveml.crypto import SigningKey
from enclaveml.models import zoo
from enclaveml.models.bundle import make_bundle
from enclaveml.models.public_weights import classifier_is_public, match_rows
from enclaveml.protocol import ModelIdentity, ModelPin
from enclaveml.protocol import infer as protocol
from enclaveml.tee import Policy

MODEL = "darknet"
ENTRY = zoo.entry(MODEL)
OWNER = "ab" * 32


# -- F-25: the public-weights warning matched exact bytes only --------------------------------

def test_a_near_copy_of_the_zoo_classifier_is_still_called_public():
    """The owner fine-tunes (here: perturbs) or re-saves (fp16) the zoo's classifier. Its bytes
    differ, so an exact-digest check stays silent, yet a host holding the BackNet still recovers
    the secret class order by nearest-row matching: `partition` must warn for these too."""
    published = zoo.load(MODEL, pretrained=True).layers.fc
    g = torch.Generator().manual_seed(1)
    for name, change in (("fp16 round trip", lambda w: w.half().float()),
                         ("light fine-tune", lambda w: w + 0.05 * w.std() * torch.randn(w.shape, generator=g)),
                         ("heavy noise", lambda w: w + 1.0 * w.std() * torch.randn(w.shape, generator=g))):
        near = torch.nn.Linear(published.in_features, published.out_features)
        with torch.no_grad():
            near.weight.copy_(change(published.weight))
        perm = torch.randperm(near.out_features, generator=g)
        assert match_rows(published.weight.detach(), near.weight.detach()[perm]) == perm.tolist()  # the attack works
        assert classifier_is_public(near), name
    assert classifier_is_public(published)
    for seed in (1, 2, 3):  # fresh heads (seed 0 is the zoo's own training start: its rows still match)
        torch.manual_seed(seed)
        assert not classifier_is_public(zoo.load(MODEL, pretrained=False).layers.fc)


# -- F-26: the padded result size followed the label names' lengths ----------------------------

def test_result_size_does_not_reveal_label_lengths():
    """The host sends its own requests (the pin is public: owner, bundle id and k are in the
    manifest) with every top_k and both logits flags and reads the response sizes: they must not
    tell it how long the secret label names are (F-24 padded the class map for the same reason)."""
    ident = ModelIdentity(OWNER, MODEL, "cd" * 16, 10, 0)
    short = [chr(ord("a") + i) for i in range(10)]
    long = ["x" * 256] * 5 + ["\"" * 256] + ["\u00e9" * 128] * 4
    for top_k in range(1, 11):
        for logits in (False, True):
            assert (protocol.result_size(ident, short, top_k, logits)
                    == protocol.result_size(ident, long, top_k, logits)), (top_k, logits)
            probs = [0.1] * 10
            raw = protocol.encode_result(ident, probs, long, top_k, [0.0] * 10 if logits else None)
            assert len(raw) == protocol.result_size(ident, short, top_k, logits)


# -- F-27: a pin that leaves out bundle_ids or min_k accepted anything ------------------------

def test_a_pin_must_state_its_bundles_and_smallest_k():
    """`[models.darknet] owner = "..."` alone accepted any bundle of that owner at any k (down to
    k=1): every other policy field fails closed, so a pin must say both, `bundle_ids = []` being
    the explicit "any bundle"."""
    for partial in ({"owner": OWNER}, {"owner": OWNER, "bundle_ids": []}, {"owner": OWNER, "min_k": 4}):
        with pytest.raises(E.UserInputError, match="bundle_ids.*min_k|must state"):
            Policy(models={MODEL: partial})
    p = Policy(models={MODEL: {"owner": OWNER, "bundle_ids": [], "min_k": 4}})
    assert p.pin(MODEL) == ModelPin(OWNER, (), 4)
    assert Policy(**{**p.to_dict()}).pin(MODEL) == p.pin(MODEL)  # what to_dict / to_toml write still loads


# -- F-28: `attest pin` silently swapped the owner of an existing pin ------------------------

def test_attest_pin_does_not_swap_the_owner_of_an_existing_pin(tmp_path, capsys):
    """A co-tenant hands the owner (or its CI) a bundle it made under the same model name. `attest
    pin` of it replaced the owner's pin, owner key and all, with one stderr line: from then on the
    client accepted only the co-tenant's darknet. It must refuse unless told `--replace`."""
    from enclaveml.tee.commands import _pin_bundles

    owner, mallory = SigningKey.generate(), SigningKey.generate()
    torch.manual_seed(0)
    model = zoo.load(MODEL, pretrained=False)
    m_owner, _ = make_bundle(model, 10, tmp_path / "owner", {"zoo": MODEL}, ENTRY.preprocessing,
                             list(ENTRY.classes), owner)
    make_bundle(model, 1, tmp_path / "mallory", {"zoo": MODEL}, ENTRY.preprocessing, list(ENTRY.classes), mallory)
    policy = _pin_bundles(Policy(allowed_backends=["sim"]), [tmp_path / "owner"], None, False, None)
    with pytest.raises(E.UserInputError, match="--replace"):
        _pin_bundles(policy, [tmp_path / "mallory"], None, False, None)
    assert policy.pin(MODEL) == ModelPin(m_owner.owner, (m_owner.bundle_id,), 10)
    swapped = _pin_bundles(policy, [tmp_path / "mallory"], None, False, None, replace=True)
    assert swapped.pin(MODEL).owner == mallory.public_key().to_bytes().hex()


# -- F-29: a superseded bundle stayed acceptable, and the host could roll back to it live -----

def test_the_owner_can_retire_a_bundle_the_host_rolls_back_to(tmp_path):
    """The owner deploys darknet at k=2 (bundle A), then moves to k=6 (bundle B) and pins B. The
    host keeps A's sealed record and files and restores A over the live B through the channel (no
    restart, no owner). `attest pin B` only added B to the pin ([A, B], min_k 2), so clients kept
    sending k=2 IRs: the owner needs `attest pin --only` to retire A, and the enclave no longer
    lets `restore` replace a live deployment."""
    from enclaveml.crypto import frame_fresh, seal_key_release
    from enclaveml.models.bundle import bundle_files
    from enclaveml.protocol import ModelRef, Target
    from enclaveml.serve.enclave import EnclaveService
    from enclaveml.tee import get_backend
    from enclaveml.tee.commands import _pin_bundles

    torch.set_num_threads(1)
    svc = EnclaveService(get_backend("sim", platform_dir=tmp_path / "platform", lock_memory=False))
    owner = SigningKey.generate()
    torch.manual_seed(0)
    model = zoo.load(MODEL, pretrained=False)
    keys = {}
    for b, k in (("A", 2), ("B", 6)):
        _, keys[b] = make_bundle(model, k, tmp_path / b, {"zoo": MODEL}, ENTRY.preprocessing, list(ENTRY.classes),
                                 owner)
    sealed = {}
    for i, b in enumerate("AB"):
        nonce = svc.issue_nonce(b"owner-nonce-000" + str(i).encode())
        sealed[b] = svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, keys[b], nonce),
                               bundle_files(tmp_path / b))["sealed"]
    ref = ModelRef(owner.public_key().to_bytes().hex(), MODEL)
    with pytest.raises(E.TamperedMessage, match="already deployed"):  # no live rollback by the host
        svc.restore(str(ref), sealed["A"], bundle_files(tmp_path / "A"))
    assert svc._deployment(ref).k == 6

    # After a worker restart the host picks which record to restore: A. Only the pin can refuse it.
    fresh = EnclaveService(get_backend("sim", platform_dir=tmp_path / "platform", lock_memory=False))
    fresh.restore(str(ref), sealed["A"], bundle_files(tmp_path / "A"))
    base = _pin_bundles(Policy(allowed_backends=["sim"]), [tmp_path / "A"], None, False, None)
    added = _pin_bundles(base, [tmp_path / "B"], None, False, None)
    assert added.pin(MODEL).min_k == 2 and len(added.pin(MODEL).bundle_ids) == 2  # A still accepted
    only = _pin_bundles(base, [tmp_path / "B"], None, False, None, only=True)
    target = Target(ref, only.pin(MODEL))
    body, _, _ = protocol.seal_infer(fresh.public_key(), target, frame_fresh(protocol.encode_payload(b"x", 1)))
    with pytest.raises(E.PolicyViolation, match="not among the pinned bundle ids"):
        fresh.front(str(ref), body)
