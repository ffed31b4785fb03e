"""The secret class mapping: a permutation that hides which BackNet output is which class.

One class for serving bundles and CalTrain (`models/split.py` permutes a model's classifier with it).
Trust side: owner (creates it, permutes the last layer) and enclave (maps scores back; a CalTrain
enclave also draws one per run and computes the loss in class order). The host
runs a BackNet whose classifier (the last `nn.Linear` or 1x1 conv, followed only by ops that treat
the classes alike: `models/head.py`) has its rows permuted by `pi`, so its scores come out in a
secret order: host position j holds the score of original class `permutation[j]`. Only the
enclave, which decrypts this mapping, turns them back into the original order and label names.

Serialised as JSON: {"v": 1, "permutation": [...], "labels": [...]} (always sealed at rest),
padded with spaces to `padded_size(n)`, a length that depends on the number of classes only (which
the manifest states anyway), so the sealed map's size does not reveal the label names' length.
Labels are at most `MAX_LABEL_BYTES` of UTF-8 without control characters.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..crypto.wirejson import loads_untrusted
from ..errors import TamperedMessage, UserInputError

#: Longest label name (UTF-8 bytes). JSON escapes only '"' and '\\' in them (control characters are
#: refused), so one label's JSON string is at most 2 * MAX_LABEL_BYTES + 2 bytes.
MAX_LABEL_BYTES = 256
_EMPTY = len(b'{"v":1,"permutation":[],"labels":[]}')


def padded_size(num_classes: int) -> int:
    """The serialised size of every class mapping with `num_classes` classes, whatever its labels."""
    n = int(num_classes)
    return _EMPTY + n * (len(str(max(n - 1, 0))) + 1) + n * (2 * MAX_LABEL_BYTES + 3)


@dataclass(frozen=True)
class ClassMapping:
    """`permutation[j]` = original class index of host output j; `labels` in original order."""

    permutation: tuple[int, ...]
    labels: tuple[str, ...]

    def __init__(self, permutation: "Sequence[int] | torch.Tensor", labels: Sequence[str] | None = None):
        perm = tuple(int(p) for p in (permutation.tolist() if isinstance(permutation, torch.Tensor) else permutation))
        labs = tuple(str(s) for s in labels) if labels is not None else tuple(str(i) for i in range(len(perm)))
        if sorted(perm) != list(range(len(perm))):
            raise UserInputError("class mapping: not a permutation of 0..n-1")
        if len(labs) != len(perm):
            raise UserInputError(f"class mapping: {len(labs)} labels for {len(perm)} classes")
        for lab in labs:
            if len(lab.encode()) > MAX_LABEL_BYTES or any(ord(c) < 0x20 or ord(c) == 0x7F for c in lab):
                raise UserInputError(f"class mapping: label {lab[:40]!r} is longer than {MAX_LABEL_BYTES} UTF-8 "
                                     "bytes or holds control characters")
        object.__setattr__(self, "permutation", perm)
        object.__setattr__(self, "labels", labs)

    @classmethod
    def random(cls, num_classes: int, labels: "Sequence[str] | torch.Generator | None" = None,
               generator: torch.Generator | None = None) -> "ClassMapping":
        """A uniformly random non-identity permutation (identity only if n = 1).

        From the OS CSPRNG (a bundle's mapping), or from `generator` when the caller derives it
        from a secret seed (a CalTrain run: the same run redraws the same mapping). A generator
        in `labels`' place is taken as `generator` (the older CalTrain call).
        """
        if isinstance(labels, torch.Generator):
            labels, generator = None, labels
        if num_classes < 1:
            raise UserInputError("class mapping needs at least one class")
        labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        rng = secrets.SystemRandom()
        perm = list(range(num_classes))
        while True:
            if generator is None:
                rng.shuffle(perm)
            else:
                perm = torch.randperm(num_classes, generator=generator).tolist()
            if num_classes == 1 or perm != sorted(perm):
                return cls(perm, labels)

    def with_labels(self, labels: Sequence[str]) -> "ClassMapping":
        """The same permutation with other label names."""
        return ClassMapping(self.permutation, labels)

    @property
    def perm(self) -> torch.Tensor:
        """The permutation as a tensor (what a sealed CalTrain checkpoint stores)."""
        return self._index()

    @property
    def num_classes(self) -> int:
        return len(self.permutation)

    def _index(self, device=None) -> torch.Tensor:
        return self._cached("_perm_index", self.permutation, device)

    def _inverse(self, device=None) -> torch.Tensor:
        inv = [0] * len(self.permutation)
        for j, p in enumerate(self.permutation):
            inv[p] = j
        return self._cached("_inv_index", inv, device)

    def _cached(self, name: str, values, device) -> torch.Tensor:
        """The gather index as a CPU tensor built once per mapping (a serving enclave maps every
        answer: building it per call cost ~100 us of a single request), moved to `device`."""
        t = self.__dict__.get(name)
        if t is None:
            t = torch.tensor(values, dtype=torch.long)
            object.__setattr__(self, name, t)
        return t if device is None or t.device == torch.device(device) else t.to(device)

    def permute_linear(self, fc: nn.Linear) -> nn.Linear:
        """A copy of `fc` whose output rows are in host order (row j = original row permutation[j])."""
        if not isinstance(fc, nn.Linear) or fc.out_features != self.num_classes:
            raise UserInputError(f"class mapping: the last layer must be an nn.Linear with {self.num_classes} outputs")
        idx = self._index(fc.weight.device)
        out = nn.Linear(fc.in_features, fc.out_features, bias=fc.bias is not None,
                        device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(fc.weight.index_select(0, idx))
            if fc.bias is not None:
                out.bias.copy_(fc.bias.index_select(0, idx))
        return out

    def permute_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a weight or bias tensor (dim 0 = classes) in host order."""
        return t.index_select(0, self._index(t.device))

    def unpermute_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of `permute_rows`: rows in host order -> original class order."""
        return t.index_select(0, self._inverse(t.device))

    def to_original(self, scores_in_host_order: torch.Tensor) -> torch.Tensor:
        """Scores (..., n) in host order -> original class order (a pure gather: bit-exact)."""
        return scores_in_host_order.index_select(-1, self._inverse(scores_in_host_order.device))

    def rows_to_original(self, rows_in_host_order: "list[list[float]]") -> "list[list[float]]":
        """`to_original` on plain lists of floats (one list per row): the same gather, for the
        enclave's per-answer mapping, where a few tensor operations on ten values cost more than
        the Python."""
        inv = self.__dict__.get("_inv_list")
        if inv is None:
            inv = self._inverse().tolist()
            object.__setattr__(self, "_inv_list", inv)
        n = len(inv)
        for r in rows_in_host_order:
            if len(r) != n:
                raise ValueError(f"a row of {len(r)} scores for {n} classes")
        return [[r[i] for i in inv] for r in rows_in_host_order]

    def to_host(self, scores_in_original_order: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_original`."""
        return scores_in_original_order.index_select(-1, self._index(scores_in_original_order.device))

    def host_index(self, original_class: int) -> int:
        """Where the host's output holds `original_class` (e.g. to compute a loss in host order)."""
        return self.permutation.index(int(original_class))

    def label(self, original_class: int) -> str:
        return self.labels[int(original_class)]

    def to_bytes(self) -> bytes:
        """The JSON, padded with spaces to `padded_size(num_classes)` (length-hiding)."""
        raw = json.dumps({"v": 1, "permutation": list(self.permutation), "labels": list(self.labels)},
                         separators=(",", ":"), ensure_ascii=False).encode()
        size = padded_size(self.num_classes)
        if len(raw) > size:  # cannot happen: labels are bounded in __init__
            raise RuntimeError("class mapping is longer than its padded size")
        return raw + b" " * (size - len(raw))

    @classmethod
    def from_bytes(cls, data: bytes) -> "ClassMapping":
        try:
            d = loads_untrusted(data, max_depth=4)
            if type(d.get("v")) is not int or d.get("v") != 1:
                raise ValueError("version")
            perm, labels = d["permutation"], d["labels"]
            if (not isinstance(perm, list) or not isinstance(labels, list)
                    or any(type(p) is not int for p in perm) or any(not isinstance(s, str) for s in labels)):
                raise ValueError("types")
            return cls(perm, labels)
        except (ValueError, KeyError, TypeError, AttributeError, UserInputError):
            raise TamperedMessage("class mapping is malformed") from None

    def __repr__(self) -> str:  # the permutation is a secret: never print it
        return f"ClassMapping(num_classes={self.num_classes})"
