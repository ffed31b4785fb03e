"""A flat execution plan of an eval-mode sequential network: the same ATen calls, without the
`nn.Module` machinery, for the small passes of lone requests.

Trust side: enclave (its FrontNet and, when handed over, its BackNet); pure logic, no I/O.

Why: a lone single-image request through darknet k=10 makes 19 module calls (Sequential blocks,
Conv2d, BatchNorm2d, LeakyReLU, pools), each paying `Module.__call__`'s hooks checks, attribute
look-ups and the layer's Python `forward`; at batch size 1 that Python is a visible share of a
pass. `flatten` turns a network whose every leaf is one of a few known layer types (convolution
with zero padding, eval-mode batch norm with running statistics, ReLU / LeakyReLU, max / average
pooling, adaptive average pooling, flatten, linear, dropout in eval mode) into a tuple of closures
that call exactly the ATen functions those modules' `forward` would call, with the same arguments
and the same parameter tensors (shared, not copied), so that outputs are equal bit for bit
(checked by tests/test_serve_lone_path.py). Anything else (a module type not listed, forward hooks,
training mode, a padding mode other than zeros) makes `flatten` return None and the caller keeps
the module: correctness never depends on the plan.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Step = Callable[[torch.Tensor], torch.Tensor]


def _step(m: nn.Module) -> "Step | None":
    """One leaf module -> a closure with its forward's exact ATen call, or None if not known."""
    t = type(m)
    if t is nn.Conv2d:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        w, b, s, p, d, g = m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups
        return lambda x: torch.conv2d(x, w, b, s, p, d, g)
    if t is nn.BatchNorm2d:
        # eval with running statistics: F.batch_norm(x, mean, var, weight, bias, False, momentum, eps)
        if m.training or not m.track_running_stats or m.running_mean is None:
            return None
        w, b, rm, rv, eps = m.weight, m.bias, m.running_mean, m.running_var, m.eps
        mom = 0.0 if m.momentum is None else m.momentum
        cudnn = torch.backends.cudnn  # read at each call, as F.batch_norm does
        return lambda x: torch.batch_norm(x, w, b, rm, rv, False, mom, eps, cudnn.enabled)
    if t is nn.LeakyReLU:
        slope = m.negative_slope
        return (lambda x: torch._C._nn.leaky_relu_(x, slope)) if m.inplace else (lambda x: F.leaky_relu(x, slope))
    if t is nn.ReLU:
        return torch.relu_ if m.inplace else torch.relu
    if t is nn.MaxPool2d:
        if m.return_indices:
            return None
        k, s, p, d, c = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
        return lambda x: torch.max_pool2d(x, k, s, p, d, c)
    if t is nn.AvgPool2d:
        k, s, p, c, cip, dov = m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
        return lambda x: F.avg_pool2d(x, k, s, p, c, cip, dov)
    if t is nn.AdaptiveAvgPool2d:
        size = m.output_size
        return lambda x: F.adaptive_avg_pool2d(x, size)
    if t is nn.Flatten:
        sd, ed = m.start_dim, m.end_dim
        return lambda x: x.flatten(sd, ed)
    if t is nn.Linear:
        w, b = m.weight, m.bias
        return lambda x: F.linear(x, w, b)
    if t in (nn.Dropout, nn.Identity) and not m.training:
        return lambda x: x
    return None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


def _leaves(m: nn.Module, out: list) -> bool:
    """Append `m`'s steps in forward order; False if any part has no known flat form."""
    if _hooked(m):
        return False
    if isinstance(m, nn.Sequential):  # a container's own training flag changes nothing; its leaves' do
        return type(m).forward is nn.Sequential.forward and all(_leaves(c, out) for c in m)
    step = _step(m) if not m.training else None
    if step is None:
        return False
    out.append(step)
    return True


def flatten(net: nn.Module) -> "tuple[Step, ...] | None":
    """The steps of `net` (a Sequential tree of known eval-mode layers), or None."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    steps: list[Step] = []
    return tuple(steps) if _leaves(net, steps) and steps else None


def run(steps: "tuple[Step, ...]", x: torch.Tensor) -> torch.Tensor:
    for s in steps:
        x = s(x)
    return x


def runner(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function equal to `net`'s forward: its flat plan when it has one, else the module itself."""
    steps = flatten(net)
    if steps is None:
        return net
    return lambda x: run(steps, x)
