"""What a FrontNet costs inside the enclave: parameters, FLOPs, memory and latency (owner side).

Memory is what must sit in enclave memory for one inference: the FrontNet's weights plus the
peak activation working set (the largest input + output of any one module, batch 1). It is set
against the enclave budget (default 93 MiB, SGX1's usable EPC) so a deep FrontNet that would page
is visible before deployment.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .threads import single_threaded


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (tuple, list)):
        return sum(_nbytes(v) for v in t)
    return 0


def param_count(front: nn.Module) -> int:
    return sum(p.numel() for p in front.parameters())


def weight_bytes(front: nn.Module) -> int:
    return sum(_nbytes(t) for t in front.state_dict().values())


@torch.no_grad()
def flops(front: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass, batch 1 (2 per multiply-add; convs and matmuls)."""
    with FlopCounterMode(display=False) as fc:
        front(torch.zeros(1, *input_shape))
    return int(fc.get_total_flops())


@torch.no_grad()
def peak_activation_bytes(front: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Largest (input + output) bytes of any module during one batch-1 forward pass."""
    peak = 0

    def hook(_m, inp, out):
        nonlocal peak
        peak = max(peak, _nbytes(inp) + _nbytes(out))

    handles = [m.register_forward_hook(hook) for m in front.modules()]
    try:
        front(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return peak


@torch.no_grad()
def latency_ms(front: nn.Module, input_shape: tuple[int, ...], repeats: int = 10) -> float:
    """Median wall time of a batch-1 FrontNet forward pass, after two warm-up runs."""
    x = torch.zeros(1, *input_shape)
    for _ in range(2):
        front(x)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        front(x)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def frontnet_cost(front: nn.Module, input_shape: tuple[int, ...], budget_bytes: int, repeats: int = 10) -> dict:
    """The `cost` record of one point in assessment.json.

    The FLOP count and the activation bytes are counts, the same on any thread count: their passes run
    on one thread (on a busy machine two OpenMP threads on a batch-1 pass mostly spin). The latency is
    measured on the run's own thread count, as before.
    """
    with single_threaded():
        act = peak_activation_bytes(front, input_shape)
        n_flops = flops(front, input_shape)
    wb = weight_bytes(front)
    return {
        "params": param_count(front),
        "flops": n_flops,
        "activation_bytes": act,
        "weight_bytes": wb,
        "enclave_bytes": act + wb,
        "budget_bytes": int(budget_bytes),
        "fits": act + wb <= budget_bytes,
        "latency_ms": round(latency_ms(front, input_shape, repeats), 4),
    }
