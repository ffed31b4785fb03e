"""The signed header that opens a model upload: pure encode/parse/verify, no I/O.

Trust side: owner (`sign_upload`) and host (`parse_upload_header`, `check_upload_header`). Why:
the host must not buffer, or even write to disk, megabytes from anyone who asks. An upload
(POST /v1/models/{model}) starts with a small header the owner signs; the host reads only that
header (at most `MAX_HEADER_BYTES`), verifies the signature, the size and the freshness, and only
then streams the body to disk, hashing it as it goes (docs/serving.md, docs/crypto.md):

    upload  = u16 big-endian n || header (n bytes, n <= 4096) || body (exactly "size" bytes)
    header  = owner public key (32) || Ed25519 signature (64) || canonical JSON (sorted keys,
              no spaces, UTF-8) of {"v": 1, "model": id, "size": body bytes,
                                    "sha256": hex SHA-256 of body, "ts": unix seconds}
    signature = Ed25519(owner, "enclaveml/v1 upload\\0" || JSON)
    body    = protocol.pack_parts(key_release + bundle files), as before

The header proves only that *some* key signed this upload (unless the server restricts the keys
with `--allow-owner`): it binds the body, its size and the model id to that key and to a time,
so the host checks size and owner before reading the body and refuses a body that is not the one
signed. It is not a replay guard: the key release inside carries the enclave's one-use nonce.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from ..crypto import SigningKey, VerifyKey, loads_untrusted
from ..crypto.signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from ..errors import DataError, ReplayedMessage, TamperedMessage, Unauthorized, UserInputError
from .infer import check_model_id

UPLOAD_SIGNING_LABEL = b"enclaveml/v1 upload\x00"
#: Largest signed header the host reads before it has verified anything.
MAX_HEADER_BYTES = 4096
#: How far an upload header's timestamp may be from the host's clock (either way).
MAX_SKEW_S = 300.0
_U16 = struct.Struct(">H")
PREFIX_BYTES = _U16.size


class UploadTooLarge(UserInputError):
    """An upload (as its signed header declares it, or as it arrives) is over the host's limit."""


@dataclass(frozen=True)
class UploadHeader:
    """A verified upload header: `owner` signed an upload of `size` bytes hashing to `sha256`."""

    owner: VerifyKey
    model_id: str
    size: int
    sha256: bytes
    ts: float


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_upload(owner: SigningKey, model_id: str, body: bytes, ts: float) -> bytes:
    """Owner side: the upload's prefix (u16 n || signed header); send it, then `body`."""
    check_model_id(model_id)
    doc = _canonical({"v": 1, "model": model_id, "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                      "ts": float(ts)})
    header = owner.public_key().to_bytes() + owner.sign(UPLOAD_SIGNING_LABEL + doc) + doc
    if len(header) > MAX_HEADER_BYTES:
        raise UserInputError("upload header is too large")
    return _U16.pack(len(header)) + header


def header_length(prefix: bytes) -> int:
    """The header length the upload's first `PREFIX_BYTES` announce (DataError if over the limit)."""
    if len(prefix) != PREFIX_BYTES:
        raise DataError("upload is truncated before its header")
    (n,) = _U16.unpack(prefix)
    if not PUBLIC_KEY_BYTES + SIGNATURE_BYTES + 2 <= n <= MAX_HEADER_BYTES:
        raise DataError(f"upload header must be {PUBLIC_KEY_BYTES + SIGNATURE_BYTES + 2} to {MAX_HEADER_BYTES} bytes")
    return n


def parse_upload_header(header: bytes) -> UploadHeader:
    """Verify the signature, then parse: TamperedMessage for a bad signature or body."""
    raw_owner = header[:PUBLIC_KEY_BYTES]
    sig = header[PUBLIC_KEY_BYTES:PUBLIC_KEY_BYTES + SIGNATURE_BYTES]
    doc = header[PUBLIC_KEY_BYTES + SIGNATURE_BYTES:]
    try:
        owner = VerifyKey.from_bytes(bytes(raw_owner))
    except UserInputError:
        raise TamperedMessage("upload header carries an invalid owner key") from None
    owner.verify(bytes(sig), UPLOAD_SIGNING_LABEL + bytes(doc))  # authenticate before parsing
    try:
        d = loads_untrusted(bytes(doc), max_depth=2)
        if not isinstance(d, dict) or type(d.get("v")) is not int or d["v"] != 1:
            raise ValueError("version")
        model_id, size, digest, ts = d["model"], d["size"], bytes.fromhex(d["sha256"]), d["ts"]
        if (not isinstance(model_id, str) or type(size) is not int or size < 0 or len(digest) != 32
                or type(ts) not in (int, float)):
            raise ValueError("types")
    except (ValueError, KeyError, TypeError):
        raise TamperedMessage("upload header is malformed") from None
    return UploadHeader(owner, model_id, size, digest, float(ts))


def check_upload_header(h: UploadHeader, model_id: str, max_bytes: int, now: float,
                        allowed_owners: "frozenset[bytes] | None" = None) -> None:
    """The host's checks on a verified header, before it reads the body."""
    if h.model_id != model_id:
        raise TamperedMessage("upload header was signed for another model id")
    if allowed_owners is not None and h.owner.to_bytes() not in allowed_owners:
        raise Unauthorized(f"key {h.owner.fingerprint()[:16]} may not upload to this server")
    if abs(now - h.ts) > MAX_SKEW_S:
        raise ReplayedMessage(f"upload header is more than {MAX_SKEW_S:.0f} s from the host's clock")
    if h.size > max_bytes:
        raise UploadTooLarge(f"upload of {h.size} bytes is over the {max_bytes}-byte limit")


def parse_owner_keys(hex_keys: "list[str] | tuple[str, ...]") -> "frozenset[bytes] | None":
    """`--allow-owner HEX` values -> the raw keys (None: any key may upload)."""
    if not hex_keys:
        return None
    out = set()
    for k in hex_keys:
        try:
            out.add(VerifyKey.from_bytes(bytes.fromhex(k.strip())).to_bytes())
        except (ValueError, UserInputError):
            raise UserInputError(f"--allow-owner {k[:80]!r} is not a hex Ed25519 public key") from None
    return frozenset(out)
