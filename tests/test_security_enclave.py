"""Security review (engineer F): the enclave's serving API, driven in-process as a hostile host would.

`EnclaveService` is what the worker exposes on the channel; the host can call every method with
any bytes, in any order, any number of times. These tests play that host: replays inside one batch,
double finishes, forged owner commands, evidence binding, and what response sizes reveal.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest
import torch
from PIL import Image

from enclaveml.crypto import SigningKey, frame_fresh, seal_key_release, seal_owner_command, seal_request
from enclaveml.crypto import suites as S
from enclaveml.errors import (DataError, EvidenceRejected, PolicyViolation, ReplayedMessage, TamperedMessage,
                              UnknownModel, Unauthorized, UserInputError)
from enclaveml.models import zoo
from enclaveml.models.bundle import bundle_files, make_bundle
from enclaveml.protocol import ModelPin, ModelRef, Target
from enclaveml.protocol import infer as protocol
from enclaveml.serve.enclave import EnclaveService
from enclaveml.tee import bind_report_data, verify_evidence
from enclaveml.tee.sim import SimBackend, sim_policy

MODEL = "sec-darknet"
TRUST = (TamperedMessage, ReplayedMessage, DataError, UnknownModel, UserInputError)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("enclave")
    torch.manual_seed(0)
    model = zoo.load("darknet", pretrained=False).eval()
    entry = zoo.entry("darknet")
    owner = SigningKey.generate()
    _, key = make_bundle(model, 3, base / "bundle", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    backend = SimBackend({}, platform_dir=base / "platform", lock_memory=False)
    svc = EnclaveService(backend)
    files = bundle_files(base / "bundle")
    nonce = svc.issue_nonce(b"owner-nonce-0001")
    svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, key, nonce), files)
    global REF
    REF = str(ModelRef(owner.public_key().to_bytes().hex(), MODEL))
    b = io.BytesIO()
    Image.linear_gradient("L").resize((32, 32)).convert("RGB").save(b, "PNG")
    return svc, owner, key, files, backend, base, b.getvalue()


REF = ""  # OWNERHEX/MODEL, set by the fixture


def _request(svc, image: bytes, model: str = MODEL, top_k: int = 1):
    """(request body pinned to the owner's `model`, opener of its answer)."""
    ref = ModelRef(ModelRef.parse(REF).owner, model)
    body, ctx, aad = protocol.seal_infer(svc.public_key(), Target(ref, ModelPin(ref.owner)),
                                         frame_fresh(protocol.encode_payload(image, top_k)))
    return body, lambda resp: ctx.open_response(resp, aad)


def test_evidence_binds_this_enclave_key_and_the_callers_nonce(world):
    svc, _, _, _, backend, base, _ = world
    nonce = b"client-nonce-123"
    ev = svc.evidence(nonce)
    pol = sim_policy({}, base / "platform", measurements={"sim": [backend.measurement()]})
    now = datetime.now(timezone.utc)
    assert verify_evidence(ev, pol, bind_report_data(svc.public_key(), nonce), now=now).backend == "sim"
    with pytest.raises(EvidenceRejected):  # another nonce: a replayed evidence
        verify_evidence(ev, pol, bind_report_data(svc.public_key(), b"client-nonce-124"), now=now)
    with pytest.raises(EvidenceRejected):  # another key: a host that swaps in its own HPKE key
        verify_evidence(ev, pol, bind_report_data(b"\x01" * 32, nonce), now=now)
    for bad in (b"", b"short", b"x" * 129):
        with pytest.raises(DataError):
            svc.evidence(bad)
    for bad in (b"", b"short", b"x" * 65):
        with pytest.raises(DataError):
            svc.issue_nonce(bad)


def test_same_request_twice_in_one_batch_is_served_once(world):
    svc, *_, image = world
    msg, ctx = _request(svc, image)
    out = svc.front_batch(REF, [msg, msg, msg[:-1], b"", b"\x00" * 80])
    ok = [o for o in out if not isinstance(o, Exception)]
    assert len(ok) == 1
    assert isinstance(out[1], ReplayedMessage)
    assert all(isinstance(o, TamperedMessage) for o in out[2:])
    handle, ir, failed = ok[0]
    assert ir.shape[0] == 1 and failed == 0
    resp = svc.finish(handle, torch.zeros(10))
    assert ctx(resp)


def test_default_enclave_answers_an_old_format_request_and_new_requests_are_native(world):
    svc, *_, image = world
    ref = ModelRef.parse(REF)
    framed = frame_fresh(protocol.encode_payload(image, 1))
    old, ctx, aad = protocol.seal_infer(svc.public_key(), Target(ref, ModelPin(ref.owner)), framed, S.LEGACY)
    new, _, _ = protocol.seal_infer(svc.public_key(), Target(ref, ModelPin(ref.owner)), frame_fresh(b"x"))
    assert S.suite_of(new[new.index(S.TAG):]) == S.DEFAULT == S.X25519 and S.TAG not in old
    handle, _ = svc.front(REF, old)
    assert protocol.decode_result(ctx.open_response(svc.finish(handle, torch.zeros(10)), aad))["top"]


def test_an_enclave_that_accepts_only_native_x25519_refuses_pyhpke_and_changes_nothing(world):
    _, owner, key, files, backend, *_, image = world
    svc = EnclaveService(backend, suites=(S.X25519,))
    nonce = svc.issue_nonce(b"owner-nonce-0002")
    with pytest.raises(PolicyViolation, match="does not accept HPKE suite 'x25519-pyhpke' .it accepts x25519."):
        svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, key, nonce, S.LEGACY), files)
    assert svc.models() == []
    svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, key, nonce), files)  # nonce not consumed
    ref = ModelRef(owner.public_key().to_bytes().hex(), MODEL)
    framed = frame_fresh(protocol.encode_payload(image, 1))
    old, _, _ = protocol.seal_infer(svc.public_key(), Target(ref, ModelPin(ref.owner)), framed, S.LEGACY)
    with pytest.raises(PolicyViolation, match="x25519-pyhpke"):
        svc.front(str(ref), old)
    assert len(svc.guard) == 0 and svc.clock.snapshot().get("hpke_open", {}).get("n", 0) == 0
    native, ctx, aad = protocol.seal_infer(svc.public_key(), Target(ref, ModelPin(ref.owner)), framed)
    handle, _ = svc.front(str(ref), native)  # the same framed request id: the refusal recorded nothing
    assert protocol.decode_result(ctx.open_response(svc.finish(handle, torch.zeros(10)), aad))["top"]


def test_a_handle_is_finished_once_and_bad_scores_are_refused(world):
    svc, *_, image = world
    for bad in (torch.zeros(9), torch.zeros(11), torch.full((10,), float("nan")), torch.full((10,), float("inf"))):
        msg, ctx = _request(svc, image)
        handle, _ = svc.front(REF, msg)
        with pytest.raises(DataError):
            svc.finish(handle, bad)
        with pytest.raises(UnknownModel):  # a refused finish consumes the handle (fails closed)
            svc.finish(handle, torch.zeros(10))
    msg, ctx = _request(svc, image)
    handle, _ = svc.front(REF, msg)
    svc.finish(handle, torch.zeros(10))
    with pytest.raises(UnknownModel):  # a second answer to the same request (e.g. with other scores)
        svc.finish(handle, torch.ones(10))
    for bogus in ("", "00" * 12, "../etc", handle.upper()):
        with pytest.raises(UnknownModel):
            svc.finish(bogus, torch.zeros(10))


def test_request_sealed_for_one_model_cannot_be_run_on_another(world):
    svc, *_, image = world
    msg, _ = _request(svc, image, model="other-model")
    with pytest.raises((TamperedMessage, UnknownModel)):
        svc.front(REF, msg)


def test_forged_owner_commands_from_the_host(world):
    svc, owner, key, files, *_ = world
    mallory = SigningKey.generate()
    n1 = svc.issue_nonce(b"host-nonce-00001")
    with pytest.raises(TamperedMessage):  # the owner's signed bundle under a key release by another key
        svc.deploy(MODEL, seal_key_release(mallory, svc.public_key(), MODEL, key, n1), files)
    with pytest.raises(Unauthorized):  # delete a model the host does not own
        svc.delete(REF, seal_owner_command(mallory, svc.public_key(), "delete", MODEL, n1))
    with pytest.raises(TamperedMessage):  # the owner's release for MODEL used for another id
        svc.deploy("another", seal_key_release(owner, svc.public_key(), MODEL, key, n1), files)
    with pytest.raises(ReplayedMessage):  # a nonce this enclave never issued
        svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, key, b"never-issued-nonce"), files)
    with pytest.raises(TamperedMessage):  # a key release used as a delete
        svc.delete(REF, seal_key_release(owner, svc.public_key(), MODEL, key, n1))
    assert svc.models() == [REF]


@pytest.mark.parametrize("junk", [b"", b"\x00", b"\xff" * 31, b"A" * 48, b"\x00" * 4096])
def test_front_and_deploy_on_junk_raise_only_documented_errors(world, junk):
    svc, _, _, files, *_ = world
    for call in (lambda: svc.front(REF, junk), lambda: svc.front("no-such-model", junk),
                 lambda: svc.deploy(MODEL, junk, files), lambda: svc.delete(REF, junk),
                 lambda: svc.front_batch(REF, [junk])):
        try:
            out = call()
        except TRUST:
            continue
        except Exception as e:
            pytest.fail(f"undocumented {type(e).__name__}: {e}")
        assert isinstance(out, list) and all(isinstance(o, TRUST) for o in out)


def test_response_length_does_not_depend_on_the_prediction(world):
    svc, *_, image = world
    lengths = set()
    for cls in range(10):
        msg, _ = _request(svc, image, top_k=1)
        handle, _ = svc.front(REF, msg)
        # the host controls the BackNet scores, so it can try each host-order position as the winner
        scores = torch.zeros(10)
        scores[cls] = 5.0
        lengths.add(len(svc.finish(handle, scores)))
    assert len(lengths) == 1, f"response lengths vary with the predicted class: {sorted(lengths)}"


def test_host_order_scores_do_not_reveal_labels_directly(world):
    """The BackNet's output positions are permuted: position j is not class j for a random mapping
    (it can be for some j by chance, never for all)."""
    svc, *_ = world
    dep = svc._deployment(ModelRef.parse(REF))
    assert list(dep.mapping.permutation) != list(range(10))
    assert "permutation" not in repr(dep) and str(list(dep.mapping.permutation)) not in repr(dep)


def test_a_self_owned_bundle_cannot_run_arbitrary_functions_inside_the_enclave(world, tmp_path):
    svc, *_ = world
    target = tmp_path / "ran-inside-the-enclave"
    model = zoo.load("darknet", pretrained=False).eval()
    entry = zoo.entry("darknet")
    mallory = SigningKey.generate()
    _, key = make_bundle(model, 3, tmp_path / "evil", {"factory": "os:makedirs", "kwargs": {"name": str(target)}},
                         entry.preprocessing, list(entry.classes), mallory)
    nonce = svc.issue_nonce(b"mallory-nonce-01")  # GET /v1/evidence?nonce=... is open to anyone
    try:
        svc.deploy("evil", seal_key_release(mallory, svc.public_key(), "evil", key, nonce), bundle_files(tmp_path / "evil"))
    except Exception:
        pass
    assert not target.exists(), "the enclave called os.makedirs named by an attacker's manifest"


def test_enclave_error_messages_do_not_reveal_plaintext_properties(world):
    import struct
    import zlib

    svc, *_ = world

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4321, 5678, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    msg, _ = _request(svc, png)
    with pytest.raises(DataError) as ei:
        svc.front(REF, msg)
    assert "4321" not in str(ei.value) and "5678" not in str(ei.value), str(ei.value)


def test_sealed_deployments_restore_only_where_and_as_sealed(world, tmp_path):
    """The host keeps `deploy`'s sealed record on its disk and hands it back after a restart; it
    can replay it, move it to another model id, pair it with another bundle, or take it to an
    enclave with other code or another platform. Only the faithful restore works."""
    svc, owner, key, files, backend, base, image = world
    nonce = svc.issue_nonce(b"owner-nonce-0002")
    sealed = svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, key, nonce), files)["sealed"]
    assert key not in sealed and key.hex().encode() not in sealed

    fresh = EnclaveService(SimBackend({}, platform_dir=base / "platform", lock_memory=False))  # a restarted worker
    out = fresh.restore(REF, sealed, files)
    assert out["bundle_id"] == svc._deployment(ModelRef.parse(REF)).bundle_id and fresh.models() == [REF]
    msg, ctx = _request(fresh, image)
    handle, ir = fresh.front(REF, msg)
    assert ctx(fresh.finish(handle, torch.zeros(10)))

    other = EnclaveService(SimBackend({}, platform_dir=base / "platform", lock_memory=False))
    with pytest.raises(TamperedMessage):  # the record names its model id
        other.restore(REF.replace(MODEL, "another-id"), sealed, files)
    with pytest.raises(TamperedMessage):  # and its owner
        other.restore("cd" * 32 + "/" + MODEL, sealed, files)
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(TamperedMessage):
        other.restore(REF, bytes(flipped), files)
    _, key2 = make_bundle(zoo.load("darknet", pretrained=False), 4, base / "bundle2", {"zoo": "darknet"},
                          zoo.entry("darknet").preprocessing, list(zoo.entry("darknet").classes), owner)
    with pytest.raises(TamperedMessage):  # same owner, another bundle
        other.restore(REF, sealed, bundle_files(base / "bundle2"))
    for elsewhere in (SimBackend({"other": "config"}, platform_dir=base / "platform", lock_memory=False),
                      SimBackend({}, platform_dir=base / "other-platform", lock_memory=False)):
        with pytest.raises(TamperedMessage):  # other enclave code (measurement) or another machine
            EnclaveService(elsewhere).restore(REF, sealed, files)
    assert other.models() == []


def test_a_host_cannot_make_the_enclave_run_other_backnet_weights(world):
    """For one-op small passes the host hands the enclave the public BackNet (`serve/placement.py`);
    a host that hands it other weights (changed, truncated) is refused on deploy, on a replacement
    and on restore, exactly as the host's own check would refuse them, and nothing changes: the
    answer the enclave seals must be the owner's model, not the host's."""
    from safetensors.torch import load as st_load, save as st_save

    from enclaveml.models.bundle import BACKNET

    svc, owner, key, files, backend, base, image = world
    ref = ModelRef.parse(REF)
    nonce = svc.issue_nonce(b"owner-nonce-bk00")
    sealed = svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, key, nonce), files)["sealed"]
    before = svc._deployment(ref)
    assert before.back is not None  # handed over and verified: loaded
    state = st_load(files[BACKNET])
    name = next(k for k in sorted(state) if state[k].is_floating_point())
    state[name] = state[name] + 0.01
    for i, other in enumerate((st_save(state), files[BACKNET][:-1], files[BACKNET] + b"\x00")):
        parts = {**files, BACKNET: other}
        nonce = svc.issue_nonce(b"owner-nonce-bk1" + bytes([i]))
        with pytest.raises(TamperedMessage, match="backnet"):  # a replacement of the live deployment
            svc.deploy(MODEL, seal_key_release(owner, svc.public_key(), MODEL, key, nonce), parts)
        assert svc._deployment(ref) is before
        nonce = svc.issue_nonce(b"owner-nonce-bk2" + bytes([i]))
        with pytest.raises(TamperedMessage, match="backnet"):  # a fresh name: not installed at all
            svc.deploy("sec-fresh", seal_key_release(owner, svc.public_key(), "sec-fresh", key, nonce), parts)
        assert svc.models() == [REF]
        fresh = EnclaveService(backend)  # a restarted worker, restored by the host
        with pytest.raises(TamperedMessage, match="backnet"):
            fresh.restore(REF, sealed, parts)
        assert fresh.models() == []


def test_hostile_jpegs_in_a_batch_fail_alone_and_quickly(world):
    """The JPEG fast path (session 8) against a host that picks the images' bytes: in one request
    a good JPEG, a 4:4:1 JPEG (simplejpeg cannot name its subsampling: it must reach Pillow, not
    fail the request), a valid progressive JPEG with one AC scan sent 3,000 times (Pillow decodes
    it; at the byte and pixel limits such a file would cost minutes of enclave CPU, by the
    reviewer's extrapolation) and a good PNG. The scan
    bomb alone fails, with the fixed message, refused on its scan count before any decoding; the
    others are answered; the enclave then serves the next request."""
    import time

    svc, *_, png = world

    def jpeg(**kw) -> bytes:
        b = io.BytesIO()
        Image.linear_gradient("L").resize((32, 32)).convert("RGB").save(b, "JPEG", quality=90, **kw)
        return b.getvalue()

    good = jpeg()
    d = bytearray(jpeg(subsampling=0))
    i = d.index(b"\xff\xc0")
    d[i + 11] = 0x14  # luma sampled 1x4: 4:4:1
    prog = jpeg(progressive=True)
    sos = [k for k in range(len(prog) - 1) if prog[k:k + 2] == b"\xff\xda"]
    start = sos[2]  # the third scan: an AC scan of one component, which may be sent again
    end = start + 2 + int.from_bytes(prog[start + 2:start + 4], "big")
    while not (prog[end] == 0xFF and prog[end + 1] not in (0, *range(0xD0, 0xD8))):
        end += 1
    eoi = prog.rindex(b"\xff\xd9")
    bomb = prog[:eoi] + prog[start:end] * 3000 + prog[eoi:]  # a valid file Pillow decodes, scans unbounded
    ref = ModelRef.parse(REF)
    target = Target(ref, ModelPin(ref.owner))
    body, ctx, aad = protocol.seal_infer(svc.public_key(), target,
                                         frame_fresh(protocol.encode_payload([good, bytes(d), bomb, png], 1)))
    t = time.perf_counter()
    (out,) = svc.front_batch(REF, [body], 1 << 20)
    assert time.perf_counter() - t < 2.0
    assert out.failed == 1
    items = protocol.decode_results(ctx.open_response(out.sealed, aad), 4, expected=target)
    assert [isinstance(x, DataError) for x in items] == [False, False, True, False]
    assert "scans" not in str(items[2]) and "3000" not in str(items[2])  # no detail of the bytes crosses
    msg, opener = _request(svc, good)
    (again,) = svc.front_batch(REF, [msg], 1 << 20)
    assert opener(again.sealed)


def test_a_replayed_hostile_image_is_refused_before_it_is_parsed_again(world, monkeypatch):
    """A host that resends a request holding a costly image (to make the enclave parse it again
    and again) gets `ReplayedMessage` from the replay guard, before the image's bytes are looked at."""
    from enclaveml.data import preprocess as P

    svc, *_, png = world
    prog = io.BytesIO()
    Image.linear_gradient("L").resize((32, 32)).convert("RGB").save(prog, "JPEG", quality=90, progressive=True)
    ref = ModelRef.parse(REF)
    target = Target(ref, ModelPin(ref.owner))
    body, ctx, aad = protocol.seal_infer(svc.public_key(), target,
                                         frame_fresh(protocol.encode_payload([prog.getvalue(), png], 1)))
    walked = []
    real = P._structure
    monkeypatch.setattr(P, "_structure", lambda raw, name: walked.append(1) or real(raw, name))
    (first,) = svc.front_batch(REF, [body], 1 << 20)
    assert ctx.open_response(first.sealed, aad) and len(walked) == 2
    for _ in range(3):
        (again,) = svc.front_batch(REF, [body], 1 << 20)
        assert isinstance(again, ReplayedMessage)
    assert len(walked) == 2  # no image of the replays was parsed
