"""The enclave worker's operations: a registry of name -> handler, with the arguments each accepts.

Trust side: enclave. Pure dispatch (no I/O): `worker_main` feeds it the requests the channel
brings. Serving and CalTrain each register their operations here; neither keeps a loop of its own.

Every header field an operation reads is declared with its range (`Int`, `Str`, `Hex`, `Bool`,
`Strs`, `Ints`), and every tensor or blob it needs by name, so a request from the host is checked
before any enclave code sees it: an unknown operation, a missing or out-of-range argument, or a
missing tensor is a `DataError` reply, and the worker goes on serving. An operation marked
`inline` runs on the channel's reading thread (cheap ones, and the liveness ping, which so
answers while every pool thread is busy); the others run on the pool.

    ops = OpRegistry()

    @ops.op("front_batch", n=Int(0, 4096), model=Str(200))
    def front_batch(call, n, model):
        ...
        return {"items": items}, {"ir": ir}, None     # or just a header dict
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...errors import DataError

Reply = tuple[dict, "dict[str, torch.Tensor] | None", "dict[str, bytes] | None"]
_REQUIRED = object()
#: Fields of a request header that belong to the runtime, not to an operation's arguments.
RESERVED = ("id", "op")


class Arg:
    """One header field an operation reads: its check, and its default (none: required)."""

    def __init__(self, default: Any = _REQUIRED):
        self.default = default

    def check(self, value: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class Int(Arg):
    def __init__(self, lo: int, hi: int, default: Any = _REQUIRED):
        super().__init__(default)
        self.lo, self.hi = lo, hi

    def check(self, value: Any) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise ValueError(f"an integer {self.lo}..{self.hi}")
        return value


class Bool(Arg):
    def __init__(self, default: Any = False):
        super().__init__(default)

    def check(self, value: Any) -> bool:
        if type(value) is not bool:
            raise ValueError("true or false")
        return value


class Str(Arg):
    def __init__(self, max_len: int = 256, default: Any = _REQUIRED):
        super().__init__(default)
        self.max_len = max_len

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or len(value) > self.max_len:
            raise ValueError(f"a string of at most {self.max_len} characters")
        return value


class Hex(Arg):
    """Hex text on the wire; the handler gets the bytes."""

    def __init__(self, min_bytes: int = 0, max_bytes: int = 1024, default: Any = _REQUIRED):
        super().__init__(default)
        self.min_bytes, self.max_bytes = min_bytes, max_bytes

    def check(self, value: Any) -> bytes:
        if not isinstance(value, str) or len(value) > 2 * self.max_bytes:
            raise ValueError(f"hex of {self.min_bytes} to {self.max_bytes} bytes")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ValueError("hex") from None
        if not self.min_bytes <= len(raw) <= self.max_bytes:
            raise ValueError(f"hex of {self.min_bytes} to {self.max_bytes} bytes")
        return raw


class Strs(Arg):
    """A list of strings."""

    def __init__(self, max_items: int, max_len: int = 256, default: Any = _REQUIRED):
        super().__init__(default)
        self.max_items, self.max_len = max_items, max_len

    def check(self, value: Any) -> list[str]:
        if (not isinstance(value, list) or len(value) > self.max_items
                or not all(isinstance(v, str) and len(v) <= self.max_len for v in value)):
            raise ValueError(f"a list of at most {self.max_items} strings of at most {self.max_len} characters")
        return value


class Ints(Arg):
    """A list of integers in a range."""

    def __init__(self, max_items: int, lo: int, hi: int, default: Any = _REQUIRED):
        super().__init__(default)
        self.max_items, self.lo, self.hi = max_items, lo, hi

    def check(self, value: Any) -> list[int]:
        if (not isinstance(value, list) or len(value) > self.max_items
                or not all(type(v) is int and self.lo <= v <= self.hi for v in value)):
            raise ValueError(f"a list of at most {self.max_items} integers {self.lo}..{self.hi}")
        return value


@dataclass(frozen=True)
class Call:
    """What a handler gets besides its checked arguments: the request's tensors and blobs."""

    tensors: dict[str, torch.Tensor]
    blobs: dict[str, bytes]
    header: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Op:
    name: str
    handler: Callable[..., Any]
    args: dict[str, Arg]
    inline: bool = False
    tensors: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()


class OpRegistry:
    """name -> operation. `handle(header, tensors, blobs)` is a `rpc.serve_channel` handler."""

    def __init__(self) -> None:
        self._ops: dict[str, Op] = {}

    def add(self, name: str, handler: Callable[..., Any], *, inline: bool = False,
            tensors: tuple[str, ...] = (), blobs: tuple[str, ...] = (), **args: Arg) -> None:
        """Register `handler(call, **checked_args)` as operation `name` (once: names are unique)."""
        if name in self._ops:
            raise ValueError(f"enclave operation {name!r} is registered twice")
        bad = [a for a in args if a in RESERVED]
        if bad:
            raise ValueError(f"{name}: argument names {bad} are reserved for the runtime")
        self._ops[name] = Op(name, handler, dict(args), inline, tuple(tensors), tuple(blobs))

    def op(self, name: str, *, inline: bool = False, tensors: tuple[str, ...] = (), blobs: tuple[str, ...] = (),
           **args: Arg) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of `add`."""
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, fn, inline=inline, tensors=tensors, blobs=blobs, **args)
            return fn
        return deco

    def names(self) -> list[str]:
        return sorted(self._ops)

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def is_inline(self, header: dict) -> bool:
        """Whether this request runs on the reading thread (unknown ops do: they fail at once)."""
        op = self._ops.get(header.get("op"))  # type: ignore[arg-type]
        return op is None or op.inline

    def lookup(self, header: dict) -> tuple[Op, dict[str, Any]]:
        """The operation a request names and its checked arguments; DataError if either is bad."""
        name = header.get("op")
        op = self._ops.get(name) if isinstance(name, str) else None
        if op is None:
            raise DataError(f"unknown enclave operation {str(name)[:32]!r}")
        kwargs = {}
        for arg, spec in op.args.items():
            if arg not in header:
                if spec.default is _REQUIRED:
                    raise DataError(f"{op.name}: argument {arg!r} is missing")
                kwargs[arg] = spec.default
                continue
            try:
                kwargs[arg] = spec.check(header[arg])
            except ValueError as e:
                raise DataError(f"{op.name}: {arg} must be {e}") from None
        return op, kwargs

    def handle(self, header: dict, tensors: dict[str, torch.Tensor], blobs: dict[str, bytes]) -> Reply:
        op, kwargs = self.lookup(header)
        for t in op.tensors:
            if t not in tensors:
                raise DataError(f"{op.name}: tensor {t!r} is missing")
        for b in op.blobs:
            if b not in blobs:
                raise DataError(f"{op.name}: blob {b!r} is missing")
        out = op.handler(Call(tensors, blobs, header), **kwargs)
        if isinstance(out, dict):
            return out, None, None
        return out
