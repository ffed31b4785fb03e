"""Pure pieces of data-parallel CalTrain: the peer AEAD's nonce/AAD discipline, sharding, the host's
byte framing, and the backend choice. No processes (tests/test_train_distributed.py has those)."""

from __future__ import annotations

import pytest

from enclaveml.crypto.peer_channel import BROADCAST, PeerBox, PeerKeyPair, random_key
from enclaveml.errors import TamperedMessage, UserInputError
from enclaveml.train.dp_enclave import shard_of, tags_digest
from enclaveml.train.dp_host import backend_for, pack_list, parse_address, unpack_list
from enclaveml.train.peer_keys import GRAD, RECORDS, PeerSession, session_id


def test_pair_keys_agree_only_between_the_two_ends():
    a, b, c = PeerKeyPair(), PeerKeyPair(), PeerKeyPair()
    s = bytes(32)
    assert a.pair_key(b.public_bytes(), s, 0, 1) == b.pair_key(a.public_bytes(), s, 0, 1)
    assert a.pair_key(b.public_bytes(), s, 0, 1) != c.pair_key(a.public_bytes(), s, 0, 1)
    assert a.pair_key(b.public_bytes(), s, 0, 1) != a.pair_key(b.public_bytes(), b"\x01" * 32, 0, 1)  # per session
    with pytest.raises(TamperedMessage):
        a.pair_key(b"short", s, 0, 1)


def test_every_field_of_a_peer_message_is_bound():
    box = PeerBox(random_key(), b"s" * 32)
    tok = box.seal(GRAD, 1, BROADCAST, 7, b"gradients", b"ctx")
    assert box.open(GRAD, 1, BROADCAST, 7, tok, b"ctx") == b"gradients"
    for args in [(GRAD, 1, BROADCAST, 8, b"ctx"), (GRAD, 2, BROADCAST, 7, b"ctx"), (RECORDS, 1, BROADCAST, 7, b"ctx"),
                 (GRAD, 1, 0, 7, b"ctx"), (GRAD, 1, BROADCAST, 7, b"other run")]:
        with pytest.raises(TamperedMessage, match="does not open"):
            box.open(*args[:4], tok, args[4])
    other_session = PeerBox(box._key, b"t" * 32)
    with pytest.raises(TamperedMessage):
        other_session.open(GRAD, 1, BROADCAST, 7, tok, b"ctx")
    with pytest.raises(UserInputError):
        box.seal(GRAD, 300, BROADCAST, 0, b"")


def test_session_id_depends_on_every_hello_and_the_plan():
    hellos = [bytes([i]) * 64 for i in range(3)]
    s = session_id(b"p" * 32, hellos)
    assert s != session_id(b"q" * 32, hellos)
    assert s != session_id(b"p" * 32, hellos[::-1])
    assert s != session_id(b"p" * 32, hellos[:2])


def test_handshake_arguments_are_checked():
    with pytest.raises(UserInputError):
        PeerSession(2, 2, bytes(32), lambda rd: {}, lambda e, rd: None)
    s = PeerSession(0, 2, bytes(32), lambda rd: {"rd": rd.hex()}, lambda e, rd: None)
    with pytest.raises(TamperedMessage, match="2 hellos"):
        s.attest([s.hello()])
    with pytest.raises(TamperedMessage, match="same key"):
        s.attest([s.hello(), s.hello()])
    assert not s.verified()


def test_shards_are_deterministic_and_cover_everything_once():
    tags = [f"{i:064x}" for i in range(1000)]
    for world in (1, 2, 3, 5):
        shards = [[t for t in tags if shard_of(t, world) == r] for r in range(world)]
        assert sorted(sum(shards, [])) == sorted(tags)
        assert min(len(s) for s in shards) > 1000 / world * 0.8  # balanced enough
    assert tags_digest(tags) == tags_digest(tags[::-1]) != tags_digest(tags[1:])


def test_host_framing_round_trips_and_refuses_truncation():
    items = [b"", b"a", bytes(1000)]
    assert unpack_list(pack_list(items)) == items
    with pytest.raises(TamperedMessage, match="truncated"):
        unpack_list(pack_list(items)[:-1])
    with pytest.raises(TamperedMessage, match="trailing"):
        unpack_list(pack_list(items) + b"x")


def test_backend_and_address():
    assert backend_for("cpu") == "gloo" and backend_for("cuda:1") == "nccl"
    assert parse_address("10.0.0.2:29500") == ("10.0.0.2", 29500)
    with pytest.raises(UserInputError):
        parse_address("nowhere")


def test_a_peer_must_share_the_tdx_runtime_registers_not_only_mrtd():
    """On TDX the policy's measurement is MRTD alone; a TD with the same firmware but another
    kernel or application (RTMRs) must not join the group (security review, 2026-12-01)."""
    from enclaveml.errors import PolicyViolation
    from enclaveml.tee.evidence import Claims
    from enclaveml.train.peer_keys import SAME_DETAILS, check_same_configuration

    details = {k: f"{i:02x}" * 48 for i, k in enumerate(SAME_DETAILS)}
    own = Claims("tdx", "aa" * 48, b"\0" * 64, "UpToDate", details=dict(details))
    check_same_configuration(own, Claims("tdx", "aa" * 48, b"\1" * 64, "UpToDate", details=dict(details)))
    for k in SAME_DETAILS:
        other = Claims("tdx", "aa" * 48, b"\1" * 64, "UpToDate", details={**details, k: "ff" * 48})
        with pytest.raises(PolicyViolation, match=k):
            check_same_configuration(own, other)
    missing = Claims("tdx", "aa" * 48, b"\1" * 64, "UpToDate", details={})
    with pytest.raises(PolicyViolation):
        check_same_configuration(own, missing)
    sim = Claims("sim", "bb" * 32, b"\0" * 64, "Simulated", details={"platform_key": "00"})
    check_same_configuration(sim, sim)  # nothing of the list to compare


def test_caltrain_refuses_a_policy_that_names_the_hybrid_suite(tmp_path):
    """CalTrain seals with X25519 only: a participant whose policy asks for the post-quantum suite
    is refused before anything is fetched or sent, never silently downgraded."""
    from enclaveml.errors import PolicyViolation
    from enclaveml.tee import Policy, write_policy
    from enclaveml.train.client import HostClient

    path = tmp_path / "policy.toml"
    write_policy(Policy(allowed_backends=["sim"], crypto={"suite": "mlkem768-x25519"}), path)
    client = HostClient("http://127.0.0.1:9")  # nothing listens: the refusal comes first
    try:
        with pytest.raises(PolicyViolation, match="post-quantum"):
            client.attest(path)
    finally:
        client.close()


def test_peer_evidence_and_training_evidence_cannot_stand_in_for_each_other():
    """A training enclave answers evidence for (its HPKE key, any nonce the host picks); a host
    that puts that key in a forged hello and asks for evidence with nonce = the session must not
    get evidence a peer accepts, and peer evidence must not pass as training evidence
    (security review 2026-12-01, open low finding: the two shared one report-data shape)."""
    from enclaveml.errors import EvidenceRejected
    from enclaveml.train.plan import plan_report_data

    plan = b"p" * 32


    def verify(ev, expected):
        if ev["rd"] != expected.hex():
            raise EvidenceRejected("report data differs")

    a = PeerSession(0, 2, plan, lambda rd: {"rd": rd.hex()}, verify)
    b = PeerSession(1, 2, plan, lambda rd: {"rd": rd.hex()}, verify)
    hellos = [a.hello(), b.hello()]
    ev_a = a.attest(hellos)
    b.attest(hellos)
    # the host asks enclave 1's *training* evidence op for its key with nonce = the session
    training_shaped = {"rd": plan_report_data(hellos[1][32:], b.session, plan).hex()}
    with pytest.raises(EvidenceRejected):
        a.verify([ev_a, training_shaped])
    # and a peer's evidence is not what a participant checks for that key and nonce
    assert ev_a["rd"] != plan_report_data(hellos[0][32:], a.session, plan).hex()

