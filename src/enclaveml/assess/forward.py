"""One forward pass of the whole model yields the IR at every assessed point (owner side, assessment).

Every test needs the IRs the host would see: the KL test and both attacks on the test samples, the
decoders on the attacker's held-out images. Instead of one FrontNet pass per point, the model runs
once per batch and each point's IR is taken on the way: segment k_{i-1}..k_i continues from the
IR at k_{i-1} (`model.run(ir, start, stop)`), which is exactly the computation the FrontNet of
k_i performs, so the IRs are bit-identical to `model.split(k)[0](x)` (tests/test_assess_speed.py).
A model without `run` falls back to one FrontNet pass per point: slower, same values.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class PointForward:
    """IRs at the given partition points (and the logits) from one pass of `model`."""

    def __init__(self, model: nn.Module, indices: Iterable[int]):
        self.model = model
        self.indices = sorted(set(int(k) for k in indices))
        if not self.indices:
            raise ValueError("PointForward needs at least one partition point")
        self._chained = callable(getattr(model, "run", None))
        self._fronts = {} if self._chained else {k: model.split(k)[0] for k in self.indices}
        # a segment that starts with an in-place op (a user's `nn.ReLU(inplace=True)` as its own layer)
        # would overwrite the IR taken before it: found by the tensors' version counters, then each
        # segment gets a copy of its input
        self._copy_inputs = False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, logits: bool = False, upto: int | None = None
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """{k: IR_k(x)} for every point k <= `upto` (all by default), and the logits when asked.

        `upto` lets a caller whose deeper consumers are done stop the pass early.
        """
        wanted = [k for k in self.indices if upto is None or k <= upto]
        irs: dict[int, torch.Tensor] = {}
        if self._chained:
            h, at, versions = x, 0, {}
            for k in wanted:
                h = self.model.run(h.clone() if self._copy_inputs and at else h, at, k)
                irs[k], at, versions[k] = h, k, h._version
            out = self.model.run(h.clone() if self._copy_inputs else h, at, None) if logits else None
            if not self._copy_inputs and any(irs[k]._version != v for k, v in versions.items()):
                self._copy_inputs = True
                return self(x, logits, upto)
        else:
            for k in wanted:
                irs[k] = self._fronts[k](x)
            out = self.model(x) if logits else None
        return irs, out

    @torch.no_grad()
    def batched(self, x: torch.Tensor, batch: int = 256, logits: bool = False
                ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """The same over a large set, `batch` images per pass, concatenated."""
        parts: dict[int, list[torch.Tensor]] = {k: [] for k in self.indices}
        outs: list[torch.Tensor] = []
        for i in range(0, x.shape[0], batch):
            irs, out = self(x[i:i + batch], logits=logits)
            for k, t in irs.items():
                parts[k].append(t)
            if out is not None:
                outs.append(out)
        return {k: torch.cat(v) for k, v in parts.items()}, (torch.cat(outs) if logits else None)
