"""Security review (engineer F): adversarial tests of the crypto parsers and recipes.

Every function here that reads attacker-controlled bytes must either return authenticated data
or raise one of the documented trust errors (TamperedMessage, ReplayedMessage, ...), never
IndexError/ValueError/struct.error/KeyError and never unauthenticated data. Real crypto
throughout (no mocks). Findings: docs/security-review.md.
"""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaveml import keyfiles
from enclaveml.crypto import (HpkeKeyPair, ReplayGuard, SigningKey, frame_fresh, generate_key, open_key_release,
                              open_owner_command, open_request, open_sealed, parse_fresh, require_owner, seal,
                              seal_key_release, seal_owner_command, seal_request)
from enclaveml.crypto.hpke import DEFAULT_INFO, RESPONSE_NONCE_BYTES
from enclaveml.crypto.keyrelease import INFO as OWNER_INFO
from enclaveml.crypto.keyrelease import SIGNING_LABEL
from enclaveml.errors import (EnclaveMLError, ReplayedMessage, TamperedMessage, Unauthorized, UserInputError)

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=60, deadline=None, database=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])

KP = HpkeKeyPair.derive(b"security-review enclave key ikm 32b")
OWNER = SigningKey.generate()
NONCE = b"attestation-nonce-0123456789abcd"
MODEL_KEY = bytes(range(32))


def _only(allowed: tuple[type[BaseException], ...], fn, *args, **kwargs):
    """Call fn; it must raise one of `allowed` (anything else, or returning, fails the test)."""
    try:
        out = fn(*args, **kwargs)
    except allowed:
        return
    except Exception as e:  # pragma: no cover - this is what the tests hunt for
        pytest.fail(f"{getattr(fn, '__name__', fn)} raised undocumented {type(e).__name__}: {e}")
    pytest.fail(f"{getattr(fn, '__name__', fn)} returned data for forged input: {out!r:.80}")


def _mutations(msg: bytes):
    """Targeted mutations: single-bit flips everywhere (sampled), truncations, extensions, zeroing."""
    n = len(msg)
    for i in sorted(set(range(0, n, max(1, n // 64))) | {0, 31, 32, n - 17, n - 16, n - 1}):
        if 0 <= i < n:
            for bit in (0, 7):
                b = bytearray(msg)
                b[i] ^= 1 << bit
                yield f"flip byte {i} bit {bit}", bytes(b)
    for cut in sorted({0, 1, 16, 31, 32, 47, 48, n // 2, n - 16, n - 1}):
        if 0 <= cut < n:
            yield f"truncate to {cut}", msg[:cut]
    yield "extend by 1", msg + b"\x00"
    yield "extend by 16", msg + b"\xff" * 16
    yield "zeros", bytes(n)
    yield "reversed", msg[::-1]


# ------------------------------------------------------------------------------------------- HPKE


@FUZZ
@given(st.binary(max_size=256))
def test_open_request_on_random_bytes_is_tampered(data):
    _only((TamperedMessage,), open_request, KP, data)


# X25519 points of small order (RFC 7748 section 5 / libsodium's blocklist): no shared secret.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


@pytest.mark.parametrize("enc", LOW_ORDER, ids=[f"low{i}" for i in range(len(LOW_ORDER))])
def test_low_order_enc_is_tampered(enc):
    _only((TamperedMessage,), open_request, KP, enc + os.urandom(40))


@pytest.mark.parametrize("pk", LOW_ORDER[:2], ids=["zero", "one"])
def test_sealing_to_a_low_order_public_key_is_refused(pk):
    _only((UserInputError,), seal_request, pk, b"secret input")


def test_every_targeted_mutation_of_a_request_is_tampered():
    msg, _ = seal_request(KP.public_bytes(), b"an image" * 8, aad=b"model-a")
    assert open_request(KP, msg, aad=b"model-a")[0] == b"an image" * 8
    for what, bad in _mutations(msg):
        _only((TamperedMessage,), open_request, KP, bad, b"model-a")
    # context binding: another aad (the host redirecting to another model) or another info
    _only((TamperedMessage,), open_request, KP, msg, b"model-b")
    _only((TamperedMessage,), open_request, KP, msg, b"model-a", OWNER_INFO)
    # another enclave's key
    _only((TamperedMessage,), open_request, HpkeKeyPair.generate(), msg, b"model-a")


def test_swapping_enc_between_two_requests_is_tampered():
    m1, _ = seal_request(KP.public_bytes(), b"first request payload")
    m2, _ = seal_request(KP.public_bytes(), b"other request payload")
    _only((TamperedMessage,), open_request, KP, m2[:32] + m1[32:])
    _only((TamperedMessage,), open_request, KP, m1[:32] + m2[32:])


@FUZZ
@given(st.binary(max_size=128))
def test_open_response_on_random_bytes_is_tampered(data):
    _, ctx = seal_request(KP.public_bytes(), b"q")
    _only((TamperedMessage,), ctx.open_response, data)


def test_response_mutations_and_cross_request_swaps_are_tampered():
    msg1, ctx1 = seal_request(KP.public_bytes(), b"q1", aad=b"a")
    msg2, ctx2 = seal_request(KP.public_bytes(), b"q2", aad=b"a")
    _, sealer1 = open_request(KP, msg1, aad=b"a")
    _, sealer2 = open_request(KP, msg2, aad=b"a")
    resp1 = sealer1.seal_response(b"label: cat, score 0.9", aad=b"a")
    resp2 = sealer2.seal_response(b"label: dog, score 0.8", aad=b"a")
    assert ctx1.open_response(resp1, aad=b"a") == b"label: cat, score 0.9"
    for what, bad in _mutations(resp1):
        _only((TamperedMessage,), ctx1.open_response, bad, b"a")
    _only((TamperedMessage,), ctx1.open_response, resp2, b"a")  # the host swaps two answers
    _only((TamperedMessage,), ctx2.open_response, resp1, b"a")
    _only((TamperedMessage,), ctx1.open_response, resp1, b"other aad")
    # splice: nonce of one response, ciphertext of the other
    _only((TamperedMessage,), ctx1.open_response, resp2[:RESPONSE_NONCE_BYTES] + resp1[RESPONSE_NONCE_BYTES:], b"a")


def test_request_is_not_an_owner_command_and_vice_versa():
    """Domain separation by HPKE info: one kind of message never opens as the other."""
    req, _ = seal_request(KP.public_bytes(), OWNER.public_key().to_bytes() + bytes(64) + b"{}")
    _only((TamperedMessage,), open_owner_command, KP, req)
    rel = seal_key_release(OWNER, KP.public_bytes(), "m", MODEL_KEY, NONCE)
    _only((TamperedMessage,), open_request, KP, rel)
    _only((TamperedMessage,), open_request, KP, rel, b"", DEFAULT_INFO)


# ------------------------------------------------------------------------------------------- sealing


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=16))
def test_open_sealed_on_random_tokens_is_tampered(token, aad):
    _only((TamperedMessage,), open_sealed, MODEL_KEY, token, aad)


def test_sealed_token_mutations_wrong_key_and_wrong_aad_are_tampered():
    tok = seal(MODEL_KEY, b"frontnet weights" * 10, aad=b"bundle-1/frontnet")
    assert open_sealed(MODEL_KEY, tok, aad=b"bundle-1/frontnet") == b"frontnet weights" * 10
    for what, bad in _mutations(tok):
        _only((TamperedMessage,), open_sealed, MODEL_KEY, bad, b"bundle-1/frontnet")
    _only((TamperedMessage,), open_sealed, generate_key(), tok, b"bundle-1/frontnet")
    _only((TamperedMessage,), open_sealed, MODEL_KEY, tok, b"bundle-2/frontnet")
    _only((TamperedMessage,), open_sealed, MODEL_KEY, tok, b"")
    # a key of the wrong size is a caller bug, reported as such (never silently truncated/padded)
    for bad_key in (b"", MODEL_KEY[:16], MODEL_KEY + b"\x00", "not bytes"):
        _only((UserInputError,), open_sealed, bad_key, tok, b"bundle-1/frontnet")


# ------------------------------------------------------------------------------------------- nonces


def test_1000_seals_use_1000_distinct_nonces():
    toks = [seal(MODEL_KEY, b"same plaintext") for _ in range(1000)]
    assert len({t[1:13] for t in toks}) == 1000
    assert len(set(toks)) == 1000


def test_1000_responses_and_requests_use_distinct_nonces_and_encs():
    msg, _ = seal_request(KP.public_bytes(), b"q")
    _, sealer = open_request(KP, msg)
    resps = [sealer.seal_response(b"same answer") for _ in range(1000)]
    assert len({r[:RESPONSE_NONCE_BYTES] for r in resps}) == 1000
    reqs = [seal_request(KP.public_bytes(), b"same request")[0] for _ in range(300)]
    assert len({r[:32] for r in reqs}) == 300
    assert len({parse_fresh(frame_fresh(b""))[0] for _ in range(1000)}) == 1000


# ------------------------------------------------------------------------------------------- owner commands


def _signed_command(body: bytes, signer: SigningKey = OWNER) -> bytes:
    """A message that passes decryption and signature (by `signer`) but carries `body` as is."""
    sig = signer.sign(SIGNING_LABEL + body)
    msg, _ = seal_request(KP.public_bytes(), signer.public_key().to_bytes() + sig + body, info=OWNER_INFO)
    return msg


def _body(**over) -> bytes:
    d = {"v": 1, "command": "release-key", "model_id": "m", "nonce": NONCE.hex(), "enclave": KP.public_bytes().hex(),
         "args": {"model_key": MODEL_KEY.hex()}}
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...}, sort_keys=True, separators=(",", ":")).encode()


def test_well_formed_signed_release_opens():
    rel = open_key_release(KP, _signed_command(_body()), expected_nonce=NONCE)
    assert rel.model_key == MODEL_KEY and rel.owner == OWNER.public_key()


MALFORMED_BODIES = {
    "not json": b"\xff\xfe not json",
    "json list": b"[1,2,3]",
    "json string": b'"release-key"',
    "json number": b"1e999",
    "empty object": b"{}",
    "version 2": _body(v=2),
    "no command": _body(command=...),
    "command int": _body(command=7),
    "model_id list": _body(model_id=["m"]),
    "nonce not hex": _body(nonce="zz"),
    "nonce int": _body(nonce=5),
    "enclave missing": _body(enclave=...),
    "enclave other key": _body(enclave=HpkeKeyPair.generate().public_bytes().hex()),
    "enclave not hex": _body(enclave="xyz"),
    "args list": _body(args=[1]),
    "args null": _body(args=None),
    "model_key missing": _body(args={}),
    "model_key short": _body(args={"model_key": "00" * 31}),
    "model_key long": _body(args={"model_key": "00" * 33}),
    "model_key int": _body(args={"model_key": 12}),
    "model_key odd hex": _body(args={"model_key": "0" * 63}),
    "other command": _body(command="delete"),
    "wrong nonce": _body(nonce=(b"x" * 32).hex()),
}


@pytest.mark.parametrize("name", list(MALFORMED_BODIES))
def test_signed_but_malformed_release_bodies_are_tampered(name):
    _only((TamperedMessage,), open_key_release, KP, _signed_command(MALFORMED_BODIES[name]), NONCE)


def test_deeply_nested_owner_command_body_is_tampered():
    body = b'{"v":1,"args":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(TamperedMessage):
        open_owner_command(KP, _signed_command(body, SigningKey.generate()))


@FUZZ
@given(st.binary(max_size=300))
def test_random_plaintexts_inside_a_valid_owner_envelope_are_tampered(pt):
    msg, _ = seal_request(KP.public_bytes(), pt, info=OWNER_INFO)
    _only((TamperedMessage,), open_owner_command, KP, msg)


@FEW
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8).map(bytes.hex),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12),
       st.sampled_from(["v", "command", "model_id", "nonce", "enclave", "args"]))
def test_any_json_value_in_any_field_of_a_signed_release_is_handled(value, key):
    """Hypothesis puts arbitrary JSON in each field of a correctly signed release body."""
    body = _body(**{key: value})
    try:
        rel = open_key_release(KP, _signed_command(body), expected_nonce=NONCE)
    except TamperedMessage:
        return
    except Exception as e:
        pytest.fail(f"undocumented {type(e).__name__}: {e}")
    # accepted: only if the field's value is equivalent to the valid one
    assert rel.model_key == MODEL_KEY and rel.nonce == NONCE and rel.model_id == (value if key == "model_id" else "m")


def test_owner_command_signed_by_someone_else_is_unauthorized_on_an_existing_deployment():
    mallory = SigningKey.generate()
    cmd = open_owner_command(KP, seal_owner_command(mallory, KP.public_bytes(), "delete", "m", NONCE))
    with pytest.raises(Unauthorized):
        require_owner(cmd, OWNER.public_key())


def test_signature_over_another_body_does_not_verify():
    body = _body()
    sig = OWNER.sign(SIGNING_LABEL + _body(model_id="other"))
    msg, _ = seal_request(KP.public_bytes(), OWNER.public_key().to_bytes() + sig + body, info=OWNER_INFO)
    _only((TamperedMessage,), open_key_release, KP, msg, NONCE)
    # a signature without the domain label (e.g. one the owner made for a bundle) does not verify either
    sig2 = OWNER.sign(body)
    msg2, _ = seal_request(KP.public_bytes(), OWNER.public_key().to_bytes() + sig2 + body, info=OWNER_INFO)
    _only((TamperedMessage,), open_key_release, KP, msg2, NONCE)


def test_owner_key_field_with_invalid_or_mismatched_key_is_tampered():
    body = _body()
    sig = OWNER.sign(SIGNING_LABEL + body)
    for fake in (bytes(32), b"\xff" * 32, SigningKey.generate().public_key().to_bytes()):
        msg, _ = seal_request(KP.public_bytes(), fake + sig + body, info=OWNER_INFO)
        _only((TamperedMessage,), open_key_release, KP, msg, NONCE)


# ------------------------------------------------------------------------------------------- freshness framing


@FUZZ
@given(st.binary(max_size=64))
def test_parse_fresh_returns_a_split_or_tampered(data):
    try:
        rid, ts, payload = parse_fresh(data)
    except TamperedMessage:
        return
    except Exception as e:
        pytest.fail(f"parse_fresh raised undocumented {type(e).__name__}: {e}")
    assert len(rid) == 16 and isinstance(ts, float) and payload == data[25:]


@FUZZ
@given(st.binary(max_size=64))
def test_check_fresh_on_garbage_raises_only_trust_errors(data):
    g = ReplayGuard(window_s=60, clock=lambda: 1_700_000_000.0)
    try:
        g.check_fresh(data)
    except (TamperedMessage, ReplayedMessage):
        return
    except Exception as e:
        pytest.fail(f"check_fresh raised undocumented {type(e).__name__}: {e}")
    # accepted: then the timestamp really was inside the window
    _, ts, _ = parse_fresh(data)
    assert math.isfinite(ts) and abs(ts - 1_700_000_000.0) <= 60


@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, 1_700_000_000.0 + 61])
def test_non_finite_or_far_timestamps_are_replays(ts):
    g = ReplayGuard(window_s=60, clock=lambda: 1_700_000_000.0)
    import struct

    framed = struct.pack(">B16sd", 1, b"r" * 16, ts) + b"payload"
    _only((ReplayedMessage,), g.check_fresh, framed)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.integers(1, 6), st.lists(st.tuples(st.integers(0, 7), st.floats(-15, 15), st.floats(0, 8)), max_size=60))
def test_replay_guard_never_accepts_the_same_request_twice_and_stays_bounded(max_entries, ops):
    """Model-based: (id, timestamp) pairs are requests; a request is accepted at most once, ever,
    whatever the clock does (forward) and however small the cache is (eviction fails closed)."""
    now = [1_700_000_000.0]
    g = ReplayGuard(window_s=10.0, max_entries=max_entries, clock=lambda: now[0])
    accepted: set[tuple[bytes, float]] = set()
    sent: list[tuple[bytes, float]] = []
    for rid_i, ts_off, advance in ops:
        now[0] += advance
        # half the time a new request, half the time the host replays an old one
        if sent and rid_i % 2:
            rid, ts = sent[rid_i % len(sent)]
        else:
            rid, ts = bytes([rid_i]) * 16, now[0] + ts_off
            sent.append((rid, ts))
        try:
            g.check(rid, ts)
        except ReplayedMessage:
            pass
        else:
            assert (rid, ts) not in accepted, "a replayed request was accepted"
            assert abs(now[0] - ts) <= 10.0
            accepted.add((rid, ts))
        assert len(g) <= max_entries and len(g._by_time) <= max_entries


def test_replay_guard_memory_is_bounded_under_a_flood():
    now = [1_700_000_000.0]
    g = ReplayGuard(window_s=120, max_entries=500, clock=lambda: now[0])
    for i in range(5000):
        now[0] += 0.001
        g.check(i.to_bytes(16, "big"), now[0])
    assert len(g) <= 500 and len(g._by_time) <= 500
    with pytest.raises(ReplayedMessage):  # the earliest ones were evicted, and still refused
        g.check((0).to_bytes(16, "big"), 1_700_000_000.001)
    with pytest.raises(ReplayedMessage):  # the latest ones are remembered
        g.check((4999).to_bytes(16, "big"), now[0])


# ------------------------------------------------------------------------------------------- key files


@pytest.fixture()
def open_umask():
    old = os.umask(0)  # the code must not rely on the caller's umask
    try:
        yield
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_signing_key_file_is_0600_even_over_an_existing_world_readable_file(tmp_path, open_umask):
    p = tmp_path / "owner.pem"
    keyfiles.save_signing_key(SigningKey.generate(), p)
    assert _mode(p) == 0o600
    q = tmp_path / "existing.pem"
    q.write_bytes(b"old")
    os.chmod(q, 0o644)
    keyfiles.save_signing_key(SigningKey.generate(), q)
    assert _mode(q) == 0o600
    r = tmp_path / "created.pem"
    keyfiles.load_or_create_signing_key(r)
    assert _mode(r) == 0o600


def test_model_key_file_is_0600_and_never_overwritten(tmp_path, open_umask):
    from enclaveml.models.bundle import load_model_key, save_model_key

    p = tmp_path / "b.modelkey"
    save_model_key(p, MODEL_KEY)
    assert _mode(p) == 0o600 and load_model_key(p) == MODEL_KEY
    with pytest.raises(UserInputError):
        save_model_key(p, generate_key())
    assert load_model_key(p) == MODEL_KEY


def test_sim_platform_seed_is_0600_and_a_readable_one_is_refused(tmp_path, open_umask):
    from enclaveml.tee.sim import SEED_FILE, sim_platform_public_key

    d = tmp_path / "plat"
    sim_platform_public_key(d)
    assert _mode(d / SEED_FILE) == 0o600
    assert _mode(d) & 0o077 == 0
    os.chmod(d / SEED_FILE, 0o644)
    with pytest.raises(UserInputError):
        sim_platform_public_key(d)


def test_caltrain_owner_private_files_are_0600(tmp_path, open_umask):
    from enclaveml.train import owner

    p = tmp_path / "linkage.key"
    p.write_bytes(b"")
    os.chmod(p, 0o666)
    owner._write_private(p, b"secret")
    assert _mode(p) == 0o600 and p.read_bytes() == b"secret"


def test_every_trust_error_is_an_enclaveml_error():
    for cls in (TamperedMessage, ReplayedMessage, Unauthorized, UserInputError):
        assert issubclass(cls, EnclaveMLError)


def test_replay_guard_is_not_fooled_by_the_host_rolling_the_clock_back():
    now = [1_700_000_000.0]
    g = ReplayGuard(window_s=120, clock=lambda: now[0])
    framed = frame_fresh(b"payload", clock=lambda: now[0])
    assert g.check_fresh(framed) == b"payload"
    now[0] += 1000  # the request expires; its id is forgotten on the next check
    g.check_fresh(frame_fresh(b"other", clock=lambda: now[0]))
    now[0] -= 1000  # the host rolls the system clock back
    with pytest.raises(ReplayedMessage):
        g.check_fresh(framed)
