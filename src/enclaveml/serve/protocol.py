"""Infenclave wire formats between client, host and enclave: pure functions, no I/O.

Trust side: all. The client builds requests and reads results; the enclave reads requests and
builds results; the host only splits upload bodies into parts. Crypto details (HPKE suite, the
OHTTP-style response, freshness header) live in `enclaveml.crypto` and docs/crypto.md.

Inference request (HTTP body of POST /v1/models/{model}/infer):

    body      = HPKE request to the attested enclave key (enc(32) || ct), info "enclaveml/v1 request",
                aad = "enclaveml/v1 infer\\0" || model id (UTF-8)   -> the host cannot redirect it
    plaintext = freshness header (version 1 || request id 16 || timestamp f64) || payload
    payload   = u16 n || options JSON (n bytes) || image bytes || zero padding
    options   = {"top_k": 5, "logits": false, "image_bytes": len(image)}

The client pads the payload with zero bytes to a size bucket (`padded_payload_size`: powers of two
from 1 KiB to 1 MiB, then whole MiB, never past `MAX_PADDED_PAYLOAD` unless already larger), so the
request's length tells the host only the bucket of the image size. "image_bytes" says where the
image ends; without it (older clients) the image runs to the end of the payload.

Inference response (HTTP 200 body): the enclave's sealed response to that request (RFC 9458
pattern, same aad), whose plaintext is the result JSON followed by zero bytes:

    {"v": 1, "model": id, "top": [{"index": i, "label": name, "score": p}, ...],
     "logits": [...] (original class order, only if asked)} || 0x00 ...

The padding brings the plaintext to `result_size(...)`: a multiple of 256 bytes that is at least the
longest result *any* class could produce for this deployment, top_k and logits flag, so the length
of a sealed response does not depend on the prediction (security review F-6). The client strips
trailing zero bytes (JSON never ends with one) before parsing.

Model upload (POST /v1/models/{model}) and other multi-part bodies: `pack_parts`:

    u32 n || JSON index [[name, size], ...] (n bytes) || the parts' bytes in index order
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from ..crypto import loads_untrusted
from ..errors import DataError, TamperedMessage, UserInputError

INFER_AAD_LABEL = b"enclaveml/v1 infer\x00"
MAX_TOP_K = 100
MAX_OPTIONS_BYTES = 4096
MAX_MODEL_ID = 64
#: Result plaintexts are padded to a multiple of this many bytes (see `result_size`).
RESULT_BLOCK = 256
#: Longest JSON text of one float (`repr` of a double, e.g. "-2.2250738585072014e-308": 24) + slack.
_FLOAT_CHARS = 25
#: Request payloads are padded to powers of two from this size up to `PAD_STEP`, then to multiples
#: of `PAD_STEP`, but never beyond `MAX_PADDED_PAYLOAD` (the image limit) unless already larger.
MIN_PADDED_PAYLOAD = 1024
PAD_STEP = 1024 * 1024
MAX_PADDED_PAYLOAD = 8 * 1024 * 1024
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


def check_servable_arch(arch: dict, allowed_factories: "tuple[str, ...] | frozenset[str]" = ()) -> None:
    """Only zoo architectures are built by the server (host and enclave), plus the factories the
    operator allowed by exact name (`serve --allow-factory`, part of the enclave's measured
    configuration: see `enclave_config`).

    Why: a manifest's `{"factory": "module:function", "kwargs": ...}` makes `build_arch` import
    and call any function the uploader names (e.g. `os:system`), in the host and, worse, in the
    enclave, which holds other owners' keys. Signing proves who uploaded, not that it is safe.
    """
    from ..models import zoo

    if not isinstance(arch, dict):
        raise UserInputError("arch must be an object")
    if set(arch) == {"zoo"} and str(arch.get("zoo")) in zoo.ZOO:
        return
    if ("factory" in arch and set(arch) <= {"factory", "kwargs"} and isinstance(arch["factory"], str)
            and arch["factory"] in frozenset(allowed_factories)):
        return
    raise UserInputError("only zoo architectures ({'zoo': name}) can be served"
                         + (" and the allowed factories" if allowed_factories else "")
                         + f"; known: {', '.join(sorted(zoo.ZOO))}")


def check_factory_names(names: "list[str] | tuple[str, ...]") -> tuple[str, ...]:
    """Validate `--allow-factory` values ('package.module:function'); sorted, without repeats."""
    from ..models.bundle import check_arch

    for name in names:
        check_arch({"factory": name})  # UserInputError unless it looks like package.module:function
    return tuple(sorted(set(names)))


def enclave_config(allowed_factories: "tuple[str, ...] | list[str]" = ()) -> dict[str, Any]:
    """The serving enclave's measured configuration (sim backend: hashed into the measurement that
    clients pin; `enclaveml attest policy --tee sim --config JSON` with the same JSON). Empty by
    default, so a server without `--allow-factory` keeps the plain code measurement."""
    names = check_factory_names(list(allowed_factories))
    return {"allowed_factories": list(names)} if names else {}


def infer_aad(model_id: str) -> bytes:
    return INFER_AAD_LABEL + check_model_id(model_id).encode()


def padded_payload_size(n: int) -> int:
    """The size bucket a request payload of `n` bytes is padded to (>= n)."""
    if n >= MAX_PADDED_PAYLOAD:
        return n
    if n <= PAD_STEP:
        size = MIN_PADDED_PAYLOAD
        while size < n:
            size *= 2
        return size
    return min(-(-n // PAD_STEP) * PAD_STEP, MAX_PADDED_PAYLOAD)


def encode_payload(image: bytes, top_k: int = 5, logits: bool = False, pad: bool = True) -> bytes:
    """Client side: the inner payload (options + image bytes + padding), to frame with
    `crypto.frame_fresh`. `pad=False` sends the image unpadded (its exact size shows)."""
    if type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K:
        raise UserInputError(f"top_k must be 1..{MAX_TOP_K}")
    image = bytes(image)
    opts_d: dict[str, Any] = {"top_k": top_k, "logits": bool(logits)}
    if pad:
        opts_d["image_bytes"] = len(image)
    opts = json.dumps(opts_d, separators=(",", ":")).encode()
    payload = _U16.pack(len(opts)) + opts + image
    if pad:
        payload += bytes(padded_payload_size(len(payload)) - len(payload))
    return payload


def decode_payload(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Enclave side: (options, image bytes) from an authenticated payload."""
    if len(payload) < _U16.size:
        raise TamperedMessage("request payload is truncated")
    (n,) = _U16.unpack_from(payload)
    if n > MAX_OPTIONS_BYTES or len(payload) < _U16.size + n:
        raise TamperedMessage("request options are truncated or too large")
    try:
        opts = loads_untrusted(payload[_U16.size:_U16.size + n])
        if not isinstance(opts, dict):
            raise ValueError
    except ValueError:
        raise DataError("request options are not a JSON object") from None
    top_k = opts.get("top_k", 5)
    if type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K:
        raise DataError(f"top_k must be 1..{MAX_TOP_K}")
    logits = opts.get("logits", False)
    if type(logits) is not bool:
        raise DataError("logits must be true or false")
    rest = payload[_U16.size + n:]
    size = opts.get("image_bytes")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(rest):
            raise DataError("request image size is not valid")
        if rest[size:] != bytes(len(rest) - size):
            raise DataError("request padding is not zero bytes")
        rest = rest[:size]
    return {"top_k": top_k, "logits": logits}, rest


def _json(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), allow_nan=False)


def result_size(model_id: str, labels: list[str], top_k: int, logits: bool) -> int:
    """The padded plaintext size of every result for this deployment, `top_k` and `logits` flag.

    An upper bound on the JSON of any outcome (the longest labels and numbers in every top-k
    slot, every logit at its longest), rounded up to a multiple of `RESULT_BLOCK`. It depends only
    on the deployment and the request's options, never on the scores.
    """
    n = len(labels)
    k = min(top_k, n)
    longest_labels = sorted((len(_json(str(lab))) for lab in labels), reverse=True)[:k]
    # one top entry without its label: the fixed keys, the longest index and the longest float
    entry = len(_json({"index": "", "label": "", "score": ""})) - 6 + len(str(max(n - 1, 0))) + _FLOAT_CHARS
    bound = len(_json({"v": 1, "model": model_id, "top": []})) + sum(longest_labels) + k * (entry + 1)
    if logits:
        bound += len(',"logits":[]') + n * (_FLOAT_CHARS + 1)
    return max(1, -(-bound // RESULT_BLOCK)) * RESULT_BLOCK


def encode_result(model_id: str, probs: list[float], labels: list[str], top_k: int,
                  logits: list[float] | None = None) -> bytes:
    """Enclave side: the result JSON (scores and logits in the original class order), padded with
    zero bytes to `result_size` so that its length does not reveal the prediction."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[: min(top_k, len(probs))]
    res: dict[str, Any] = {"v": 1, "model": model_id,
                           "top": [{"index": i, "label": labels[i], "score": float(probs[i])} for i in order]}
    if logits is not None:
        res["logits"] = [float(v) for v in logits]
    raw = _json(res).encode()
    size = result_size(model_id, list(labels), top_k, logits is not None)
    if len(raw) > size:  # cannot happen (result_size is an upper bound); never send a telling length
        raise RuntimeError("result is longer than its padded size")
    return raw + bytes(size - len(raw))


def decode_result(data: bytes) -> dict[str, Any]:
    """Client side: parse an (authenticated) result JSON, after removing its zero padding."""
    try:
        res = loads_untrusted(bytes(data).rstrip(b"\x00"))
        if not isinstance(res, dict) or type(res.get("v")) is not int or res["v"] != 1:
            raise ValueError
        if not isinstance(res.get("top"), list):
            raise ValueError
        for t in res["top"]:
            if not (isinstance(t["label"], str) and type(t["index"]) is int
                    and type(t["score"]) in (int, float) and math.isfinite(t["score"])):
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
