"""The safe cryptographic recipes of enclaveml: pure functions and small state objects, no I/O.

Trust side: all. Clients seal requests and open responses; the enclave opens requests, seals
responses, checks freshness and opens key releases; the owner signs and seals bundles and key
releases. Every authentication failure raises `TamperedMessage` (one type, whatever the cause),
replays raise `ReplayedMessage`. JSON that crossed a trust boundary is parsed with
`loads_untrusted` (bounded depth, finite numbers, `ValueError` for anything else). Raw primitives live in the private `_hazmat` module. Pinned
choices and wire formats: docs/crypto.md.
"""

from .hpke import HpkeKeyPair, RequestContext, ResponseSealer, open_request, seal_request
from .keyrelease import (KeyRelease, OwnerCommand, open_key_release, open_owner_command, require_owner,
                         seal_key_release, seal_owner_command)
from .replay import ReplayGuard, frame_fresh, parse_fresh
from .sealing import generate_key, open_sealed, seal
from .signing import SigningKey, VerifyKey
from .suites import SUITES, EnclaveKeys, PqKeyPair, check_suite, open_any, seal_with
from .wirejson import loads_untrusted


def sha256(data: bytes) -> bytes:
    """SHA-256 digest (the one hash enclaveml uses)."""
    from ._hazmat import sha256 as _sha256

    return _sha256(data)


__all__ = [
    "HpkeKeyPair", "seal_request", "open_request", "RequestContext", "ResponseSealer",
    "SigningKey", "VerifyKey", "generate_key", "seal", "open_sealed", "ReplayGuard",
    "frame_fresh", "parse_fresh", "KeyRelease", "OwnerCommand", "seal_key_release", "open_key_release",
    "seal_owner_command", "open_owner_command", "require_owner", "sha256", "loads_untrusted",
    "SUITES", "EnclaveKeys", "PqKeyPair", "check_suite", "open_any", "seal_with",
]
