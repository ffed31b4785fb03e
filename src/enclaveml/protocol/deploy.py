"""Model deployment messages: the owner-signed upload header and the multi-part body (no I/O).

Trust side: owner (`sign_upload`, `encode_upload`, `pack_parts`) and host (`header_length`,
`parse_upload_header`, `unpack_parts`; the host's acceptance rules, size limit, clock skew and
allowed owners, are `serve/upload.py`'s). Why a signed header: the host must not buffer, or even
write to disk, megabytes from anyone who asks. An upload (POST /v1/models/{model}) starts with a
small header the owner signs; the host reads only that header (at most `MAX_HEADER_BYTES`),
verifies the signature, the size and the freshness, and only then streams the body to disk,
hashing it as it goes (docs/serving.md, docs/crypto.md):

    upload  = u16 big-endian n || header (n bytes, n <= 4096) || body (exactly "size" bytes)
    header  = owner public key (32) || Ed25519 signature (64) || canonical JSON (sorted keys,
              no spaces, UTF-8) of {"v": 1, "model": id, "size": body bytes,
                                    "sha256": hex SHA-256 of body, "ts": unix seconds}
    signature = Ed25519(owner, "enclaveml/v1 upload\\0" || JSON)
    body    = pack_parts(key_release + bundle files)
    parts   = u32 n || JSON index [[name, size], ...] (n bytes) || the parts' bytes in index order

The header proves only that *some* key signed this upload (unless the server restricts the keys
with `--allow-owner`): it binds the body, its size and the model id to that key and to a time,
so the host checks size and owner before reading the body and refuses a body that is not the one
signed. It is not a replay guard: the key release inside carries the enclave's one-use nonce.
Other multi-part bodies are `pack_parts` alone.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..crypto import SigningKey, VerifyKey, loads_untrusted
from ..crypto.signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from ..errors import DataError, TamperedMessage, UserInputError
from .identity import check_model_id

UPLOAD_SIGNING_LABEL = b"enclaveml/v1 upload\x00"
#: Largest signed header the host reads before it has verified anything.
MAX_HEADER_BYTES = 4096
_U16 = struct.Struct(">H")
PREFIX_BYTES = _U16.size
_U32 = struct.Struct(">I")
#: Parts of a model upload: the key release plus the bundle files (see models/bundle.py).
KEY_RELEASE = "key_release"


@dataclass(frozen=True)
class UploadHeader:
    """A verified upload header: `owner` signed an upload of `size` bytes hashing to `sha256`."""

    owner: VerifyKey
    model_id: str
    size: int
    sha256: bytes
    ts: float


@dataclass(frozen=True)
class DeployAnswer:
    """The host's answer to a deployment (JSON): OWNERHEX/name and the public facts of the bundle
    the enclave accepted (the host's word: the client trusts only the sealed identity)."""

    model: str
    name: str
    owner: str
    bundle_id: str
    k: int
    head: int
    replaced: bool

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "name": self.name, "owner": self.owner, "bundle_id": self.bundle_id,
                "k": self.k, "head": self.head, "replaced": self.replaced}

    @classmethod
    def from_dict(cls, d: Any) -> "DeployAnswer":
        try:
            if not isinstance(d, dict):
                raise TypeError
            out = cls(str(d["model"]), str(d["name"]), str(d["owner"]), str(d["bundle_id"]), d["k"], d.get("head", 0),
                      d.get("replaced") is True)
            if type(out.k) is not int or type(out.head) is not int:
                raise TypeError
            return out
        except (KeyError, TypeError):
            raise TamperedMessage("the server's deployment answer is malformed") from None


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


def encode_upload(owner: SigningKey, model_id: str, key_release: bytes, files: dict[str, bytes], ts: float) -> bytes:
    """Owner side: the whole upload (signed header, then the parts: key release + bundle files)."""
    body = pack_parts({KEY_RELEASE: key_release, **files})
    return sign_upload(owner, model_id, body, ts) + body


def pack_parts(parts: dict[str, bytes]) -> bytes:
    """Several named byte strings in one body (no multipart parser, no pickles)."""
    index = json.dumps([[name, len(b)] for name, b in parts.items()], separators=(",", ":")).encode()
    return _U32.pack(len(index)) + index + b"".join(bytes(b) for b in parts.values())


def unpack_parts(body: bytes, allowed: tuple[str, ...] | frozenset[str], max_index: int = 65536) -> dict[str, bytes]:
    """Inverse of `pack_parts`; only `allowed` names, each once, sizes adding up exactly."""
    body = memoryview(body)
    if len(body) < _U32.size:
        raise DataError("upload body is truncated")
    (n,) = _U32.unpack_from(body)
    if n > max_index or len(body) < _U32.size + n:
        raise DataError("upload index is truncated or too large")
    try:
        index = loads_untrusted(bytes(body[_U32.size:_U32.size + n]))
        if not isinstance(index, list):
            raise ValueError
        entries = [(e[0], e[1]) for e in index
                   if isinstance(e, list) and len(e) == 2 and type(e[0]) is str and type(e[1]) is int]
        if len(entries) != len(index):
            raise ValueError
    except (ValueError, TypeError):
        raise DataError("upload index is not valid") from None
    names = [name for name, _ in entries]
    if len(set(names)) != len(names) or not set(names) <= set(allowed):
        raise DataError(f"upload parts must be distinct and among: {', '.join(sorted(allowed))}")
    if any(size < 0 for _, size in entries) or sum(size for _, size in entries) != len(body) - _U32.size - n:
        raise DataError("upload part sizes do not add up to the body")
    out, pos = {}, _U32.size + n
    for name, size in entries:
        out[name] = bytes(body[pos:pos + size])
        pos += size
    return out
