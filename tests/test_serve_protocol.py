"""Sans-I/O pieces of serving: wire formats, the dynamic batcher, the enclave service in-process."""

from __future__ import annotations

import asyncio

import pytest
import torch

from enclaveml import errors as E
from enclaveml.crypto import SigningKey, frame_fresh, seal_key_release, seal_owner_command, seal_request
from enclaveml.models import zoo
from enclaveml.models.bundle import bundle_files, make_bundle, read_public_bundle
from enclaveml.protocol import ModelIdentity, ModelPin, ModelRef, Target
from enclaveml.models import servable
from enclaveml.protocol import deploy, infer as protocol
from enclaveml.serve.batcher import AsyncBatcher
from enclaveml.serve.enclave import EnclaveService
from enclaveml.serve.metrics import Metrics
from enclaveml.tee import get_backend


def test_payload_round_trip_and_limits():
    opts, img = protocol.decode_payload(protocol.encode_payload(b"\xff\xd8jpeg", top_k=3, logits=True))
    assert opts == {"top_k": 3, "logits": True} and img == [b"\xff\xd8jpeg"]
    many = [b"a", b"", b"ccc" * 100, b"\x00\x00"]  # empty images and trailing zeros stay the images'
    for pad in (True, False):
        assert protocol.decode_payload(protocol.encode_payload(many, 1, pad=pad)) == ({"top_k": 1, "logits": False}, many)
    with pytest.raises(E.UserInputError):
        protocol.encode_payload([], 1)
    with pytest.raises(E.UserInputError):
        protocol.encode_payload([b"x"] * (protocol.MAX_IMAGES + 1), 1)
    with pytest.raises(E.UserInputError):
        protocol.encode_payload(b"x", top_k=0)
    with pytest.raises(E.TamperedMessage):
        protocol.decode_payload(b"\x00")
    with pytest.raises(E.TamperedMessage):
        protocol.decode_payload(b"\xff\xff{}")
    with pytest.raises(E.DataError):
        protocol.decode_payload(b"\x00\x02[]img")
    with pytest.raises(E.DataError):
        protocol.decode_payload(b"\x00\x0c{\"top_k\":0}img")


ID = ModelIdentity("ab" * 32, "m", "cd" * 16, 3)


def test_result_lists_top_k_in_score_order():
    res = protocol.decode_result(protocol.encode_result(ID, [0.1, 0.7, 0.2], ["a", "b", "c"], 2))
    assert (res["owner"], res["model"], res["bundle_id"], res["k"], res["head"]) == ("ab" * 32, "m", "cd" * 16, 3, 0)
    assert [t["label"] for t in res["top"]] == ["b", "c"] and "logits" not in res
    with pytest.raises(E.TamperedMessage):
        protocol.decode_result(b'{"v": 1, "top": [{"label": 3}]}')


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".hidden", "x" * 65, "caf\u00e9", "a b"])
def test_model_ids_are_url_safe(bad):
    with pytest.raises(E.UserInputError):
        protocol.check_model_id(bad)


def test_parts_round_trip_and_refuse_bad_bodies():
    parts = {"a": b"123", "b": b"", "c": b"x" * 1000}
    assert deploy.unpack_parts(deploy.pack_parts(parts), {"a", "b", "c"}) == parts
    body = deploy.pack_parts(parts)
    for bad in (body[:-1], body + b"!", b"\x00\x00", deploy.pack_parts({"zzz": b"1"}),
                b"\x00\x00\x00\x05[1,2]", b"\x00\x00\x00\x10[[\"a\",1],[\"a\",1]]aa"):
        with pytest.raises(E.DataError):
            deploy.unpack_parts(bad, {"a", "b", "c"})


def test_batcher_groups_waiting_items_and_keeps_order():
    sizes = []

    async def main():
        gate = asyncio.Event()

        async def run(items):
            await gate.wait()
            return [x * 10 for x in items]

        b = AsyncBatcher(run, max_batch=8, window_s=0.0, on_batch=sizes.append)
        tasks = [asyncio.ensure_future(b.submit(i)) for i in range(20)]
        await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [i * 10 for i in range(20)]
    assert sizes == [1, 8, 8, 3]  # the first ran alone; the rest queued meanwhile and batched


def test_a_lone_item_runs_in_its_own_task_and_later_ones_queue_behind_it():
    seen = []

    async def main():
        gate = asyncio.Event()

        async def run(items):
            seen.append((list(items), asyncio.current_task()))
            if items == [0]:
                await gate.wait()
            return items

        b = AsyncBatcher(run, max_batch=8, window_s=0.0)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.01)
        assert seen[0][1] is first and b.running == 1  # no task of the batcher's own
        later = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert len(seen) == 1  # the runner is taken: they wait
        gate.set()
        assert await first == 0 and await asyncio.gather(*later) == [1, 2, 3]
        assert [items for items, _ in seen] == [[0], [1, 2, 3]] and b.running == 0

    asyncio.run(main())


def test_batcher_counts_item_weights_against_max_batch():
    """Requests of several images: a batch holds at most max_batch rows, but an item heavier than
    that still runs (alone)."""
    batches = []

    async def main():
        gate = asyncio.Event()

        async def run(items):
            await gate.wait()
            batches.append(list(items))
            return items

        b = AsyncBatcher(run, max_batch=8, window_s=0.0, weight=len, on_batch=lambda n: None)
        tasks = [asyncio.ensure_future(b.submit("x" * n)) for n in (1, 5, 3, 12, 2, 2, 4)]
        await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(*tasks)

    asyncio.run(main())
    assert [[len(i) for i in batch] for batch in batches] == [[1], [5, 3], [12], [2, 2, 4]]


def test_batcher_window_collects_items_that_arrive_later():
    sizes = []

    async def main():
        async def run(items):
            return items

        b = AsyncBatcher(run, max_batch=64, window_s=0.1, on_batch=sizes.append)
        t1 = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.02)
        return await asyncio.gather(t1, b.submit(2))

    assert asyncio.run(main()) == [1, 2] and sizes == [2]


def test_batcher_failures_reach_every_item_and_it_keeps_working():
    calls = []

    async def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [e if isinstance(e, Exception) else e + 1 for e in items]

    async def main():
        b = AsyncBatcher(run, max_batch=4, window_s=0.0, concurrency=2)
        with pytest.raises(RuntimeError):
            await b.submit(1)
        assert await b.submit(2) == 3
        with pytest.raises(ValueError):
            await b.submit(ValueError("one item"))  # a per-item exception fails only that item
        b.close()
        with pytest.raises(RuntimeError):
            await b.submit(4)

    asyncio.run(main())


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.inc("errors_total", kind="TamperedMessage")
    m.observe("batch", 3, buckets=(1, 4, 16), model="d")
    text = m.to_prometheus()
    assert 'enclaveml_errors_total{kind="TamperedMessage"} 1' in text
    assert 'enclaveml_batch_bucket{model="d",le="4"} 1' in text and 'enclaveml_batch_count{model="d"} 1' in text


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("svc")
    entry = zoo.entry("darknet")
    model = zoo.load("darknet", pretrained=False)
    owner = SigningKey.generate()
    _, key = make_bundle(model, 2, base / "b", {"zoo": "darknet"}, entry.preprocessing, list(entry.classes), owner)
    svc = EnclaveService(get_backend("sim", platform_dir=base / "platform", lock_memory=False))
    nonce = svc.issue_nonce(b"deploy-nonce-123")
    files = bundle_files(base / "b")
    svc.deploy("d", seal_key_release(owner, svc.public_key(), "d", key, nonce), files)
    _, back = read_public_bundle(files)
    global D
    D = str(ModelRef(owner.public_key().to_bytes().hex(), "d"))
    return svc, back, model, entry, owner, key, files


D = ""  # the fixture's deployment, OWNERHEX/d


def _target(ref: str) -> Target:
    r = ModelRef.parse(ref)
    return Target(r, ModelPin(r.owner))


def _seal(svc, payload: bytes, ref: str | None = None):
    return protocol.seal_infer(svc.public_key(), _target(ref or D), frame_fresh(payload))


def _request(svc, image: bytes, ref: str | None = None):
    return _seal(svc, protocol.encode_payload(image, 3, True), ref)


def test_enclave_service_front_finish_matches_the_plain_model(service, cifar10_dir):
    svc, back, model, entry, *_ = service
    image = sorted((cifar10_dir / "test" / "dog").glob("*.jpg"))[0].read_bytes()
    msg, ctx, aad = _request(svc, image)
    handle, ir = svc.front(D, msg)
    with torch.no_grad():
        scores = back(ir)[0]
        ref = model(entry.preprocessing(image).unsqueeze(0))[0]
    res = protocol.decode_result(ctx.open_response(svc.finish(handle, scores), aad))
    assert torch.allclose(torch.tensor(res["logits"]), ref, atol=1e-5)
    assert res["top"][0]["index"] == int(ref.argmax())
    with pytest.raises(E.UnknownModel):
        svc.finish(handle, scores)  # a handle answers once


def test_enclave_service_refuses_and_stays_consistent(service):
    svc, back, model, entry, owner, key, files = service
    msg, _, _ = _request(svc, b"not an image")
    with pytest.raises(E.DataError):
        svc.front(D, msg)
    with pytest.raises(E.ReplayedMessage):
        svc.front(D, msg)  # the id was used, even though the image was bad
    zz = D.replace("/d", "/zz")
    with pytest.raises(E.UnknownModel):
        svc.front(zz, _request(svc, b"x", zz)[0])
    with pytest.raises(E.TamperedMessage):  # routed by the host to another deployment than its target
        svc.front(D, _request(svc, b"x", zz)[0])
    # an owner command needs a nonce this enclave issued
    with pytest.raises(E.ReplayedMessage):
        svc.deploy("d", seal_key_release(owner, svc.public_key(), "d", key, b"never-issued-nonce"), files)
    other = SigningKey.generate()
    n = svc.issue_nonce(b"nonce-for-mallory")
    with pytest.raises(E.Unauthorized):
        svc.delete(D, seal_owner_command(other, svc.public_key(), "delete", "d", n))
    assert svc.models() == [D]
    outs = svc.front_batch(D, [_request(svc, b"junk")[0], b"\x00" * 10])
    assert isinstance(outs[0], E.DataError) and isinstance(outs[1], E.TamperedMessage)


def test_one_request_with_several_images_answers_each_in_order(service, cifar10_dir):
    """Several images in one HPKE request: one IR row per decodable image, one sealed item per
    image in request order, an undecodable image answered by an error item in its place."""
    svc, back, model, entry, *_ = service
    images = [p.read_bytes() for p in sorted((cifar10_dir / "test" / "cat").glob("*.jpg"))[:3]]
    batch = [images[0], b"not an image", images[1], images[2]]
    msg, ctx, aad = _seal(svc, protocol.encode_payload(batch, 2, True))
    handle, ir = svc.front(D, msg)
    assert ir.shape[0] == 3
    with torch.no_grad():
        scores = back(ir)
        ref = model(torch.stack([entry.preprocessing(b) for b in images]))
    with pytest.raises(E.DataError):
        svc.finish(handle, scores[:2])  # one row per decoded image, no fewer (and the handle is spent)
    msg, ctx, aad = _seal(svc, protocol.encode_payload(batch, 2, True))
    was, svc.max_pass = svc.max_pass, 2  # three decoded images in two FrontNet passes: the same answers
    try:
        handle, ir = svc.front(D, msg)
    finally:
        svc.max_pass = was
    assert ir.shape[0] == 3 and ir.is_contiguous()  # NCHW on the wire, whatever the FrontNet's layout
    sealed = svc.finish(handle, back(ir).detach())
    plain = ctx.open_response(sealed, aad)
    dep = svc._deployment(ModelRef.parse(D))
    labels = list(dep.mapping.labels)
    assert len(plain) == len(batch) * protocol.result_size(dep.identity, labels, 2, True)  # the error item too
    res = protocol.decode_results(plain, len(batch), expected=_target(D))
    assert isinstance(res[1], E.DataError) and "decodable" in str(res[1])
    for r, want in zip([res[0], res[2], res[3]], ref):
        assert torch.allclose(torch.tensor(r["logits"]), want, atol=1e-5)
    # a request whose images all fail still gets its sealed answer, without a BackNet pass
    msg, ctx, aad = _seal(svc, protocol.encode_payload([b"x", b"y"], 1))
    handle, ir = svc.front(D, msg)
    assert ir.numel() == 0
    res = protocol.decode_results(ctx.open_response(svc.finish(handle, torch.empty(0)), aad), 2)
    assert all(isinstance(r, E.DataError) for r in res)
    with pytest.raises(E.TamperedMessage):  # a response cut to another item count
        protocol.decode_results(b"x" * 10, 3)


def test_error_items_are_as_long_as_results():
    labels = ["a", "bb", "c" * 40]
    for top_k, logits in ((1, False), (3, True)):
        size = protocol.result_size(ID, labels, top_k, logits)
        assert len(protocol.encode_error_item(ID, labels, top_k, logits)) == size
        assert len(protocol.encode_result(ID, [0.2, 0.3, 0.5], labels, top_k, [1.0, 2.0, 3.0] if logits else None)) == size
    one = len(protocol.encode_error_item(ID, ["a"], 1, False))  # F-26: a label counts at its longest allowed
    assert one == protocol.result_size(ID, ["x" * 256], 1, False) and one % protocol.RESULT_BLOCK == 0


def test_client_splits_batches_by_count_and_bytes():
    from enclaveml.client.sdk import BATCH_BYTES, BATCH_CHUNK, _chunks

    assert [len(c) for c in _chunks([b"x"] * (BATCH_CHUNK * 2 + 1))] == [BATCH_CHUNK, BATCH_CHUNK, 1]
    big = b"x" * (BATCH_BYTES // 2 + 1)
    assert [len(c) for c in _chunks([big, big, b"y", big])] == [1, 2, 1]
    assert _chunks([]) == []


def test_only_zoo_architectures_are_served(tmp_path):
    """A signed manifest naming `os:system` as its factory must not make anything run."""
    import json

    servable.check_servable_arch({"zoo": "darknet"})
    for arch in ({"factory": "os:system", "kwargs": {"command": "true"}}, {"zoo": "nope"},
                 {"zoo": "darknet", "factory": "os:system"}):
        with pytest.raises(E.UserInputError):
            servable.check_servable_arch(arch)
    # end to end in the enclave service: a deploy with such a manifest is refused before import
    from enclaveml.models.bundle import MANIFEST, MANIFEST_LABEL, SIGNATURE

    svc = EnclaveService(get_backend("sim", platform_dir=tmp_path / "p", lock_memory=False))
    owner = SigningKey.generate()
    model = zoo.load("darknet", pretrained=False)
    _, key = make_bundle(model, 2, tmp_path / "b", {"zoo": "darknet"}, zoo.entry("darknet").preprocessing,
                         list(zoo.entry("darknet").classes), owner)
    files = bundle_files(tmp_path / "b")
    m = json.loads(files[MANIFEST])
    m["arch"] = {"factory": "os:system", "kwargs": {"command": f"touch {tmp_path}/pwned"}}
    files[MANIFEST] = json.dumps(m).encode()
    files[SIGNATURE] = json.dumps({"alg": "Ed25519", "owner": owner.public_key().to_bytes().hex(),
                                   "signature": owner.sign(MANIFEST_LABEL + files[MANIFEST]).hex()}).encode()
    n = svc.issue_nonce(b"nonce-0123456789")
    with pytest.raises(E.UserInputError):
        svc.deploy("d", seal_key_release(owner, svc.public_key(), "d", key, n), files)
    assert not (tmp_path / "pwned").exists() and svc.models() == []


def test_result_is_padded_to_a_length_that_does_not_depend_on_the_winner():
    """F-6: labels of 1 to 40 characters, any winner, any scores: one length per (top_k, logits)."""
    labels = ["x" * (1 + 3 * i) for i in range(10)] + ["\u00e9t\u00e9"]
    for top_k in (1, 3, 11):
        for want_logits in (False, True):
            sizes = set()
            for winner in range(len(labels)):
                probs = [1e-300 / (i + 1) if i != winner else 0.123456789 for i in range(len(labels))]
                logits = [-1.7976931348623157e308] * len(labels) if want_logits else None
                raw = protocol.encode_result(ModelIdentity("ab" * 32, "m" * 64, "cd" * 32, 99999, 9),
                                             probs, labels, top_k, logits)
                sizes.add(len(raw))
                res = protocol.decode_result(raw)
                assert res["top"][0]["label"] == labels[winner]
            assert sizes == {protocol.result_size(ModelIdentity("ab" * 32, "m" * 64, "cd" * 32, 99999, 9),
                                                  labels, top_k, want_logits)}
            assert next(iter(sizes)) % protocol.RESULT_BLOCK == 0


def test_result_version_must_be_the_integer_1():
    ident = b'"model":"m","owner":"' + b"ab" * 32 + b'","bundle_id":"cd","k":1,"head":0'
    for bad in (b'{"v": true, "top": [], ' + ident + b'}', b'{"v": 1.0, "top": [], ' + ident + b'}', b'[' * 5000,
                b'{"v": 1, "top": [], "top": [], ' + ident + b'}', b'{"v": 1, "top": []}'):
        with pytest.raises(E.TamperedMessage):
            protocol.decode_result(bad)
    assert protocol.decode_result(b'{"v": 1, "top": [], ' + ident + b'}' + bytes(100))["top"] == []


def test_request_payload_is_padded_to_size_buckets():
    sizes = {len(protocol.encode_payload(b"i" * n)) for n in (0, 10, 500, 900)}
    assert sizes == {1024}
    assert len(protocol.encode_payload(b"i" * 3000)) == 4096
    assert len(protocol.encode_payload(b"i" * (3 << 20))) == 4 << 20
    assert (8 << 20) < len(protocol.encode_payload(b"i" * (8 << 20))) < (8 << 20) + 100  # past the cap: unpadded
    for n in (0, 1, 1000, 5000):
        image = bytes(range(256)) * (n // 256) + b"\x00" * (n % 256)  # trailing zeros stay the image's
        assert protocol.decode_payload(protocol.encode_payload(image, 2)) == ({"top_k": 2, "logits": False}, [image])
    unpadded = protocol.encode_payload(b"img", pad=False)
    assert protocol.decode_payload(unpadded)[1] == [b"img"] and len(unpadded) < 100
    # the padding hides how a request's bytes split into images
    assert len(protocol.encode_payload([b"i" * 100] * 5)) == len(protocol.encode_payload([b"i" * 500]))


@pytest.mark.parametrize("opts,tail", [(b'{"image_bytes":5}', b"abc"), (b'{"image_bytes":-1}', b"abc"),
                                       (b'{"image_bytes":true}', b"abc"), (b'{"image_bytes":1}', b"ab"),
                                       (b'{"image_bytes":1.0}', b"a"), (b'{"logits":1}', b"a"),
                                       (b'{"image_bytes":[]}', b""), (b'{"image_bytes":[1,-1]}', b"ab"),
                                       (b'{"image_bytes":[2,2]}', b"abc"), (b'{"image_bytes":[1,1]}', b"abc"),
                                       (b'{"image_bytes":[1,"1"]}', b"ab"), (b'{"image_bytes":{"0":1}}', b"a"),
                                       (b'{"image_bytes":[' + b"0," * 256 + b'0]}', b"")])
def test_request_padding_and_options_are_checked(opts, tail):
    with pytest.raises(E.DataError):
        protocol.decode_payload(len(opts).to_bytes(2, "big") + opts + tail)


def test_client_does_not_resend_images_when_the_host_claims_tampering():
    """F-13: a forged TamperedMessage must not make the SDK seal and send the images again."""
    import httpx

    from enclaveml.client import sdk
    from enclaveml.tee import Policy

    sent: list = []

    def handler(req: httpx.Request) -> httpx.Response:
        sent.append(req.url.path)
        return httpx.Response(400, json={"error": "TamperedMessage", "message": "forged"})

    from enclaveml.crypto import HpkeKeyPair

    pin = {"owner": "ab" * 32, "bundle_ids": [], "min_k": 1}
    c = sdk.EnclaveClient("http://host.invalid", Policy(allowed_backends=["sim"], models={"m": pin}),
                          http=httpx.Client(transport=httpx.MockTransport(handler)))
    att = sdk.AttestedEnclave(HpkeKeyPair.generate().public_bytes(), b"n" * 32, None, float("inf"))
    target = c.target("m")
    att.identities[target] = ModelIdentity("ab" * 32, "m", "cd" * 16, 5)  # as if the enclave had said so
    c._attested = att
    with pytest.raises(E.TamperedMessage):
        c.infer([b"image"], model="m")
    assert sent == [f"/v1/models/{'ab' * 32}/m/infer"] and c._attested is None  # sent once; attests afresh


def test_allowed_factories_are_served_only_when_configured_and_are_measured(tmp_path):
    """`serve --allow-factory`: the enclave builds a factory architecture only if its configuration,
    which the sim measurement covers, names it exactly; the default keeps the plain measurement."""
    from enclaveml.tee.sim import expected_sim_measurement

    factory = "enclaveml.models.zoo.extraction:build"
    arch = {"factory": factory, "kwargs": {"num_classes": 10}}
    with pytest.raises(E.UserInputError):
        servable.check_servable_arch(arch)
    servable.check_servable_arch(arch, (factory,))
    with pytest.raises(E.UserInputError):
        servable.check_servable_arch(arch, ("enclaveml.models.zoo.darknet:build",))
    with pytest.raises(E.UserInputError):
        servable.enclave_config(["os.system"])  # not package.module:function
    assert servable.enclave_config([]) == {}
    cfg = servable.enclave_config([factory, factory])
    assert cfg == {"allowed_factories": [factory]}
    assert expected_sim_measurement(cfg) != expected_sim_measurement(servable.enclave_config([]))

    owner = SigningKey.generate()
    e = zoo.entry("extraction")
    _, key = make_bundle(zoo.load("extraction", pretrained=False), 3, tmp_path / "b", arch, e.preprocessing,
                         list(e.classes), owner)
    files = bundle_files(tmp_path / "b")
    backend = get_backend("sim", platform_dir=tmp_path / "p", lock_memory=False, config=cfg)
    for allowed, ok in (((), False), ((factory,), True)):
        svc = EnclaveService(backend, allowed_factories=allowed)
        nonce = svc.issue_nonce(b"factory-nonce-01")
        release = seal_key_release(owner, svc.public_key(), "fac", key, nonce)
        if ok:
            assert svc.deploy("fac", release, files)["model"].endswith("/fac")
        else:
            with pytest.raises(E.UserInputError):
                svc.deploy("fac", release, files)


def test_a_small_pass_is_answered_in_one_call_as_the_two_call_path_answers(service, cifar10_dir):
    """`front_batch(finish_rows=N)` on a deployment holding its BackNet: a call of at most N
    decoded images is answered sealed in one go (decode, FrontNet, BackNet, class mapping, seal),
    with the answers of front -> the host's small-pass BackNet -> finish; more images take the
    two-call path as before."""
    import copy

    from enclaveml.serve.batcher import SMALL_ROWS
    from enclaveml.serve.enclave import Answered

    svc, back, *_ = service
    host_small = copy.deepcopy(back).to(memory_format=torch.channels_last)  # what the host runs at <= SMALL_ROWS
    images = [p.read_bytes() for p in sorted((cifar10_dir / "test" / "ship").glob("*.jpg"))[:3]]
    batch = [images[0], b"not an image", images[1], images[2]]
    msg, ctx, aad = _seal(svc, protocol.encode_payload(batch, 3, True))
    handle, ir = svc.front(D, msg)
    with torch.no_grad():
        two = protocol.decode_results(ctx.open_response(svc.finish(handle, host_small(ir)), aad), 4)
    msg, ctx, aad = _seal(svc, protocol.encode_payload(batch, 3, True))
    (ans,) = svc.front_batch(D, [msg], finish_rows=SMALL_ROWS)
    assert isinstance(ans, Answered) and ans.failed == 1
    one = protocol.decode_results(ctx.open_response(ans.sealed, aad), 4, expected=_target(D))
    assert isinstance(one[1], E.DataError) and isinstance(two[1], E.DataError)
    for a, b in zip(one[:1] + one[2:], two[:1] + two[2:]):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert max(abs(x - y) for x, y in zip(a["logits"], b["logits"])) < 1e-5
    msg, *_ = _seal(svc, protocol.encode_payload(batch, 3, True))
    (o,) = svc.front_batch(D, [msg], finish_rows=2)  # three decoded images: the two-call path
    assert isinstance(o, tuple) and o[1].shape[0] == 3 and o[2] == 1
    svc.abort(o[0])
    msg, ctx, aad = _seal(svc, protocol.encode_payload([b"x", b"y"], 1))  # nothing decodes: still answered
    (ans,) = svc.front_batch(D, [msg], finish_rows=SMALL_ROWS)
    assert isinstance(ans, Answered) and ans.failed == 2
    assert all(isinstance(r, E.DataError) for r in protocol.decode_results(ctx.open_response(ans.sealed, aad), 2))


def test_backnet_placement_follows_the_device_and_refuses_contradictions():
    import typer
    from typer.testing import CliRunner

    from enclaveml.serve.commands import register
    from enclaveml.serve.placement import ALL_ROWS, describe, enclave_finish_rows

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert enclave_finish_rows("auto", "host", cpu) == 4 and enclave_finish_rows("auto", "host", gpu) == 0
    assert enclave_finish_rows("enclave", "host", gpu) == 4 and enclave_finish_rows("host", "host", cpu) == 0
    assert enclave_finish_rows("auto", "enclave", cpu) == ALL_ROWS == enclave_finish_rows("enclave", "enclave", gpu)
    # the default ("auto", "auto"): every pass in the enclave on a CPU host, none with a GPU
    assert enclave_finish_rows("auto", "auto", cpu) == ALL_ROWS and enclave_finish_rows("auto", "auto", gpu) == 0
    assert enclave_finish_rows("host", "auto", cpu) == 0 and enclave_finish_rows("enclave", "auto", gpu) == 4
    assert describe(0) == {"small": "host", "large": "host"} and describe(4) == {"small": "enclave", "large": "host"}
    for small, large in (("gpu", "host"), ("auto", "both"), ("host", "enclave")):
        with pytest.raises(E.UserInputError):
            enclave_finish_rows(small, large, cpu)
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["--backnet", "enclave", "--backnet-small", "host"])  # refused before starting
    assert isinstance(r.exception, E.UserInputError) and "cannot keep small ones" in str(r.exception)


def test_every_pass_in_the_enclave_answers_as_the_host_would(service, cifar10_dir):
    """`--backnet enclave` (finish_rows = ALL_ROWS): a call of several requests over several
    FrontNet passes is answered whole, each request as front -> host BackNet -> finish answers it."""
    from enclaveml.serve.enclave import Answered
    from enclaveml.serve.placement import ALL_ROWS

    svc, back, *_ = service
    images = [p.read_bytes() for p in sorted((cifar10_dir / "test" / "frog").glob("*.jpg"))[:5]]
    reqs = [images[:3], images[3:]]
    want = []
    for batch in reqs:
        msg, ctx, aad = _seal(svc, protocol.encode_payload(batch, 2, True))
        handle, ir = svc.front(D, msg)
        with torch.no_grad():
            want.append(protocol.decode_results(ctx.open_response(svc.finish(handle, back(ir)), aad), len(batch)))
    for max_pass in (2, 32):  # five images in three small passes (channels-last), or one large (NCHW)
        sealed = [_seal(svc, protocol.encode_payload(batch, 2, True)) for batch in reqs]
        was, svc.max_pass = svc.max_pass, max_pass
        try:
            outs = svc.front_batch(D, [m for m, _, _ in sealed], finish_rows=ALL_ROWS)
        finally:
            svc.max_pass = was
        for o, (_, ctx, aad), batch, w in zip(outs, sealed, reqs, want):
            assert isinstance(o, Answered) and o.failed == 0
            got = protocol.decode_results(ctx.open_response(o.sealed, aad), len(batch))
            for a, b in zip(got, w):
                assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
                assert max(abs(x - y) for x, y in zip(a["logits"], b["logits"])) < 1e-5
    assert svc._deployment(ModelRef.parse(D)).back_large is not None  # made by the large pass


def test_a_backnet_over_the_copy_limit_is_held_once_and_answers_the_same(service, cifar10_dir):
    """Enclave memory is scarce (SGX1's EPC): past `nchw_copy_max_bytes` a large pass runs the one
    channels-last BackNet instead of making a second, NCHW copy, with the same answers."""
    from enclaveml.serve.enclave import Answered
    from enclaveml.serve.placement import ALL_ROWS, keeps_nchw_copy

    svc, back, *_ = service
    dep = svc._deployment(ModelRef.parse(D))
    assert dep.back_bytes == sum(t.numel() * t.element_size() for t in (*back.parameters(), *back.buffers()))
    assert keeps_nchw_copy(dep.back_bytes, dep.back_bytes) and not keeps_nchw_copy(dep.back_bytes, dep.back_bytes - 1)
    images = [p.read_bytes() for p in sorted((cifar10_dir / "test" / "ship").glob("*.jpg"))[:6]]
    answers = []
    was = svc.nchw_copy_max_bytes, dep.back_large, dep.run_back_large
    try:
        for limit in (dep.back_bytes - 1, dep.back_bytes):  # held once, then allowed its second copy
            svc.nchw_copy_max_bytes, dep.back_large, dep.run_back_large = limit, None, None
            msg, ctx, aad = _seal(svc, protocol.encode_payload(images, 3, True))
            (o,) = svc.front_batch(D, [msg], finish_rows=ALL_ROWS)
            assert isinstance(o, Answered) and o.failed == 0
            answers.append(protocol.decode_results(ctx.open_response(o.sealed, aad), len(images)))
            assert (dep.back_large is None) == (limit < dep.back_bytes)
    finally:
        svc.nchw_copy_max_bytes, dep.back_large, dep.run_back_large = was
    for a, b in zip(*answers):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert max(abs(x - y) for x, y in zip(a["logits"], b["logits"])) < 1e-4
