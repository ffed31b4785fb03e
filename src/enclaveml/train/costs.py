"""Who does the training work: multiply-accumulates per layer, and the host's share of them.

Trust side: owner (pure model maths, no I/O). A label-leakage defence that moves layers into the
enclave (a deeper FrontNet, a deeper sealed head) or trains them there lowers what the host
learns, but also what the host computes, and outsourcing that work is why CalTrain has a host.
`host_flops_share` says how much of one training step the host still does, so a defence's
figures (`benchmarks/bench_label_leakage.py`, docs/caltrain.md) are read beside it.

Counted: Conv2d and Linear multiply-accumulates of one instance's forward pass (batch norm,
activations and pooling are a few percent and left out); a training step costs about 3x the
forward (forward, input gradient, weight gradient) on both sides alike, so the share of the
forward is the share of the step. Enclave-only extras (a local classifier) are added to the
enclave's side.
"""

from __future__ import annotations

import torch
from torch import nn


def _count_into(module: nn.Module, count: list[int]) -> list:
    """Forward hooks adding each Conv2d's and Linear's multiply-accumulates to count[0]."""

    def hook(mod: nn.Module, inp, out) -> None:
        if isinstance(mod, nn.Conv2d):
            count[0] += int(out.numel()) * mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        else:
            count[0] += int(out.numel()) * mod.in_features

    return [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_macs(model: nn.Module, input_shape: "tuple[int, ...]") -> list[int]:
    """Multiply-accumulates of each top-level layer of a LayeredModel for one input."""
    macs: list[int] = []
    count = [0]
    handles = _count_into(model, count)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_shape)
            for layer in model.layers:
                count[0] = 0
                x = layer(x)
                macs.append(count[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return macs


def module_macs(module: nn.Module, input_shape: "tuple[int, ...]") -> int:
    """Multiply-accumulates of any module (e.g. the enclave's local classifier) for one input."""
    total = [0]
    handles = _count_into(module, total)
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def host_flops_share(model: nn.Module, k: int, head: int, enclave_extra: int = 0, host_passes: int = 1) -> float:
    """The host's share of a training step's multiply-accumulates: layers k..n-1-head, run
    `host_passes` times (2 under `selfsup`'s second view), over everything both sides compute
    (`enclave_extra`: the enclave's own additions, e.g. a local classifier)."""
    macs = layer_macs(model, tuple(model.input_shape))
    host = sum(macs[k:len(macs) - head])
    return host * host_passes / (sum(macs) + host * (host_passes - 1) + enclave_extra)
