"""HTTP client of the training host, and attestation of its enclave (participant and owner side).

Trust side: participant / owner. The host is untrusted: what it returns is either evidence we
verify against our policy, ciphertext only the enclave or we can open, or status we only display.
Error replies come back as the same `enclaveml.errors` class the server raised.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import errors as _errors
from ..errors import EnclaveMLError, UserInputError


class HostClient:
    def __init__(self, url: str, timeout: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def _check(self, r):
        if r.status_code >= 400:
            try:
                body = r.json()
                cls = getattr(_errors, str(body.get("error")), None)
                msg = str(body.get("message", ""))[:500]
            except ValueError:
                cls, msg = None, r.text[:200]
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

    def attest(self, policy_path: str | Path) -> tuple[bytes, bytes]:
        """Fetch fresh evidence and verify it with the policy: (enclave public key, nonce)."""
        from ..tee import Evidence, bind_report_data, load_policy, verify_evidence

        policy = load_policy(policy_path)
        nonce = os.urandom(32)
        body = self.get("/evidence", nonce=nonce.hex()).json()
        try:
            pub = bytes.fromhex(body["public_key"])
            ev = Evidence.from_dict(body["evidence"])
        except (KeyError, ValueError, TypeError):
            raise _errors.EvidenceRejected("the server's evidence answer is malformed") from None
        verify_evidence(ev, policy, bind_report_data(pub, nonce))
        return pub, nonce

    def close(self) -> None:
        self.http.close()
