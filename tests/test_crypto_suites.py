"""HPKE suite negotiation (crypto/suites.py): every suite round-trips, and a host that rewrites,
strips or adds a suite id, or tampers with any byte, gets a refusal, never a weaker suite."""

import pytest

from enclaveml.crypto import _hazmat as hz
from enclaveml.crypto import suites as S
from enclaveml.crypto.hpke import HpkeKeyPair
from enclaveml.errors import PolicyViolation, TamperedMessage, UserInputError

AAD = b"enclaveml/v2 infer\x00target"


@pytest.fixture(scope="module")
def keys():
    return S.EnclaveKeys.generate()


def _public(keys, suite):
    return keys.pq.public_bytes() if suite == S.MLKEM768_X25519 else keys.classic.public_bytes()


@pytest.mark.parametrize("suite", S.SUITES)
def test_round_trip_and_response_bound_to_its_request(keys, suite):
    msg, ctx = S.seal_with(suite, _public(keys, suite), b"image bytes", AAD)
    assert S.suite_of(msg) == suite
    pt, sealer = S.open_any(keys, msg, AAD)
    assert pt == b"image bytes"
    resp = sealer.seal_response(b"result", AAD)
    assert ctx.open_response(resp, AAD) == b"result"
    msg2, ctx2 = S.seal_with(suite, _public(keys, suite), b"image bytes", AAD)
    with pytest.raises(TamperedMessage):
        ctx2.open_response(resp, AAD)  # another request's context
    with pytest.raises(TamperedMessage):
        ctx.open_response(resp, b"other aad")
    with pytest.raises(TamperedMessage):
        ctx.open_response(resp[:-1])


@pytest.mark.parametrize("suite", S.SUITES)
def test_every_flipped_byte_and_wrong_aad_or_info_is_refused(keys, suite):
    msg, _ = S.seal_with(suite, _public(keys, suite), b"x" * 40, AAD)
    step = max(1, len(msg) // 97)
    for i in range(0, len(msg), step):
        bad = bytearray(msg)
        bad[i] ^= 0x01
        with pytest.raises((TamperedMessage, PolicyViolation)):
            S.open_any(keys, bytes(bad), AAD)
    with pytest.raises(TamperedMessage):
        S.open_any(keys, msg, AAD + b"!")
    with pytest.raises(TamperedMessage):
        S.open_any(keys, msg, AAD, info=b"enclaveml/v1 owner-command")
    with pytest.raises(TamperedMessage):
        S.open_any(keys, msg[:-1], AAD)


def test_rewritten_suite_id_is_refused_never_downgraded(keys):
    pq, _ = S.seal_with(S.MLKEM768_X25519, keys.pq.public_bytes(), b"secret", AAD)
    native, _ = S.seal_with(S.X25519, keys.classic.public_bytes(), b"secret", AAD)
    legacy, _ = S.seal_with(S.LEGACY, keys.classic.public_bytes(), b"secret", AAD)
    n = len(S.TAG)
    attempts = [
        pq[:n] + bytes([1]) + pq[n + 1:],          # hybrid -> native X25519
        pq[n + 1:],                                 # hybrid, tag stripped -> legacy
        native[:n] + bytes([2]) + native[n + 1:],  # native X25519 -> hybrid
        native[n + 1:],                             # native, tag stripped -> legacy (same key!)
        S.TAG + bytes([1]) + legacy,                # legacy -> tagged native X25519 (same key)
    ]
    for bad in attempts:
        with pytest.raises(TamperedMessage):
            S.open_any(keys, bad, AAD)
    with pytest.raises(TamperedMessage):
        S.open_any(keys, S.TAG + bytes([9]) + native[n + 1:], AAD)  # unknown id


def test_enclave_refuses_a_suite_it_does_not_accept():
    classic_only = S.EnclaveKeys.generate((S.LEGACY, S.X25519))
    assert classic_only.pq is None
    pq_only = S.EnclaveKeys.generate((S.MLKEM768_X25519,))
    msg, _ = S.seal_with(S.X25519, classic_only.classic.public_bytes(), b"a", AAD)
    assert S.open_any(classic_only, msg, AAD)[0] == b"a"
    legacy, _ = S.seal_with(S.LEGACY, pq_only.classic.public_bytes(), b"a", AAD)
    with pytest.raises(PolicyViolation, match="does not accept HPKE suite 'x25519-pyhpke'"):
        S.open_any(pq_only, legacy, AAD)
    pq, _ = S.seal_with(S.MLKEM768_X25519, pq_only.pq.public_bytes(), b"a", AAD)
    with pytest.raises(PolicyViolation):
        S.open_any(classic_only, pq, AAD)


def test_native_x25519_is_rfc9180_on_the_wire():
    """The native suite's message is plain RFC 9180 base mode: pyhpke opens it with the same info."""
    kp = HpkeKeyPair.generate()
    msg, _ = S.seal_with(S.X25519, kp.public_bytes(), b"hello", AAD)
    body = msg[len(S.TAG) + 1:]
    ctx = hz.SUITE.create_recipient_context(body[:32], kp._sk, info=S._info(S.X25519, S.DEFAULT_INFO, AAD))
    pt = ctx.open(body[32:], aad=b"")
    assert pt[16:] == b"hello" and len(pt) == 16 + 5


def test_hybrid_key_pair_restores_and_rejects_bad_keys():
    kp = S.PqKeyPair.generate()
    again = S.PqKeyPair.from_private_bytes(kp.private_bytes())
    assert again.public_bytes() == kp.public_bytes() and len(kp.public_bytes()) == S.PQ_PUBLIC_BYTES
    keys = S.EnclaveKeys(HpkeKeyPair.generate(), again, frozenset(S.SUITES))
    msg, _ = S.seal_with(S.MLKEM768_X25519, kp.public_bytes(), b"x", AAD)
    assert S.open_any(keys, msg, AAD)[0] == b"x"
    with pytest.raises(UserInputError):
        S.seal_with(S.MLKEM768_X25519, kp.public_bytes()[:-1], b"x")
    with pytest.raises(UserInputError):
        S.seal_with(S.X25519, kp.public_bytes(), b"x")
    with pytest.raises(UserInputError):
        S.seal_with("rot13", kp.public_bytes(), b"x")
    with pytest.raises(UserInputError):
        S.PqKeyPair.from_private_bytes(b"\x00" * 95)


def test_key_release_in_the_hybrid_suite_and_its_downgrades():
    from enclaveml.crypto import SigningKey, open_key_release, seal_key_release

    keys = S.EnclaveKeys.generate()
    owner, nonce, model_key = SigningKey.generate(), b"n" * 32, b"k" * 32
    pub, pq = keys.classic.public_bytes(), keys.pq.public_bytes()
    msg = seal_key_release(owner, pub, "m", model_key, nonce, S.MLKEM768_X25519, pq)
    rel = open_key_release(keys, msg, nonce)
    assert rel.model_key == model_key and rel.owner == owner.public_key()
    n = len(S.TAG)
    for bad in (msg[n + 1:], msg[:n] + b"\x01" + msg[n + 1:]):
        with pytest.raises(TamperedMessage):
            open_key_release(keys, bad, nonce)
    with pytest.raises(PolicyViolation):  # an enclave with no hybrid key
        open_key_release(keys.classic, msg, nonce)
    with pytest.raises(ValueError):
        seal_key_release(owner, pub, "m", model_key, nonce, S.MLKEM768_X25519)  # no hybrid key given
    legacy = seal_key_release(owner, pub, "m", model_key, nonce)  # old owners keep working
    assert open_key_release(keys, legacy, nonce).model_key == model_key


def test_policy_names_the_suite_and_refuses_unknown_ones(tmp_path):
    from enclaveml.tee import Policy, load_policy, write_policy

    p = Policy(crypto={"suite": S.X25519, "models": {"darknet": S.MLKEM768_X25519}})
    again = load_policy(write_policy(p, tmp_path / "p.toml"))
    assert again.crypto == p.crypto
    assert again.suite_for("darknet") == S.MLKEM768_X25519 and again.suite_for("other") == S.X25519
    assert again.suite_for(None) == S.X25519 and Policy().suite_for("darknet") == S.DEFAULT == S.X25519
    assert Policy(crypto={"suite": S.LEGACY}).suite_for(None) == S.LEGACY  # old enclaves: still named by a policy
    for bad in ({"suite": "x25519-weak"}, {"models": {"darknet": "none"}}, {"cipher": "x"}, {"models": ["x"]}):
        with pytest.raises(UserInputError, match="crypto"):
            Policy(crypto=bad)


def test_native_suite_opens_what_the_rfc_checked_implementation_seals():
    """With the RFC 9180 A.1 recipient key (derived from its ikmR), a base-mode message that pyhpke
    (checked against the RFC's vector in test_crypto_hpke.py) seals opens through the native path."""
    import json

    from conftest import HPKE_VECTORS

    path = HPKE_VECTORS / "rfc9180_a1_base.json"
    if not path.exists():
        pytest.skip("RFC 9180 test vector not beside this checkout")
    kp = HpkeKeyPair.derive(bytes.fromhex(json.loads(path.read_text())["ikmR"]))
    keys = S.EnclaveKeys(kp, None, frozenset({S.X25519}))
    pk = hz.SUITE.kem.deserialize_public_key(kp.public_bytes())
    enc, ctx = hz.SUITE.create_sender_context(pk, info=S._info(S.X25519, S.DEFAULT_INFO, AAD))
    response_key = b"r" * 16
    msg = S.TAG + b"\x01" + enc + ctx.seal(response_key + b"payload", aad=b"")
    pt, sealer = S.open_any(keys, msg, AAD)
    assert pt == b"payload"
    from enclaveml.crypto.hpke import RequestContext

    assert RequestContext(enc, response_key).open_response(sealer.seal_response(b"ok", AAD), AAD) == b"ok"
