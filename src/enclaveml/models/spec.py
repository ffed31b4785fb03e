"""One model specification for the whole project: which architecture to build, and with what options.

Trust side: any (owner, host, enclave). Pure parsing; building calls `bundle.build_arch`, which
imports a user's factory only when the caller's allow-list names it.

The same value has two spellings, one for people and one for manifests and plans:

    text (CLI flags, plan files)          arch (bundle manifests)
    darknet                               {"zoo": "darknet"}
    darknet:width=16                      {"zoo": "darknet", "kwargs": {"width": 16}}
    mypkg.nets:build                      {"factory": "mypkg.nets:build"}
    mypkg.nets:build:width=16             {"factory": "mypkg.nets:build", "kwargs": {"width": 16}}

In the text, ':' separates fields: first the target (a zoo name, or `module:function` of a
user's factory), then `key=INT` options. A field after the target is an option exactly when it
holds '=', so `darknet:width=16` is zoo darknet with width 16 and `nets:build` is function
`build` of module `nets`. Used by `train serve/plan/run --model` (CalTrain), by bundle manifests
(`partition`, and a CalTrain release), and by `serve`/`deploy` through those manifests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import UserInputError

_ZOO = re.compile(r"[a-z][a-z0-9_-]{0,40}")
_FUNC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_OPTION = re.compile(r"([a-z_][a-z0-9_]{0,30})=([0-9]{1,6})")
_FORMS = "NAME[:key=INT...] (a zoo model) or package.module:function[:key=INT...] (your factory)"


@dataclass(frozen=True)
class ModelSpec:
    """`kind` "zoo" or "factory"; `target` the zoo name or "package.module:function"; `options` its kwargs."""

    kind: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- spellings

    @classmethod
    def parse(cls, text: "str | ModelSpec") -> "ModelSpec":
        """From the text form; `UserInputError` (or `UnknownModel` for a zoo name) naming the problem."""
        if isinstance(text, ModelSpec):
            return text
        if not isinstance(text, str) or not text or len(text) > 300:
            raise UserInputError(f"model spec {str(text)[:80]!r}: expected {_FORMS}")
        fields = text.split(":")
        if len(fields) >= 2 and "=" not in fields[1]:
            kind, target, rest = "factory", ":".join(fields[:2]), fields[2:]
            from . import zoo

            if fields[0] in zoo.ZOO:  # `darknet:width` is a zoo option missing its value, not module darknet
                raise UserInputError(f"model spec {text[:80]!r}: zoo model {fields[0]} takes options as key=INT")
            if not _FUNC.fullmatch(target):
                raise UserInputError(f"model spec {text[:80]!r}: {target!r} is not package.module:function")
        else:
            kind, target, rest = "zoo", fields[0], fields[1:]
            if not _ZOO.fullmatch(target):
                raise UserInputError(f"model spec {text[:80]!r}: expected {_FORMS}")
        options: dict[str, Any] = {}
        for part in rest:
            m = _OPTION.fullmatch(part)
            if not m:
                raise UserInputError(f"model spec {text[:80]!r}: option {part[:40]!r} is not key=INT")
            if m.group(1) in options:
                raise UserInputError(f"model spec {text[:80]!r}: option {m.group(1)} given twice")
            options[m.group(1)] = int(m.group(2))
        spec = cls(kind, target, options)
        spec.check()
        return spec

    @classmethod
    def from_arch(cls, arch: Any) -> "ModelSpec":
        """From a manifest's `arch` (checked by `bundle.check_arch` first; nothing is imported)."""
        from .bundle import check_arch

        a = check_arch(arch)
        if "zoo" in a:
            spec = cls("zoo", a["zoo"], dict(a.get("kwargs", {})))
        else:
            spec = cls("factory", a["factory"], dict(a.get("kwargs", {})))
        spec.check()
        return spec

    @property
    def arch(self) -> dict:
        """The manifest form (no "kwargs" key when there are no options: one encoding only)."""
        return {("zoo" if self.kind == "zoo" else "factory"): self.target,
                **({"kwargs": dict(sorted(self.options.items()))} if self.options else {})}

    @property
    def text(self) -> str:
        """The canonical text form (options sorted)."""
        return self.target + "".join(f":{k}={v}" for k, v in sorted(self.options.items()))

    def __str__(self) -> str:
        return self.text

    # ---------------------------------------------------------------- what it is

    @property
    def is_factory(self) -> bool:
        return self.kind == "factory"

    @property
    def name(self) -> str:
        """The zoo name or the factory's "package.module:function"."""
        return self.target

    def check(self) -> None:
        """A zoo name must be known and its options integers; a factory's, plain JSON scalars."""
        from .bundle import check_arch

        if self.kind not in ("zoo", "factory"):
            raise UserInputError(f"model spec kind {self.kind!r} is not zoo or factory")
        if self.kind == "zoo":
            from . import zoo

            zoo.entry(self.target)  # UnknownModel
            for k, v in self.options.items():
                if type(v) is not int or not 0 <= v <= 999_999 or not _OPTION.fullmatch(f"{k}={v}"):
                    raise UserInputError(f"zoo model {self.target}: option {k}={v!r} is not key=INT (0..999999)")
        else:
            check_arch(self.arch)

    def allowed_by(self, allowed_factories: Iterable[str]) -> bool:
        """Zoo models always; a factory only when the allow-list names it exactly."""
        return self.kind == "zoo" or self.target in frozenset(allowed_factories)

    def target_allowed(self) -> tuple[str, ...]:
        """The allow-list that names just this spec's factory (for a caller that chose it itself)."""
        return (self.target,) if self.kind == "factory" else ()

    # ---------------------------------------------------------------- zoo facts

    def _zoo(self):
        from . import zoo

        if self.kind != "zoo":
            raise UserInputError(f"{self.target} is a user factory: its input size, preprocessing and classes come "
                                 "from the training plan or model card, not from the zoo")
        return zoo.entry(self.target)

    def preprocessing(self):
        """A zoo model's preprocessing (zoo only)."""
        return self._zoo().preprocessing

    @property
    def classes(self) -> list[str]:
        """A zoo model's class names (zoo only; a `num_classes` option gives `0..n-1` names)."""
        names = list(self._zoo().classes)
        n = self.options.get("num_classes", len(names))
        return names if n == len(names) else [str(i) for i in range(n)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---------------------------------------------------------------- building

    def build(self, input_shape=None, num_classes: int | None = None,
              allowed_factories: Iterable[str] = frozenset()):
        """The architecture as a `LayeredModel` with random weights (`bundle.build_arch`).

        A factory needs `input_shape` and `num_classes` unless it returns a LayeredModel, and is
        imported only when `allowed_factories` (configuration the caller trusts) names it.
        """
        from .bundle import build_arch

        return build_arch(self.arch, input_shape, num_classes, allowed_factories)
