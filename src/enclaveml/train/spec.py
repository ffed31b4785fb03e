"""Which model a CalTrain run trains: a zoo name with optional integer options ("darknet:width=16").

Trust side: owner (chooses it), host and enclave (both build the same architecture; the host
only its BackNet half). Pure parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..data.preprocess import Preprocessing
from ..errors import UserInputError
from ..models import zoo
from ..models.layers import LayeredModel

_SPEC = re.compile(r"^([a-z][a-z0-9_-]{0,40})((?::[a-z_]{1,20}=[0-9]{1,6})*)$")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        m = _SPEC.match(text or "")
        if not m:
            raise UserInputError(f"model spec {text!r}: expected NAME or NAME:option=INT[:option=INT...]")
        zoo.entry(m.group(1))  # UnknownModel
        opts = {}
        for part in filter(None, m.group(2).split(":")):
            k, v = part.split("=")
            opts[k] = int(v)
        return cls(m.group(1), opts)

    @property
    def text(self) -> str:
        return self.name + "".join(f":{k}={v}" for k, v in sorted(self.options.items()))

    def build(self) -> LayeredModel:
        try:
            return zoo.entry(self.name).build(**self.options)
        except TypeError as e:
            raise UserInputError(f"model {self.name!r} does not take those options ({e})") from None

    def preprocessing(self) -> Preprocessing:
        return zoo.entry(self.name).preprocessing

    @property
    def classes(self) -> list[str]:
        return list(zoo.entry(self.name).classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)
