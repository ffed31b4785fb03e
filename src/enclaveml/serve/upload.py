"""The host's rules for accepting a model upload, once its signed header verified (no I/O).

Trust side: host. The header's format and signature are `protocol.deploy`'s; here are the
server's own limits: the id the client posted to, the allowed owner keys (`--allow-owner`), the
clock skew and the size limit, all checked before the host reads (or stores) a byte of the body.
"""

from __future__ import annotations

from ..crypto import VerifyKey
from ..errors import ReplayedMessage, TamperedMessage, Unauthorized, UserInputError
from ..protocol.deploy import UploadHeader

#: How far an upload header's timestamp may be from the host's clock (either way).
MAX_SKEW_S = 300.0


class UploadTooLarge(UserInputError):
    """An upload (as its signed header declares it, or as it arrives) is over the host's limit."""


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
