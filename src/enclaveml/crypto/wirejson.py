"""Parse JSON from bytes an attacker may have chosen: bounded depth and size, finite numbers only.

Trust side: all (used by the enclave, the host and clients on any JSON that crossed a trust
boundary: owner commands, bundle manifests and signature files, class maps). Pure function, no I/O.

`json.loads` alone is not safe on hostile input: deeply nested brackets raise `RecursionError`
(not `ValueError`), `1e999` parses to `inf` (and `int(inf)` raises `OverflowError`), `NaN` and
`Infinity` are accepted, and a repeated key silently keeps the last value (two parsers may then
disagree on what a signature covered). `loads_untrusted` refuses all of these with `ValueError`,
so a caller's `except ValueError` turns every malformed input into its one documented error.

The nesting check runs before `json.loads`: string literals are blanked, then the innermost arrays
and objects (those with no bracket inside) are replaced by a scalar, `max_depth` times at most (one
C-speed regex pass each); if any bracket is left, the input is nested deeper than `max_depth` or its
brackets do not balance, and it is refused. A text with at most `max_depth` opening brackets in
all (strings included) cannot nest deeper, so `loads_untrusted` skips the regex passes for it (one
`count` each for '[' and '{'); `json.loads` still refuses unbalanced brackets there (`ValueError`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Deep enough for every format enclaveml writes (a manifest nests 3 levels, a CalTrain start 4).
DEFAULT_MAX_DEPTH = 32

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_INNERMOST = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")  # an array or object with none inside
_BRACKET = re.compile(r"[\[\]{}]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError("JSON number is out of range")
    return v


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("JSON object has a repeated key")
    return d


#: What `json.loads(text, **these options)` would build on every call (it is stateless between
#: calls, and json's own `loads` shares one decoder across threads the same way).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float,
                            object_pairs_hook=_no_duplicate_keys)


def check_depth(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise `ValueError` unless the brackets of `text` (outside strings) nest at most `max_depth` deep
    and are balanced."""
    rest = _STRING.sub('""', text)
    for _ in range(max_depth):
        shorter = _INNERMOST.sub("0", rest)
        if len(shorter) == len(rest):
            break  # nothing left to remove (done, or unbalanced: not JSON)
        rest = shorter
    if _BRACKET.search(rest):
        raise ValueError(f"JSON is nested deeper than {max_depth} levels or its brackets do not balance")


def loads_untrusted(data: "bytes | bytearray | memoryview | str", max_depth: int = DEFAULT_MAX_DEPTH,
                    max_bytes: int | None = None) -> Any:
    """`json.loads` for hostile input: UTF-8 only, at most `max_depth` nested levels (and `max_bytes`
    bytes when given), finite numbers, no NaN/Infinity, no repeated keys. Any failure: `ValueError`."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise ValueError(f"JSON is larger than {max_bytes} bytes")
    text = raw.decode("utf-8")  # UnicodeDecodeError (a ValueError) for anything but UTF-8
    if text.count("[") + text.count("{") > max_depth:  # else it cannot nest deeper (a result item)
        check_depth(text, max_depth)
    if text.startswith("\ufeff"):  # as json.loads refuses it
        raise ValueError("JSON starts with a UTF-8 byte order mark")
    try:
        return _DECODER.decode(text)
    except RecursionError:  # not reachable after check_depth; kept so that it can never escape
        raise ValueError("JSON is nested too deeply") from None
