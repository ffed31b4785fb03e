"""HTTP client of the training host, and attestation of its enclave (participant and owner side).

Trust side: participant / owner. The host is untrusted: what it returns is either evidence we
verify against our policy, ciphertext only the enclave or we can open, or status we only display.
Error replies come back as the same `enclaveml.errors` class the server raised. Every JSON answer
is parsed with `crypto.loads_untrusted` (`json_of`); a malformed one raises `TamperedMessage`.
The requests and answers are `protocol.caltrain`'s typed messages (`contribute`, `start`,
`release`, `audit`) and `protocol.attest`'s evidence answer.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import errors as _errors
from ..crypto import loads_untrusted
from ..errors import EnclaveMLError, PolicyViolation, TamperedMessage, UserInputError
from ..protocol import caltrain as msg
from ..protocol.attest import EvidenceAnswer

MAX_ANSWER_BYTES = 64 << 20


def json_of(r, what: str = "answer") -> dict:
    """The host's JSON answer as a dict, parsed as hostile input (depth/size bounded, finite numbers)."""
    try:
        body = loads_untrusted(r.content, max_bytes=MAX_ANSWER_BYTES)
    except ValueError:
        raise TamperedMessage(f"the server's {what} is not valid JSON") from None
    if not isinstance(body, dict):
        raise TamperedMessage(f"the server's {what} is not a JSON object")
    return body


class HostClient:
    def __init__(self, url: str, timeout: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def _check(self, r):
        if r.status_code >= 400:
            try:
                body = json_of(r, "error answer")
                cls = getattr(_errors, str(body.get("error")), None)
                msg = str(body.get("message", ""))[:500]
            except TamperedMessage:
                cls, msg = None, r.content[:200].decode("utf-8", "replace")
            if isinstance(cls, type) and issubclass(cls, EnclaveMLError):
                raise cls(f"server: {msg}")
            raise UserInputError(f"server answered {r.status_code}: {msg}")
        return r

    def get(self, path: str, **params):
        import httpx

        try:
            return self._check(self.http.get(path, params=params))
        except httpx.TransportError as e:
            raise UserInputError(f"cannot reach {self.url} ({type(e).__name__})") from None

    def post(self, path: str, body: dict):
        import httpx

        try:
            return self._check(self.http.post(path, json=body))
        except httpx.TransportError as e:
            raise UserInputError(f"cannot reach {self.url} ({type(e).__name__})") from None

    def get_json(self, path: str, **params) -> dict:
        return json_of(self.get(path, **params), f"answer to {path}")

    def post_json(self, path: str, body: dict) -> dict:
        return json_of(self.post(path, body), f"answer to {path}")

    def contribute(self, uploads: "list[bytes]") -> "list[msg.ContributeResult]":
        """Send sealed instances; one result per upload (`TamperedMessage` for a malformed answer)."""
        body = self.post_json("/contribute", msg.ContributeRequest(tuple(uploads)).to_json())
        return msg.decode_contribute_answer(body, len(uploads))

    def start(self, run_id: str, command: bytes, checkpoint_every: int = msg.DEFAULT_CHECKPOINT_EVERY) -> dict:
        """Start (or attach to, or resume) a run with the owner's sealed start command: its status."""
        return self.post_json("/train/start", msg.RunCommand(run_id, command, checkpoint_every).to_json())

    def release(self, run_id: str, command: bytes) -> bytes:
        """The finished run's model and linkage key, sealed to the reply key in `command`."""
        return msg.decode_sealed_answer("release", self.post_json("/train/release", msg.RunCommand(run_id, command).to_json()))

    def audit(self, run_id: str, command: bytes) -> bytes:
        """The run's label audit, signed by the enclave and sealed to the reply key in `command`."""
        return msg.decode_sealed_answer("audit", self.post_json("/train/audit", msg.RunCommand(run_id, command).to_json()))

    def plan(self):
        """The training plan the server says it runs, and its hash (the host's word until `attest`)."""
        from .plan import plan_from_answer

        return plan_from_answer(self.get_json("/info"))

    def attest(self, policy_path: str | Path, plan_hash: bytes | None = None) -> tuple[bytes, bytes]:
        """Fetch fresh evidence and verify it with the policy: (enclave public key, nonce).

        The evidence must also name the training plan `plan_hash` (upper half of the report data,
        `plan.plan_report_data`); None takes the plan the server describes, which this then proves.
        """
        from ..tee import Evidence, load_policy, verify_evidence
        from .plan import plan_report_data

        policy = load_policy(policy_path)
        from ..crypto.suites import POST_QUANTUM

        c = policy.crypto
        if {c.get("suite"), *c.get("models", {}).values()} & POST_QUANTUM:
            raise PolicyViolation("the policy names the hybrid (post-quantum) suite, which CalTrain does not offer "
                                  "yet (its uploads, commands and releases use X25519); refusing rather than "
                                  "using a weaker suite")
        if plan_hash is None:
            plan_hash = self.plan()[1]
        nonce = os.urandom(32)
        try:
            answer = EvidenceAnswer.from_dict(self.get_json("/evidence", nonce=nonce.hex()))
        except TamperedMessage:
            raise _errors.EvidenceRejected("the server's evidence answer is malformed") from None
        pub, ev = answer.public_key, Evidence.from_dict(answer.evidence)
        try:
            verify_evidence(ev, policy, plan_report_data(pub, nonce, plan_hash))
        except _errors.EvidenceRejected as e:
            if "report data" not in str(e):
                raise
            raise _errors.EvidenceRejected(f"the enclave does not run the training plan {plan_hash.hex()[:16]}... "
                                           f"that the server describes, or the evidence is not for this key and "
                                           f"nonce ({e})") from None
        return pub, nonce

    def close(self) -> None:
        self.http.close()
