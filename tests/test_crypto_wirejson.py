"""loads_untrusted: JSON from hostile bytes fails with ValueError only (depth, size, numbers, keys)."""

from __future__ import annotations

import json

import pytest

from enclaveml.crypto import loads_untrusted
from enclaveml.crypto.wirejson import check_depth


@pytest.mark.parametrize("text", [
    '{"a": [1, 2.5, "x", true, null, {"b": []}]}',
    '"]]]]{{{{"', '["\\"[", "\\\\", "{"]', "5", '"x"', "[]", "{}",
    json.dumps({"v": 1, "args": {"config": {"lr": [0.1, 0.01]}}}),
])
def test_valid_json_is_parsed_as_json_loads_does(text):
    assert loads_untrusted(text) == json.loads(text)
    assert loads_untrusted(text.encode()) == json.loads(text)


def test_depth_limit_is_exact():
    assert loads_untrusted("[" * 4 + "1" + "]" * 4, max_depth=4) == [[[[1]]]]
    with pytest.raises(ValueError, match="deeper than 4"):
        loads_untrusted("[" * 5 + "1" + "]" * 5, max_depth=4)
    check_depth('{"a": "[[[[[[[[[["}', max_depth=1)  # brackets inside strings do not count
    # At most max_depth brackets in all skips the regex passes; json.loads still refuses unbalanced ones.
    assert loads_untrusted('{"a": [1]}', max_depth=2) == {"a": [1]}
    for few in ("[[", "[1}]", '{"a": [}', "]"):
        with pytest.raises(ValueError):
            loads_untrusted(few, max_depth=8)


@pytest.mark.parametrize("data", [
    b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,  # RecursionError in json
    b"[1]]", b"[}", b"]", b'["unterminated', b'{"a": [1, "x]}',
    b"NaN", b"[Infinity]", b"[-Infinity]", b'{"k": 1e999}', b"[-1e400]",  # non-finite numbers
    b'{"a": 1, "a": 2}',  # a repeated key: two parsers could read two different values
    b"\xff\xfe[\x00]\x00", b'"\xed\xa0\x80"', b"\x80",  # not UTF-8
    b"", b"   ", b"[1,]", b"{'a': 1}", b"1" * 5000,  # not JSON; an int too long to convert
])
def test_hostile_input_raises_value_error_only(data):
    with pytest.raises(ValueError):
        loads_untrusted(data)


def test_size_limit():
    assert loads_untrusted(b"[1]", max_bytes=3) == [1]
    with pytest.raises(ValueError, match="larger than"):
        loads_untrusted(b"[1] ", max_bytes=3)
    with pytest.raises(ValueError, match="larger than"):
        loads_untrusted("[1] ", max_bytes=3)
