"""HTTP client of the training host, and attestation of its enclave (participant and owner side).

Trust side: participant / owner. The host is untrusted: what it returns is either evidence we
verify against our policy, ciphertext only the enclave or we can open, or status we only display.
Error replies come back as the same `enclaveml.errors` class the server raised. Every JSON answer
is parsed with `crypto.loads_untrusted` (`json_of`); a malformed one raises `TamperedMessage`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import errors as _errors
from ..crypto import loads_untrusted
from ..errors import EnclaveMLError, TamperedMessage, UserInputError

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

    def attest(self, policy_path: str | Path) -> tuple[bytes, bytes]:
        """Fetch fresh evidence and verify it with the policy: (enclave public key, nonce)."""
        from ..tee import Evidence, bind_report_data, load_policy, verify_evidence

        policy = load_policy(policy_path)
        nonce = os.urandom(32)
        try:
            body = self.get_json("/evidence", nonce=nonce.hex())
            pub = bytes.fromhex(body["public_key"])
            ev = Evidence.from_dict(body["evidence"])
        except (KeyError, ValueError, TypeError, TamperedMessage):
            raise _errors.EvidenceRejected("the server's evidence answer is malformed") from None
        verify_evidence(ev, policy, bind_report_data(pub, nonce))
        return pub, nonce

    def close(self) -> None:
        self.http.close()
