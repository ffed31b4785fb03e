"""Owner -> enclave commands, signed by the owner and sealed to the attested enclave key.

Trust side: owner (`seal_*`) and enclave (`open_*`). The main use is the **key release** at
deploy time: after verifying the enclave's evidence (which binds SHA-256(enclave public key ||
nonce)), the owner sends it the model key. Delete and replace use the same envelope, and the
enclave accepts them only from the owner key a deployment was created with (`require_owner`).

Wire format (docs/crypto.md):

    msg       = HPKE request (enc || ct) to the enclave key, info "enclaveml/v1 owner-command", aad ""
                (in the suite the owner names, `crypto.suites`: native X25519 by default, or
                e.g. the ML-KEM-768 + X25519 hybrid sealed to the enclave's attested hybrid key)
    plaintext = owner public key (32) || Ed25519 signature (64) || body
    body      = canonical JSON (sorted keys, no spaces, UTF-8) of
                {"v": 1, "command": str, "model_id": str, "nonce": hex, "enclave": hex, "args": {...}}
    signature = Ed25519(owner, "enclaveml/v1 owner-command\\0" || body)

Signed, then encrypted: the host sees neither the model key nor who the owner is; the signature
names the target enclave key and the attestation nonce, so a command cannot be replayed to a
later enclave session or redirected to another enclave. The enclave checks the nonce it issued
(`expected_nonce`); the JSON is parsed only after the signature verifies, and then with
`wirejson.loads_untrusted` (bounded depth, finite numbers): the signer is whoever the message
names, so the body is hostile input until the owner is checked.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import TamperedMessage, Unauthorized
from . import _hazmat as hz
from .hpke import HpkeKeyPair
from .suites import DEFAULT, MLKEM768_X25519, EnclaveKeys, open_any, seal_with
from .signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, SigningKey, VerifyKey
from .wirejson import loads_untrusted

INFO = b"enclaveml/v1 owner-command"
SIGNING_LABEL = b"enclaveml/v1 owner-command\x00"
RELEASE_KEY = "release-key"
MAX_NONCE_BYTES = 128
#: Nesting allowed in a command body ({"args": {"config": {...: [...]}}} is 4 deep).
MAX_BODY_DEPTH = 16


@dataclass(frozen=True)
class OwnerCommand:
    """A verified command: `owner` signed it for this enclave key and this nonce."""

    owner: VerifyKey
    command: str
    model_id: str
    nonce: bytes
    args: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class KeyRelease:
    """A verified model-key release; `model_key` is kept out of `repr`."""

    owner: VerifyKey
    model_id: str
    model_key: bytes = field(repr=False)
    nonce: bytes = field(repr=False)


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def seal_owner_command(owner: SigningKey, enclave_public: bytes, command: str, model_id: str,
                       nonce: bytes, args: dict[str, Any] | None = None, suite: str = DEFAULT,
                       pq_public: bytes | None = None) -> bytes:
    """Owner side: sign `command` for `model_id`, bound to the enclave key and its nonce, and seal it
    in `suite` (the hybrid suite seals to `pq_public`, the enclave's attested hybrid key; the
    signed body always names the classic `enclave_public`, which the evidence binds first)."""
    if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
        raise ValueError(f"nonce must be 1 to {MAX_NONCE_BYTES} bytes")
    body = _canonical({"v": 1, "command": str(command), "model_id": str(model_id), "nonce": bytes(nonce).hex(),
                       "enclave": bytes(enclave_public).hex(), "args": dict(args or {})})
    sig = owner.sign(SIGNING_LABEL + body)
    if suite == MLKEM768_X25519 and pq_public is None:
        raise ValueError("the hybrid suite needs the enclave's attested hybrid public key")
    recipient = pq_public if suite == MLKEM768_X25519 else enclave_public
    msg, _ = seal_with(suite, recipient, owner.public_key().to_bytes() + sig + body, aad=b"", info=INFO)
    return msg


def open_owner_command(kp: "HpkeKeyPair | EnclaveKeys", msg: bytes,
                       expected_nonce: bytes | None = None) -> OwnerCommand:
    """Enclave side: decrypt (any suite `kp` accepts), verify the signature, then parse;
    `TamperedMessage` on any failure."""
    pt, _ = open_any(kp, msg, aad=b"", info=INFO)
    if isinstance(kp, EnclaveKeys):
        kp = kp.classic
    if len(pt) < PUBLIC_KEY_BYTES + SIGNATURE_BYTES + 2:
        raise TamperedMessage("owner command is truncated")
    raw_owner, sig, body = pt[:PUBLIC_KEY_BYTES], pt[PUBLIC_KEY_BYTES:PUBLIC_KEY_BYTES + SIGNATURE_BYTES], \
        pt[PUBLIC_KEY_BYTES + SIGNATURE_BYTES:]
    try:
        owner = VerifyKey.from_bytes(raw_owner)
    except Exception:
        raise TamperedMessage("owner command carries an invalid owner key") from None
    owner.verify(sig, SIGNING_LABEL + body)  # authenticate before parsing
    try:
        d = loads_untrusted(body, max_depth=MAX_BODY_DEPTH)  # ValueError on any hostile shape
        if type(d.get("v")) is not int or d.get("v") != 1:  # `true` is not version 1
            raise ValueError("version")
        command, model_id, args = d["command"], d["model_id"], d["args"]
        nonce, enclave = bytes.fromhex(d["nonce"]), bytes.fromhex(d["enclave"])
        if not (isinstance(command, str) and isinstance(model_id, str) and isinstance(args, dict)):
            raise ValueError("types")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TamperedMessage("owner command body is malformed") from None
    if not hmac.compare_digest(enclave, kp.public_bytes()):
        raise TamperedMessage("owner command was signed for another enclave key")
    if expected_nonce is not None and not hmac.compare_digest(nonce, bytes(expected_nonce)):
        raise TamperedMessage("owner command is not bound to this enclave's attestation nonce")
    return OwnerCommand(owner, command, model_id, nonce, args)


def require_owner(cmd: OwnerCommand, deployment_owner: VerifyKey) -> OwnerCommand:
    """Enclave side: a command on an existing deployment must come from the key that created it."""
    if cmd.owner != deployment_owner:
        raise Unauthorized(f"command {cmd.command!r} on {cmd.model_id!r} is not signed by the deployment's owner")
    return cmd


def seal_key_release(owner: SigningKey, enclave_public: bytes, model_id: str, model_key: bytes,
                     nonce: bytes, suite: str = DEFAULT, pq_public: bytes | None = None) -> bytes:
    """Owner side: release `model_key` for `model_id` to the attested enclave (signed + sealed)."""
    if len(model_key) != hz.REST_KEY_BYTES:
        raise ValueError("a model key is 32 bytes")
    return seal_owner_command(owner, enclave_public, RELEASE_KEY, model_id, nonce,
                              {"model_key": bytes(model_key).hex()}, suite, pq_public)


def open_key_release(kp: "HpkeKeyPair | EnclaveKeys", msg: bytes, expected_nonce: bytes | None = None) -> KeyRelease:
    """Enclave side: open a key release; `TamperedMessage` on any failure (signature checked inside)."""
    cmd = open_owner_command(kp, msg, expected_nonce)
    if cmd.command != RELEASE_KEY:
        raise TamperedMessage(f"expected a {RELEASE_KEY!r} command")
    try:
        key = bytes.fromhex(cmd.args["model_key"])
    except (KeyError, TypeError, ValueError):
        raise TamperedMessage("key release carries no valid model key") from None
    if len(key) != hz.REST_KEY_BYTES:
        raise TamperedMessage("key release carries no valid model key")
    return KeyRelease(cmd.owner, cmd.model_id, key, cmd.nonce)
