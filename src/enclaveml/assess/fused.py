"""The KL oracle's convolutions with their activation or residual add fused in (owner side, assessment).

Why: the oracle (the whole model over tens of thousands of channel images, never differentiated)
spends much of its time outside the convolutions on a model like EfficientNet-Lite0 at 224x224:
each ReLU6 after a convolution is one more pass over an activation of up to 200 MB per batch
(13% of a pass), each residual add another. oneDNN applies an activation or an add to a
convolution's output while it is still in the cache ("post-ops"); PyTorch exposes that as
`torch.ops.mkldnn._convolution_pointwise` (what torch.compile's CPU backend emits), with no
compiler and no build step. The copy here replaces, in each traced stage of the batch-norm-folded
oracle (assess/inference.py), every plain 2-D convolution by such a call, absorbing the activation
that is its only user (ReLU, ReLU6/Hardtanh, LeakyReLU, SiLU, Sigmoid, Tanh) or the residual add
that is. The convolution itself is the same oneDNN kernel `F.conv2d` runs, and a post-op is
applied to the float32 accumulator before it is stored: on EfficientNet-Lite0 the fused oracle's
logits equal the unfused one's bit for bit (`torch.equal`), 0.77x the CPU time per image in
float32, 0.78x in bfloat16 (docs/benchmarks.md, "helper lt, session 6"). Every stage is checked
against the unfused one on a random batch; a stage that differs beyond float rounding, or cannot be
rewritten, is kept as it is.

Inference only: the fused op has no backward, so rMLE (which differentiates the FrontNet) keeps the
plain folded copy. Under `torch.autocast("cpu", dtype=torch.bfloat16)` (the KL screen's low-precision
pass) a fused convolution casts its input to bfloat16 and uses a bfloat16 copy of its weights,
as autocast does for `F.conv2d`.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

#: activation modules -> (oneDNN post-op, its scalars)
_ACT_MODULES = {
    nn.ReLU: lambda m: ("relu", []),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0]),
    nn.Hardtanh: lambda m: ("hardtanh", [float(m.min_val), float(m.max_val)]),
    nn.LeakyReLU: lambda m: ("leaky_relu", [float(m.negative_slope)]),
    nn.SiLU: lambda m: ("swish", []),
    nn.Sigmoid: lambda m: ("sigmoid", []),
    nn.Tanh: lambda m: ("tanh", []),
}
#: activation functions -> post-op (only those whose extra arguments are all at their defaults)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "swish", torch.sigmoid: "sigmoid",
                  torch.tanh: "tanh"}
_ADDS = (operator.add, torch.add)


def available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution (CPU builds with mkldnn)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class FusedConv2d(nn.Module):
    """A plain zero-padded `nn.Conv2d` with an optional fused activation (`attr`) or residual add."""

    def __init__(self, conv: nn.Conv2d, attr: str = "none", scalars: list | None = None, add: bool = False):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), int(conv.groups)
        self.attr, self.scalars, self.add = attr, list(scalars or []), add
        self._low: tuple[torch.Tensor, torch.Tensor | None] | None = None  # bfloat16 weights, made on first use

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self.weight, self.bias
        if _bf16_autocast():
            if self._low is None:
                self._low = (w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16))
            w, b = self._low
            x = x.to(torch.bfloat16)
            other = None if other is None else other.to(torch.bfloat16)
        elif x.dtype != w.dtype:
            x = x.to(w.dtype)
        if not x.is_contiguous(memory_format=torch.channels_last):  # e.g. the oracle's input: oneDNN's
            x = x.contiguous(memory_format=torch.channels_last)   # NCHW path is slower (cnn26: 1.2x)
        if self.add:
            # out = conv(x) + other, the add applied to the accumulator (oneDNN's binary post-op)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other.to(x.dtype), w, b, self.padding, self.stride, self.dilation, self.groups, "add", 1.0,
                None, [], None)
        return torch.ops.mkldnn._convolution_pointwise(
            x, w, b, self.padding, self.stride, self.dilation, self.groups, self.attr, self.scalars, "")

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, post={'add' if self.add else self.attr}")


def _fusable_conv(m: nn.Module | None) -> bool:
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, list] | None:
    """The post-op that `node` (an activation call on one tensor) is, or None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        make = _ACT_MODULES.get(type(m))
        return make(m) if make is not None and len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1:
        if any(v for k, v in node.kwargs.items() if k != "inplace"):
            return None
        name = _ACT_FUNCTIONS[node.target]
        return ("hardtanh", [0.0, 6.0]) if name == "relu6" else (name, [])
    return None


def fuse_stage(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of the traced stage `gm` with every plain 2-D convolution as a `FusedConv2d` (absorbing the
    activation or add that is its only user), and how many convolutions were replaced."""
    gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _fusable_conv(modules.get(node.target)) or len(node.args) != 1 or node.kwargs:
            continue
        conv = modules[node.target]
        users = list(node.users)
        attr, scalars, absorbed, args = "none", [], None, (node.args[0],)
        if len(users) == 1:
            user = users[0]
            act = _activation(user, modules)
            if act is not None:
                (attr, scalars), absorbed = act, user
            elif user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 and not user.kwargs:
                a, b = user.args
                other = b if a is node else a
                if isinstance(other, fx.Node) and other is not node:
                    absorbed, args = user, (node.args[0], other)
        name = f"{node.target.replace('.', '_')}_fused{replaced}"
        gm.add_submodule(name, FusedConv2d(conv, attr, scalars, add=len(args) == 2))
        last = absorbed or node
        with graph.inserting_after(last):
            new = graph.call_module(name, args)
        last.replace_all_uses_with(new)
        if absorbed is not None:
            graph.erase_node(absorbed)
        graph.erase_node(node)
        replaced += 1
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, replaced


def _same(a: nn.Module, b: nn.Module, shape: tuple[int, ...], rtol: float) -> bool:
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last) \
        if len(shape) == 3 else torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = a(x), b(x)
    return ref.shape == out.shape and float((ref.float() - out.float()).abs().max()) <= \
        rtol * float(ref.float().abs().max().clamp_min(1e-6))


def fused_oracle(model: nn.Module, input_shape: tuple[int, ...], rtol: float = 1e-5) -> nn.Module:
    """An inference copy of `model` (the folded oracle: a `LayeredModel` of traced stages, or one traced
    module) with fused convolutions where they give the same outputs; `model` itself when nothing fuses."""
    from ..models.layers import LayeredModel

    if not available():
        return model
    if isinstance(model, LayeredModel):
        shapes = [tuple(input_shape)] + [p.out_shape for p in model.partition_points()]
        layers, any_fused = [], False
        for i, (name, layer) in enumerate(model.layers.named_children()):
            new = _fused_or_none(layer, shapes[i], rtol)
            any_fused |= new is not None
            layers.append((name, new if new is not None else layer))
        return LayeredModel(layers, model.input_shape, model.num_classes).eval() if any_fused else model
    new = _fused_or_none(model, tuple(input_shape), rtol)
    return new if new is not None else model


def _fused_or_none(layer: nn.Module, shape: tuple[int, ...], rtol: float) -> nn.Module | None:
    if not isinstance(layer, fx.GraphModule):
        return None
    try:
        new, n = fuse_stage(layer)
        if n == 0 or not _same(layer, new.eval(), shape, rtol):
            return None
    except Exception:  # an op oneDNN refuses, an unexpected graph: the stage stays as it was
        return None
    return new.eval()
