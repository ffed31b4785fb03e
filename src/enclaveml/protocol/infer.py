"""Infenclave inference messages between client, host and enclave: pure functions, no I/O.

Trust side: all. The client builds requests and reads results; the enclave reads requests and
builds results; the host relays both, sealed. Crypto details (HPKE suite, the
OHTTP-style response, freshness header) live in `enclaveml.crypto` and docs/crypto.md.

Inference request (HTTP body of POST /v1/models/{owner}/{name}/infer), one or several images:

    body      = u16 n || target (n bytes) || HPKE request to the attested enclave key (enc(32) || ct),
                info "enclaveml/v1 request", aad = "enclaveml/v2 infer\\0" || target
                (target: the deployment's owner and name plus the client's pin of it, see
                `enclaveml.protocol.identity`: the host can neither redirect nor loosen it)
    plaintext = freshness header (version 1 || request id 16 || timestamp f64) || payload
    payload   = u16 n || options JSON (n bytes) || image bytes... || zero padding
    options   = {"top_k": 5, "logits": false, "image_bytes": [len(image), ...]}

Several images travel in one request (up to `MAX_IMAGES`): one HPKE encapsulation, one AEAD pass,
one HTTP exchange and one replay-guard entry for the lot, which is what makes batch-friendly
loads cheap. "image_bytes" lists where each image ends; an int means one image, and without it
(older clients) the one image runs to the end of the payload. The client pads the payload with
zero bytes to a size bucket (`padded_payload_size`: powers of two from 1 KiB to 1 MiB, then whole
MiB, never past `MAX_PADDED_PAYLOAD` unless already larger), so the request's length tells the host
only the bucket of the images' total size.

Inference response (HTTP 200 body): the enclave's sealed response to that request (RFC 9458
pattern, same aad), whose plaintext is one fixed-size item per image, in request order:

    item = {"v": 1, IDENTITY, "top": [{"index": i, "label": name, "score": p}, ...],
            "logits": [...] (original class order, only if asked)} || 0x00 ...
         | {"v": 1, IDENTITY, "error": "DataError", "message": UNDECODABLE_IMAGE} || 0x00 ...
    IDENTITY = "model": name, "owner": hex, "bundle_id": hex, "k": k, "head": h   (the deployment
               that answered, repeated in every item; the client checks it against its pin)

Every item is padded to `result_size(...)`: a multiple of 256 bytes that is at least the longest
item *any* outcome could produce for this deployment, top_k and logits flag (an error included),
so the length of a sealed response does not depend on the predictions (security review F-6); the
client splits the plaintext into equal parts and strips each part's trailing zero bytes (JSON
never ends with one). A one-image request whose image cannot be decoded fails as a whole (a
DataError the host relays); in a several-image request that image's item says so, sealed, and the
host learns only how many of the request's images failed (it counts them).

Typed forms: `InferRequest` (the payload: images and options) and `InferResult` (one item of
the answer); the functions below are their codec. Model uploads are in `protocol.deploy`.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from ..crypto import loads_untrusted
from ..errors import DataError, TamperedMessage, UserInputError
from .identity import ModelIdentity, Target, check_model_id  # noqa: F401  (check_model_id: part of this API)

MAX_TOP_K = 100
MAX_OPTIONS_BYTES = 4096
MAX_MODEL_ID = 64
#: Images in one inference request (one HPKE message).
MAX_IMAGES = 256
#: The one message a client (and so the host, which relays it in the clear for a one-image
#: request) gets for an image the enclave cannot decode: the decoder's own messages may quote the
#: plaintext image's size or mode.
UNDECODABLE_IMAGE = "input is not a decodable JPEG/PNG image within the limits"
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


@dataclass(frozen=True)
class InferRequest:
    """The payload of one inference request: 1..`MAX_IMAGES` images and the options for all of them.

    `encode` is what the client frames (`crypto.frame_fresh`) and seals (`seal_infer`); `decode`
    is what the enclave reads once the HPKE message authenticated. Byte-for-byte the format above.
    """

    images: tuple[bytes, ...]
    top_k: int = 5
    logits: bool = False

    def encode(self, pad: bool = True) -> bytes:
        return encode_payload(list(self.images), self.top_k, self.logits, pad=pad)

    @classmethod
    def decode(cls, payload: bytes) -> "InferRequest":
        opts, images = decode_payload(payload)
        return cls(tuple(images), opts["top_k"], opts["logits"])


@dataclass(frozen=True)
class Prediction:
    """One of an answer's top-k classes (index in the model's original class order)."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class InferResult:
    """One image's answer, as the client reads it: which deployment answered, its top-k, and the
    logits if asked. (`to_dict` is the JSON item, the form `EnclaveClient.infer` returns.)"""

    identity: ModelIdentity
    top: tuple[Prediction, ...]
    logits: "tuple[float, ...] | None" = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**_ident(self.identity),
                               "top": [{"index": p.index, "label": p.label, "score": p.score} for p in self.top]}
        if self.logits is not None:
            out["logits"] = list(self.logits)
        return out

    @classmethod
    def from_dict(cls, res: dict[str, Any]) -> "InferResult":
        """From a decoded item (`decode_result` / `decode_results`)."""
        try:
            logits = res.get("logits")
            return cls(_item_identity(res),
                       tuple(Prediction(t["index"], t["label"], float(t["score"])) for t in res["top"]),
                       tuple(float(v) for v in logits) if logits is not None else None)
        except (KeyError, TypeError, ValueError):
            raise TamperedMessage("result is malformed") from None

    @classmethod
    def decode(cls, data: bytes, expected: "Target | None" = None) -> "InferResult":
        """Client side: one (authenticated, padded) item; `TamperedMessage` for an error item."""
        return cls.from_dict(decode_result(data, expected))


def seal_infer(enclave_public: bytes, target: Target, framed: bytes, suite: str = "x25519"):
    """Client side: the request body for `target` (its pin in the clear and as the AAD) around the
    HPKE message of `framed` (`crypto.frame_fresh(encode_payload(...))`) in `suite`
    (`crypto.suites`, default the native "x25519"; `enclave_public` is that suite's attested key)
    -> (body, context, aad);
    open the answer with `context.open_response(answer, aad)`."""
    from ..crypto import seal_with
    from .identity import frame_target, infer_aad

    aad = infer_aad(target.to_bytes())
    msg, ctx = seal_with(suite, enclave_public, framed, aad)
    return frame_target(target, msg), ctx, aad


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


def encode_payload(images: "bytes | list[bytes]", top_k: int = 5, logits: bool = False, pad: bool = True) -> bytes:
    """Client side: the inner payload (options + image bytes + padding), to frame with
    `crypto.frame_fresh`. One image (bytes) or several (a list). `pad=False` sends the images
    unpadded (their exact total size shows)."""
    if type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K:
        raise UserInputError(f"top_k must be 1..{MAX_TOP_K}")
    batch = [bytes(i) for i in images] if isinstance(images, list) else [bytes(images)]
    if not 1 <= len(batch) <= MAX_IMAGES:
        raise UserInputError(f"a request carries 1 to {MAX_IMAGES} images")
    opts_d: dict[str, Any] = {"top_k": top_k, "logits": bool(logits)}
    if pad or len(batch) > 1:
        opts_d["image_bytes"] = [len(i) for i in batch]
    opts = json.dumps(opts_d, separators=(",", ":")).encode()
    payload = _U16.pack(len(opts)) + opts + b"".join(batch)
    if pad:
        payload += bytes(padded_payload_size(len(payload)) - len(payload))
    return payload


def decode_payload(payload: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Enclave side: (options, [image bytes, ...]) from an authenticated payload."""
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
    rest = memoryview(payload)[_U16.size + n:]
    sizes = opts.get("image_bytes")
    if sizes is None:  # one image, unpadded, to the end
        return {"top_k": top_k, "logits": logits}, [bytes(rest)]
    if type(sizes) is int:
        sizes = [sizes]
    if (not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_IMAGES
            or not all(type(z) is int and z >= 0 for z in sizes) or sum(sizes) > len(rest)):
        raise DataError("request image sizes are not valid")
    end = sum(sizes)
    if any(rest[end:]):
        raise DataError("request padding is not zero bytes")
    images, pos = [], 0
    for z in sizes:
        images.append(bytes(rest[pos:pos + z]))
        pos += z
    return {"top_k": top_k, "logits": logits}, images


def _json(v: Any) -> str:
    # UTF-8, not \\u escapes: a label's JSON is then at most 2 bytes per byte of it ('"' and '\\')
    return json.dumps(v, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _ident(identity: ModelIdentity) -> dict[str, Any]:
    return {"v": 1, "model": identity.name, "owner": identity.owner, "bundle_id": identity.bundle_id,
            "k": identity.k, "head": identity.head}


def result_size(identity: ModelIdentity, labels: "list[str] | tuple[str, ...]", top_k: int, logits: bool) -> int:
    """The padded plaintext size of every result for this deployment, `top_k` and `logits` flag.

    An upper bound on the JSON of any outcome (labels of the longest allowed length, the longest numbers in every top-k
    slot, every logit at its longest), rounded up to a multiple of `RESULT_BLOCK`. It depends only
    on the deployment and the request's options, never on the scores. (Cached: the enclave asks
    for it once per image, and it costs more than the result's JSON.)
    """
    return _result_size(identity, tuple(labels), top_k, bool(logits))


@functools.lru_cache(maxsize=256)
def _result_size(identity: ModelIdentity, labels: tuple[str, ...], top_k: int, logits: bool) -> int:
    from ..models.classmap import MAX_LABEL_BYTES  # enclave side only (the client never sizes results)

    n = len(labels)
    k = min(top_k, n)
    # Every label counts as the longest any label may be (its JSON: 2 bytes per UTF-8 byte at most,
    # and the quotes), never as long as it is: the host sends its own requests with every top_k and
    # reads the sizes, which must not tell it how long the secret label names are (F-26).
    longest_label = 2 * MAX_LABEL_BYTES + 2
    if any(len(_json(str(lab)).encode()) > longest_label for lab in labels):
        raise UserInputError(f"a label is longer than {MAX_LABEL_BYTES} UTF-8 bytes")
    # one top entry without its label: the fixed keys, the longest index and the longest float
    entry = len(_json({"index": "", "label": "", "score": ""})) - 6 + len(str(max(n - 1, 0))) + _FLOAT_CHARS
    bound = len(_json({**_ident(identity), "top": []})) + k * (longest_label + entry + 1)
    if logits:
        bound += len(',"logits":[]') + n * (_FLOAT_CHARS + 1)
    bound = max(bound, len(_error_item(identity)))
    return max(1, -(-bound // RESULT_BLOCK)) * RESULT_BLOCK


def _error_item(identity: ModelIdentity) -> bytes:
    return _json({**_ident(identity), "error": "DataError", "message": UNDECODABLE_IMAGE}).encode()


def encode_error_item(identity: ModelIdentity, labels: list[str], top_k: int, logits: bool) -> bytes:
    """Enclave side: the item for an image it could not decode, as long as any result item."""
    raw = _error_item(identity)
    return raw + bytes(result_size(identity, labels, top_k, logits) - len(raw))


def encode_result(identity: ModelIdentity, probs: list[float], labels: list[str], top_k: int,
                  logits: list[float] | None = None) -> bytes:
    """Enclave side: the result JSON (scores and logits in the original class order), padded with
    zero bytes to `result_size` so that its length does not reveal the prediction.

    The same bytes as `_json` of {identity fields, "top": [{"index", "label", "score"}...],
    "logits"} (tests/test_protocol_messages.py checks them against that encoder): the parts that
    depend only on the deployment and the options (the identity fields, each class's
    '{"index":I,"label":L,"score":' text: `_result_parts`; the padded size: `_result_size`) are
    built once, so an image costs its top-k selection and its numbers' `repr` (the float text
    `json` writes) instead of a dict tree through the JSON encoder: about half the CPU per image
    (docs/benchmarks.md, "Tail latency and per-request CPU")."""
    n = len(probs)
    order = sorted(range(n), key=lambda i: (-probs[i], i))[: min(top_k, n)]
    labels = tuple(labels)
    prefix, entries = _result_parts(identity, labels)
    parts = [prefix, ",".join([entries[i] + _float_text(probs[i]) + "}" for i in order]), "]"]
    if logits is not None:
        parts += [',"logits":[', ",".join([_float_text(v) for v in logits]), "]"]
    parts.append("}")
    raw = "".join(parts).encode()
    size = _result_size(identity, labels, top_k, logits is not None)  # after the numbers, as before
    if len(raw) > size:  # cannot happen (result_size is an upper bound); never send a telling length
        raise RuntimeError("result is longer than its padded size")
    return raw + bytes(size - len(raw))


def _float_text(v) -> str:
    """A number as `_json` writes it (float's repr); ValueError for NaN and infinities, as
    `json.dumps(..., allow_nan=False)` raises."""
    v = float(v)
    if not math.isfinite(v):
        raise ValueError("Out of range float values are not JSON compliant: " + repr(v))
    return float.__repr__(v)


@functools.lru_cache(maxsize=32)
def _result_parts(identity: ModelIdentity, labels: tuple) -> tuple[str, tuple]:
    """(the JSON up to the top list's "[", per class index the text of its top entry up to the
    score) for one deployment: one string per class, whatever the requests' options."""
    head = _json({**_ident(identity), "top": []})
    if not head.endswith('"top":[]}'):  # the identity fields come first, "top" last: always
        raise RuntimeError("unexpected result layout")
    entries = tuple(_json({"index": i, "label": lab, "score": 0})[:-2] for i, lab in enumerate(labels))
    return head[:-2], entries


def decode_result(data: bytes, expected: "Target | None" = None) -> dict[str, Any]:
    """Client side: parse an (authenticated) result JSON, after removing its zero padding."""
    res = _decode_item(data, expected)
    if "error" in res:
        raise TamperedMessage("result is malformed")
    return res


def _item_identity(res: dict) -> ModelIdentity:
    return ModelIdentity.from_dict({"owner": res.get("owner"), "name": res.get("model"),
                                    "bundle_id": res.get("bundle_id"), "k": res.get("k"), "head": res.get("head")})


def _identity_key(res: dict) -> "tuple | None":
    """The item's identity fields, the numbers with their types (`True` == 1 == 1.0; only JSON
    strings equal strings), or None if one is not hashable: items with equal keys have the same
    identity, so it is parsed and checked against the pin once per response."""
    k, head = res.get("k"), res.get("head")
    key = (res.get("owner"), res.get("model"), res.get("bundle_id"), type(k), k, type(head), head)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _decode_item(data: bytes, expected: "Target | None", checked: "dict | None" = None) -> dict[str, Any]:
    """A result item, or an error item ({"error": "DataError", "message": str}); anything else
    is malformed. With `expected`, an item from a deployment its pin refuses is a `PolicyViolation`.
    `checked` (one response's) remembers identity fields already parsed and allowed."""
    try:
        res = loads_untrusted(bytes(data).rstrip(b"\x00"))
        if not isinstance(res, dict) or type(res.get("v")) is not int or res["v"] != 1:
            raise ValueError
        key = _identity_key(res) if checked is not None else None
        if key is not None and key in checked:
            ident = None  # the same fields as an item before: parsed and allowed already
        else:
            ident = _item_identity(res)
        if "error" in res:
            if res["error"] != "DataError" or not isinstance(res.get("message"), str):
                raise ValueError
        else:
            if not isinstance(res.get("top"), list):
                raise ValueError
            for t in res["top"]:
                if not (isinstance(t["label"], str) and type(t["index"]) is int
                        and type(t["score"]) in (int, float) and math.isfinite(t["score"])):
                    raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TamperedMessage("result is malformed") from None
    if ident is not None:
        if expected is not None:
            expected.allows(ident)  # PolicyViolation: the answer comes from a deployment the pin refuses
        if key is not None:
            checked[key] = True
    return res


def decode_results(data: bytes, n: int, expected: "Target | None" = None,
                   checked: "dict | None" = None) -> "list[dict[str, Any] | DataError]":
    """Client side: the `n` items of an (authenticated) response, in request order; an image the
    enclave could not decode comes back as a `DataError` in its place. Every item must name the
    deployment that the `expected` target (the client's pin) accepts (`PolicyViolation` otherwise).
    `checked`: identity fields already parsed and allowed *for this `expected`* (a caller's dict,
    kept per target across responses); by default, one response's."""
    data = bytes(data)
    if n < 1 or len(data) % n:
        raise TamperedMessage("response does not hold one equal-sized item per image")
    size = len(data) // n
    out: list[dict[str, Any] | DataError] = []
    checked = {} if checked is None else checked
    for i in range(n):
        item = _decode_item(data[i * size:(i + 1) * size], expected, checked)
        out.append(DataError(item["message"][:300]) if "error" in item else item)
    return out
