"""Model identity: who deployed a model, which bundle, split where: and what a client accepts.

Trust side: all (pure functions, no I/O). An attested enclave is not enough: a host that wipes its
store could deploy the same public network split at k=1 under the owner's name, and the client
would send it inputs whose first-layer IRs invert to near-perfect images. So every deployment is
addressed by its owner's key *and* its name (`ModelRef`: names are scoped by owner, so another key
can never shadow, block or evict the owner's model), and a client's policy pins per model the
owner key, the accepted bundle ids and the smallest split (`ModelPin`).

The pin travels with each request as its `Target`: in the clear before the HPKE message (so the
enclave can refuse before it opens or decodes anything) and as the HPKE AAD (so the host cannot
change it). The enclave checks its deployment against the target before decoding, reports its
`ModelIdentity` on request inside the attested channel (sealed: the host cannot forge it), and
repeats the identity in every sealed answer; the client checks both (`check_identity`).

    request body = u16 n || target JSON (n bytes, canonical) || HPKE message
    target       = {"v": 2, "owner": hex, "name": str, "bundle_ids": [hex, ...], "min_k": int}
    aad          = label || target JSON     (label: "enclaveml/v2 infer\\0" or "enclaveml/v2 identity\\0")
"""

from __future__ import annotations

import functools
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..crypto.wirejson import loads_untrusted
from ..errors import PolicyViolation, TamperedMessage, UserInputError

INFER_LABEL = b"enclaveml/v2 infer\x00"
IDENTITY_LABEL = b"enclaveml/v2 identity\x00"
MAX_NAME = 64
MAX_TARGET_BYTES = 4096
MAX_BUNDLE_IDS = 16
_U16 = struct.Struct(">H")
_HEX = frozenset("0123456789abcdef")


def check_name(name: str) -> str:
    """Model names are short and URL-safe: letters, digits, '-', '_', '.' (not leading)."""
    if (not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name) or name[0] == "."):
        raise UserInputError("model name must be 1 to 64 characters of [A-Za-z0-9._-], not starting with '.'")
    return name


def check_model_id(model_id: str) -> str:
    """A deployment's name in a URL or an upload (the same rule as `check_name`)."""
    return check_name(model_id)


def check_owner_hex(owner: str) -> str:
    """An owner is the hex of its 32-byte Ed25519 public key (lower case)."""
    if not isinstance(owner, str) or len(owner) != 64 or not set(owner.lower()) <= _HEX:
        raise UserInputError("an owner is 64 hex digits (an Ed25519 public key)")
    return owner.lower()


def _check_bundle_id(b: Any) -> str:
    if not isinstance(b, str) or not 1 <= len(b) <= 64 or not set(b) <= _HEX:
        raise UserInputError(f"bundle id {str(b)[:70]!r} is not 1 to 64 lower-case hex digits")
    return b


@dataclass(frozen=True)
class ModelRef:
    """A deployment's address: (owner key, name). Rendered `OWNERHEX/name` in URLs and channel ops."""

    owner: str
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner", check_owner_hex(self.owner))
        check_name(self.name)

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        owner, sep, name = str(text).partition("/")
        if not sep:
            raise UserInputError(f"model reference {str(text)[:80]!r} is not OWNER/NAME")
        return cls(owner, name)

    def short(self) -> str:
        return f"{self.owner[:16]}.../{self.name}"


@dataclass(frozen=True)
class ModelIdentity:
    """What the enclave says it has deployed under a ref (reported only inside the attested channel)."""

    owner: str
    name: str
    bundle_id: str
    k: int
    head: int = 0

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.owner, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "name": self.name, "bundle_id": self.bundle_id, "k": self.k, "head": self.head}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelIdentity":
        """From authenticated JSON; `TamperedMessage` for any bad shape (it came from the enclave)."""
        try:
            if not isinstance(d, dict):
                raise TypeError
            k, head = d["k"], d.get("head", 0)
            if type(k) is not int or type(head) is not int or k < 1 or head < 0:
                raise ValueError
            return cls(check_owner_hex(d["owner"]), check_name(d["name"]), _check_bundle_id(d["bundle_id"]), k, head)
        except (KeyError, TypeError, ValueError, UserInputError):
            raise TamperedMessage("the enclave's model identity is malformed") from None


@dataclass(frozen=True)
class ModelPin:
    """A policy's rule for one model name: its owner, the bundle ids accepted (empty: any bundle of
    that owner) and the smallest partition point k accepted."""

    owner: str
    bundle_ids: tuple[str, ...] = ()
    min_k: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner", check_owner_hex(self.owner))
        ids = self.bundle_ids
        if isinstance(ids, str) or not isinstance(ids, (list, tuple)) or len(ids) > MAX_BUNDLE_IDS:
            raise UserInputError(f"bundle_ids must be a list of at most {MAX_BUNDLE_IDS} bundle ids")
        object.__setattr__(self, "bundle_ids", tuple(sorted({_check_bundle_id(b) for b in ids})))
        if type(self.min_k) is not int or not 1 <= self.min_k <= 1 << 20:
            raise UserInputError("min_k must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "bundle_ids": list(self.bundle_ids), "min_k": self.min_k}


def check_identity(identity: ModelIdentity, ref: ModelRef, pin: ModelPin) -> ModelIdentity:
    """Refuse a deployment that is not the pinned one; the message says what differs."""
    what = f"model {ref.name!r}"
    if identity.ref != ref:
        raise PolicyViolation(f"{what}: the enclave answered for {identity.ref.short()}, not {ref.short()}")
    if not hmac.compare_digest(identity.owner, pin.owner):
        raise PolicyViolation(f"{what}: deployed by owner {identity.owner[:16]}..., the policy pins owner "
                              f"{pin.owner[:16]}...")
    if pin.bundle_ids and identity.bundle_id not in pin.bundle_ids:
        raise PolicyViolation(f"{what}: deployed bundle {identity.bundle_id} is not among the pinned bundle ids "
                              f"({', '.join(pin.bundle_ids)}); the owner adds it with `enclaveml attest pin`")
    if identity.k < pin.min_k:
        raise PolicyViolation(f"{what}: deployed split k={identity.k} is shallower than the pinned minimum "
                              f"k={pin.min_k} (its IR may reveal the input)")
    return identity


# -- the request target (the pin, bound to each request) -----------------------------------

@dataclass(frozen=True)
class Target:
    """Which deployment a request is for and what it accepts: the ref plus the pin."""

    ref: ModelRef
    pin: ModelPin

    def __post_init__(self) -> None:
        if self.pin.owner != self.ref.owner:
            raise UserInputError("a request's pinned owner must be the owner it addresses")

    def to_bytes(self) -> bytes:
        """Canonical JSON (made once per target: a client sends it, and binds it, every request)."""
        raw = self.__dict__.get("_raw")
        if raw is None:
            raw = json.dumps({"v": 2, "owner": self.ref.owner, "name": self.ref.name,
                              "bundle_ids": list(self.pin.bundle_ids), "min_k": self.pin.min_k},
                             sort_keys=True, separators=(",", ":")).encode()
            object.__setattr__(self, "_raw", raw)  # not a field: equality and hash are unchanged
        return raw

    @classmethod
    def from_bytes(cls, data: bytes) -> "Target":
        try:
            d = loads_untrusted(data, max_depth=3)
            if not isinstance(d, dict) or type(d.get("v")) is not int or d["v"] != 2:
                raise ValueError
            ref = ModelRef(d["owner"], d["name"])
            t = cls(ref, ModelPin(ref.owner, tuple(d["bundle_ids"]), d["min_k"]))
        except (ValueError, KeyError, TypeError, UserInputError):
            raise TamperedMessage("request target is malformed") from None
        if t.to_bytes() != bytes(data):  # one encoding only: what the AAD binds is what was parsed
            raise TamperedMessage("request target is not canonical")
        return t

    def allows(self, identity: ModelIdentity) -> ModelIdentity:
        return check_identity(identity, self.ref, self.pin)


def frame_target(target: Target, message: bytes) -> bytes:
    """Client side: the request body (target in the clear, then the HPKE message)."""
    t = target.to_bytes()
    return _U16.pack(len(t)) + t + bytes(message)


def split_target(body: bytes) -> tuple[Target, bytes, bytes]:
    """Enclave side: (target, its exact bytes for the AAD, HPKE message); `TamperedMessage` if malformed."""
    body = memoryview(body)
    if len(body) < _U16.size:
        raise TamperedMessage("request is truncated")
    (n,) = _U16.unpack_from(body)
    if n > MAX_TARGET_BYTES or len(body) < _U16.size + n:
        raise TamperedMessage("request target is truncated or too large")
    raw = bytes(body[_U16.size:_U16.size + n])
    return _parse_target(raw), raw, bytes(body[_U16.size + n:])


@functools.lru_cache(maxsize=1024)
def _parse_target(raw: bytes) -> Target:
    # A client sends the same target with every request: parse (and re-encode, to check it is
    # canonical) once. Targets are immutable; a malformed one raises and is not cached.
    return Target.from_bytes(raw)


def infer_aad(target_bytes: bytes) -> bytes:
    return INFER_LABEL + bytes(target_bytes)


def identity_aad(target_bytes: bytes) -> bytes:
    return IDENTITY_LABEL + bytes(target_bytes)


def encode_identity(identity: ModelIdentity) -> bytes:
    return json.dumps({"v": 2, **identity.to_dict()}, sort_keys=True, separators=(",", ":")).encode()


def decode_identity(data: bytes) -> ModelIdentity:
    try:
        d = loads_untrusted(bytes(data), max_depth=2)
        if not isinstance(d, dict) or type(d.get("v")) is not int or d.pop("v") != 2:
            raise ValueError
    except ValueError:
        raise TamperedMessage("the enclave's model identity is malformed") from None
    return ModelIdentity.from_dict(d)
