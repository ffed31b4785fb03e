"""Infenclave wire formats between client, host and enclave: pure functions, no I/O.

Trust side: all. The client builds requests and reads results; the enclave reads requests and
builds results; the host only splits upload bodies into parts. Crypto details (HPKE suite, the
OHTTP-style response, freshness header) live in `enclaveml.crypto` and docs/crypto.md.

Inference request (HTTP body of POST /v1/models/{model}/infer):

    body      = HPKE request to the attested enclave key (enc(32) || ct), info "enclaveml/v1 request",
                aad = "enclaveml/v1 infer\\0" || model id (UTF-8)   -> the host cannot redirect it
    plaintext = freshness header (version 1 || request id 16 || timestamp f64) || payload
    payload   = u16 n || options JSON (n bytes, e.g. {"top_k": 5, "logits": false}) || image bytes

Inference response (HTTP 200 body): the enclave's sealed response to that request (RFC 9458
pattern, same aad), whose plaintext is the result JSON:

    {"v": 1, "model": id, "top": [{"index": i, "label": name, "score": p}, ...],
     "logits": [...] (original class order, only if asked)}

Model upload (POST /v1/models/{model}) and other multi-part bodies: `pack_parts`:

    u32 n || JSON index [[name, size], ...] (n bytes) || the parts' bytes in index order
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from ..errors import DataError, TamperedMessage, UserInputError

INFER_AAD_LABEL = b"enclaveml/v1 infer\x00"
MAX_TOP_K = 100
MAX_OPTIONS_BYTES = 4096
MAX_MODEL_ID = 64
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

#: Parts of a model upload: the key release plus the bundle files (see models/bundle.py).
KEY_RELEASE = "key_release"


def check_model_id(model_id: str) -> str:
    """Model ids are short and URL-safe: letters, digits, '-', '_', '.'."""
    if (not isinstance(model_id, str) or not 1 <= len(model_id) <= MAX_MODEL_ID
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in model_id) or model_id[0] == "."):
        raise UserInputError("model id must be 1 to 64 characters of [A-Za-z0-9._-]")
    return model_id


def check_servable_arch(arch: dict) -> None:
    """Only zoo architectures are built by the server (host and enclave).

    Why: a manifest's `{"factory": "module:function", "kwargs": ...}` makes `build_arch` import
    and call any function the uploader names (e.g. `os:system`), in the host and, worse, in the
    enclave, which holds other owners' keys. Signing proves who uploaded, not that it is safe.
    """
    from ..models import zoo

    if set(arch) != {"zoo"} or str(arch.get("zoo")) not in zoo.ZOO:
        raise UserInputError("only zoo architectures ({'zoo': name}) can be served; "
                             f"known: {', '.join(sorted(zoo.ZOO))}")


def infer_aad(model_id: str) -> bytes:
    return INFER_AAD_LABEL + check_model_id(model_id).encode()


def encode_payload(image: bytes, top_k: int = 5, logits: bool = False) -> bytes:
    """Client side: the inner payload (options + image bytes), to frame with `crypto.frame_fresh`."""
    if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise UserInputError(f"top_k must be 1..{MAX_TOP_K}")
    opts = json.dumps({"top_k": top_k, "logits": bool(logits)}, separators=(",", ":")).encode()
    return _U16.pack(len(opts)) + opts + bytes(image)


def decode_payload(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Enclave side: (options, image bytes) from an authenticated payload."""
    if len(payload) < _U16.size:
        raise TamperedMessage("request payload is truncated")
    (n,) = _U16.unpack_from(payload)
    if n > MAX_OPTIONS_BYTES or len(payload) < _U16.size + n:
        raise TamperedMessage("request options are truncated or too large")
    try:
        opts = json.loads(payload[_U16.size:_U16.size + n])
        if not isinstance(opts, dict):
            raise ValueError
    except ValueError:
        raise DataError("request options are not a JSON object") from None
    top_k = opts.get("top_k", 5)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise DataError(f"top_k must be 1..{MAX_TOP_K}")
    return {"top_k": top_k, "logits": bool(opts.get("logits", False))}, payload[_U16.size + n:]


def encode_result(model_id: str, probs: list[float], labels: list[str], top_k: int,
                  logits: list[float] | None = None) -> bytes:
    """Enclave side: the result JSON (scores and logits in the original class order)."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[: min(top_k, len(probs))]
    res: dict[str, Any] = {"v": 1, "model": model_id,
                           "top": [{"index": i, "label": labels[i], "score": probs[i]} for i in order]}
    if logits is not None:
        res["logits"] = list(logits)
    return json.dumps(res, separators=(",", ":"), allow_nan=False).encode()


def decode_result(data: bytes) -> dict[str, Any]:
    """Client side: parse an (authenticated) result JSON."""
    try:
        res = json.loads(data)
        if res.get("v") != 1 or not isinstance(res.get("top"), list):
            raise ValueError
        for t in res["top"]:
            if not (isinstance(t["label"], str) and isinstance(t["index"], int) and math.isfinite(t["score"])):
                raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TamperedMessage("result is malformed") from None
    return res


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
        index = json.loads(bytes(body[_U32.size:_U32.size + n]))
        if not isinstance(index, list):
            raise ValueError
        entries = [(str(e[0]), int(e[1])) for e in index if isinstance(e, list) and len(e) == 2]
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
