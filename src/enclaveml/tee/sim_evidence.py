"""The wire format of simulated-TEE evidence (both sides: the sim backend writes it, the verifier reads it).

A sim quote is canonical JSON `{"body": {...}, "signature": hex}` where body is
`{version, backend, measurement, report_data, timestamp, config, platform_key}` and the signature is
Ed25519 by the sim platform key over `DOMAIN || canonical_json(body)`. Why Ed25519: deterministic,
no nonce to get wrong, small keys, in `cryptography`. Why the domain prefix: the platform key must
never sign something that could be mistaken for another enclaveml message.
"""

from __future__ import annotations

import json
from typing import Any

DOMAIN = b"enclaveml sim evidence v1\x00"
VERSION = 1
MAX_QUOTE_BYTES = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only: one byte string per value, for hashing and signing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def signed_message(body: dict[str, Any]) -> bytes:
    return DOMAIN + canonical_json(body)


def encode_quote(body: dict[str, Any], signature: bytes) -> bytes:
    return canonical_json({"body": body, "signature": signature.hex()})
