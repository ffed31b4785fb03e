"""Mutual attestation of the training enclaves of one data-parallel run, and their message keys.

Trust side: enclave (pure logic: no I/O; the hosts only carry the bytes between the rounds).
The handshake, for world size N, every enclave r at once:

    round 1  hello_r     = challenge_r (32 random bytes) || X25519 public key_r
    session  S           = SHA-256("enclaveml/v1 caltrain-dp-session\\0" || plan hash || N || hello_0 .. hello_N-1)
    round 2  evidence_r  over report data SHA-256("...caltrain-dp-peer\\0" || X25519 key_r || S) || plan hash
                         (`peer_report_data`: a tag that training evidence, SHA-256(HPKE key || nonce),
                         never carries, so neither kind can stand in for the other)
    check    every peer's evidence verifies with the peer policy: same evidence type, the same
             measurement as this enclave's own, (sim) the same trusted platform key, and report
             data naming the peer's key, this session and this enclave's own plan hash
    keys     pair key(r, s) = HKDF(X25519(r, s), salt = S, info = ranks): only the two ends know it

S covers every challenge, so each enclave's own fresh challenge makes all the evidence of the
round fresh to it, and nobody can reuse a session's evidence in another. A peer that runs other
code, another owner's configuration (measurement) or another plan (report data) is refused with
`PolicyViolation`/`EvidenceRejected` before any key is derived for it. Enclave 0 then sends each
peer, under their pair key, the run (the owner's command was sealed to enclave 0 only), a fresh
group key for the run's step messages and, on resume, its checkpointed state (`dp_enclave.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Callable

from ..crypto.peer_channel import MAX_RANKS, PeerBox, PeerKeyPair
from ..errors import EnclaveMLError, EvidenceRejected, TamperedMessage, UserInputError

HELLO_BYTES = 64
_SESSION = b"enclaveml/v1 caltrain-dp-session\x00"
_PEER_REPORT = b"enclaveml/v1 caltrain-dp-peer\x00"

#: Message purposes (the first byte of each nonce): one place per kind of message.
JOIN, GRAD, RECORDS, SUMMARY = 1, 2, 3, 4


def peer_report_data(public_key: bytes, session: bytes, plan_hash: bytes) -> bytes:
    """The 64-byte report data of a peer's evidence: SHA-256(tag || X25519 key || session) || plan.

    The tag separates it from a training enclave's `plan.plan_report_data` (SHA-256(HPKE key ||
    nonce) || plan), whose nonce the host picks: without it, the host could ask for training
    evidence with nonce = a session and present it as a peer's (security review 2026-12-01).
    """
    if len(plan_hash) != 32:
        raise ValueError("plan hash must be 32 bytes")
    return hashlib.sha256(_PEER_REPORT + bytes(public_key) + bytes(session)).digest() + bytes(plan_hash)


def session_id(plan_hash: bytes, hellos: list[bytes]) -> bytes:
    """The session every enclave of the group computes from all hellos (in rank order)."""
    h = hashlib.sha256(_SESSION + bytes(plan_hash) + struct.pack(">H", len(hellos)))
    for x in hellos:
        h.update(bytes(x))
    return h.digest()


def peer_policy(own_claims):
    """What a peer's evidence must show: exactly what this enclave's own evidence shows."""
    from ..tee import Policy

    keys = [own_claims.details["platform_key"]] if own_claims.backend == "sim" else []
    return Policy(allowed_backends=[own_claims.backend], measurements={own_claims.backend: [own_claims.measurement]},
                  sim_platform_keys=keys, allow_debug=bool(own_claims.details.get("debug", False)))


#: Evidence details a peer must share with this enclave beyond the policy's measurement: on TDX the
#: measurement is MRTD only, so the runtime registers (kernel, application), the configuration id,
#: owner fields, TD attributes and XFAM must match too (security review of 2026-12-01).
SAME_DETAILS = ("rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3", "mr_config_id", "mr_owner", "mr_owner_config",
                "td_attributes", "xfam")


def check_same_configuration(own_claims, peer_claims) -> None:
    """PolicyViolation unless the peer's evidence shows every `SAME_DETAILS` field this enclave's does."""
    import hmac

    from ..errors import PolicyViolation

    for k in SAME_DETAILS:
        if k in own_claims.details:
            theirs = peer_claims.details.get(k)
            if not isinstance(theirs, str) or not hmac.compare_digest(theirs.encode(), str(own_claims.details[k]).encode()):
                raise PolicyViolation(f"a peer enclave's {k} differs from this enclave's: not the same configuration")


class PeerSession:
    """One enclave's side of the group handshake: hello -> evidence -> verify -> pair keys.

    `evidence_fn(report_data) -> evidence dict` asks this enclave's backend; `verify_fn(evidence,
    expected_report_data)` verifies a peer's evidence against the peer policy and raises if it
    does not verify (the enclave builds it with `peer_policy` and `tee.verify_evidence`).
    """

    def __init__(self, rank: int, world: int, plan_hash: bytes, evidence_fn: Callable[[bytes], dict],
                 verify_fn: Callable[[dict, bytes], None]):
        if isinstance(world, bool) or not 1 <= int(world) <= MAX_RANKS or not 0 <= int(rank) < int(world):
            raise UserInputError(f"enclave rank {rank} of {world} is out of range (1..{MAX_RANKS} enclaves)")
        self.rank, self.world, self.plan_hash = int(rank), int(world), bytes(plan_hash)
        self._evidence_fn, self._verify_fn = evidence_fn, verify_fn
        self._keys = PeerKeyPair()
        self._challenge = os.urandom(32)
        self.session: bytes | None = None
        self._pubs: list[bytes] = []
        self._pair: dict[int, bytes] = {}

    def hello(self) -> bytes:
        return self._challenge + self._keys.public_bytes()

    def attest(self, hellos: list[bytes]) -> dict:
        """All hellos (rank order) -> this enclave's evidence for the session."""
        if self.session is not None:
            raise UserInputError("this handshake has already attested")
        hellos = [bytes(h) for h in hellos]
        if len(hellos) != self.world or any(len(h) != HELLO_BYTES for h in hellos):
            raise TamperedMessage(f"expected {self.world} hellos of {HELLO_BYTES} bytes")
        if not hmac.compare_digest(hellos[self.rank], self.hello()):
            raise TamperedMessage("the host replaced this enclave's own hello")
        if len({h[32:] for h in hellos}) != self.world:
            raise TamperedMessage("two enclaves of the group present the same key")
        self.session = session_id(self.plan_hash, hellos)
        self._pubs = [h[32:] for h in hellos]
        return self._evidence_fn(peer_report_data(self._pubs[self.rank], self.session, self.plan_hash))

    def verify(self, evidences: list[dict]) -> None:
        """Every peer's evidence (rank order) must verify for its key, this session and this plan."""
        if self.session is None:
            raise UserInputError("verify before attest")
        if len(evidences) != self.world:
            raise TamperedMessage(f"expected evidence of {self.world} enclaves, got {len(evidences)}")
        for r, ev in enumerate(evidences):
            if r == self.rank:
                continue
            try:
                self._verify_fn(ev, peer_report_data(self._pubs[r], self.session, self.plan_hash))
            except EvidenceRejected as e:
                raise EvidenceRejected(f"peer enclave {r} is refused (another plan, session or key): {e}") from None
            except Exception as e:
                msg = f"peer enclave {r} is refused: {e}"
                if isinstance(e, EnclaveMLError):  # ours take one message; keep the kind (PolicyViolation...)
                    raise type(e)(msg) from None
                raise EvidenceRejected(msg) from None  # other types may not take one message
        for r in range(self.world):
            if r != self.rank:
                lo, hi = min(r, self.rank), max(r, self.rank)
                self._pair[r] = self._keys.pair_key(self._pubs[r], self.session, lo, hi)

    def verified(self) -> bool:
        """True once every peer's evidence has verified (and only then are there pair keys)."""
        return self.session is not None and len(self._pair) == self.world - 1

    def pair_box(self, peer: int) -> PeerBox:
        """The AEAD box shared with one verified peer."""
        if peer not in self._pair:
            raise UserInputError(f"no verified key for enclave {peer}")
        return PeerBox(self._pair[peer], self.session)
