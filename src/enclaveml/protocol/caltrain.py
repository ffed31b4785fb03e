"""CalTrain's HTTP messages between participants, the owner and the training host (JSON, no I/O).

Trust side: all. Participants and the owner build requests and read answers (`train/client.py`);
the host reads requests and builds answers (`train/host.py`). Binary fields travel as base64. The
instances and owner commands inside are sealed to the enclave (`train/instances.py`,
`crypto.seal_owner_command`); these envelopes only carry them:

    POST /contribute     {"uploads": [b64, ...]}   -> {"results": [RESULT, ...]} (one per upload)
        RESULT = {"status": "accepted" | "exists", "participant": hex}
               | {"status": "rejected", "error": kind, "reason": text}
    POST /train/start    {"run_id": R, "command": b64, "checkpoint_every": n}   -> run status JSON
    POST /train/release  {"run_id": R, "command": b64}   -> {"release": b64}
    POST /train/audit    {"run_id": R, "command": b64}   -> {"audit": b64}

A host that gets a malformed request answers `UserInputError` (400); a client that gets a
malformed answer raises `TamperedMessage` (the host is untrusted).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from ..errors import TamperedMessage, UserInputError

#: Uploads in one /contribute request.
MAX_UPLOADS_PER_REQUEST = 512
DEFAULT_CHECKPOINT_EVERY = 50


def b64e(b: bytes) -> str:
    return base64.b64encode(bytes(b)).decode()


def b64d(s: Any, what: str, error: type = UserInputError) -> bytes:
    """Strict base64 (`error` for anything else: UserInputError host side, TamperedMessage client side)."""
    try:
        return base64.b64decode(str(s), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise error(f"{what} is not base64") from None


@dataclass(frozen=True)
class ContributeRequest:
    """Sealed, signed instances (`train.instances.make_upload`), in one request."""

    uploads: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {"uploads": [b64e(u) for u in self.uploads]}

    @classmethod
    def from_json(cls, body: Any) -> "ContributeRequest":
        ups = body.get("uploads") if isinstance(body, dict) else None
        if not isinstance(ups, list):
            raise UserInputError("body must be {\"uploads\": [base64, ...]}")
        if len(ups) > MAX_UPLOADS_PER_REQUEST:
            raise UserInputError(f"at most {MAX_UPLOADS_PER_REQUEST} uploads per request")
        return cls(tuple(b64d(u, "upload") for u in ups))


@dataclass(frozen=True)
class ContributeResult:
    """What the host did with one upload: "accepted", "exists" (already held) or "rejected"."""

    status: str
    participant: "str | None" = None
    error: "str | None" = None
    reason: "str | None" = None

    def to_json(self) -> dict[str, Any]:
        if self.status == "rejected":
            return {"status": self.status, "error": self.error, "reason": self.reason}
        return {"status": self.status, "participant": self.participant}

    @classmethod
    def from_json(cls, r: Any) -> "ContributeResult":
        if not isinstance(r, dict) or not isinstance(r.get("status"), str):
            raise TamperedMessage("the server's /contribute answer is malformed")
        opt = {k: (str(r[k])[:500] if r.get(k) is not None else None) for k in ("participant", "error", "reason")}
        return cls(r["status"][:32], **opt)


def encode_contribute_answer(results: "list[ContributeResult]") -> dict[str, Any]:
    return {"results": [r.to_json() for r in results]}


def decode_contribute_answer(body: Any, n: int) -> list[ContributeResult]:
    """Client side: exactly one result per upload sent (`TamperedMessage` otherwise)."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != n:
        raise TamperedMessage("the server's /contribute answer is malformed")
    return [ContributeResult.from_json(r) for r in results]


@dataclass(frozen=True)
class RunCommand:
    """An owner command for a training run (start, release, audit), sealed to the enclave.

    `checkpoint_every` travels with a start only (None: not sent)."""

    run_id: str
    command: bytes
    checkpoint_every: "int | None" = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_id": self.run_id, "command": b64e(self.command)}
        if self.checkpoint_every is not None:
            out["checkpoint_every"] = self.checkpoint_every
        return out

    @classmethod
    def from_json(cls, body: Any, start: bool = False) -> "RunCommand":
        if not isinstance(body, dict):
            raise UserInputError("body must be a JSON object")
        every = None
        if start:
            try:
                every = int(body.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY))
            except (TypeError, ValueError):
                raise UserInputError("checkpoint_every must be an integer") from None
        return cls(str(body.get("run_id", "")), b64d(body.get("command", ""), "command"), every)


def encode_sealed_answer(what: str, sealed: bytes) -> dict[str, Any]:
    """Host side: {"release": b64} or {"audit": b64} (sealed to the owner's reply key)."""
    return {what: b64e(sealed)}


def decode_sealed_answer(what: str, body: Any) -> bytes:
    """Owner side: the sealed bytes of a release or audit answer (`TamperedMessage` if malformed)."""
    if not isinstance(body, dict) or what not in body:
        raise TamperedMessage(f"the server's {what} answer is malformed")
    return b64d(body[what], f"the server's {what} answer", TamperedMessage)
