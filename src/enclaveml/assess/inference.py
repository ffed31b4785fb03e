"""Inference-only copies of a model for the assessment's oracle and white-box attacker (owner side).

The KL test's oracle (the whole model on thousands of channel images) and rMLE's FrontNet (forward
and backward, input gradients only) never train, so batch norm can be folded into the convolution
before it: the same function, one pass over the activations less, about 1.25x faster on CPU for
darknet. The fold traces the model with torch.fx, every convolution a leaf, including subclasses
of `nn.Conv2d` (TensorFlow-style "same" padding convolutions, as EfficientNet ports and timm
write them: torch.fx's own `fuse` matches exact types only and folds none of them); such a
convolution whose padding is a zero pad becomes a plain `nn.Conv2d` with that padding (one copy of
the activations less; an asymmetric "same" pad at stride 2 becomes the larger symmetric one with
zero kernel taps, the same windows: 5 of EfficientNet-Lite0's 49 convolutions, whose pad copies were
10% of an oracle pass). Outputs agree with the original to float rounding (checked on
every copy; a model that fx cannot trace, or whose copy disagrees, is used as it is). The IRs the
tests measure always come from the real FrontNet, never from a copy.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

#: a convolution type -> the batch norm that can fold into it
_FOLDS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_CONVS = tuple(_FOLDS)


class _ConvLeaves(fx.Tracer):
    """torch.fx's tracer with every convolution a leaf, subclasses included, so the fold sees it."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _CONVS) or super().is_leaf_module(m, qualname)


def _defaults(model: nn.Module) -> dict:
    """The forward's optional arguments at their defaults, as the assessment calls it (`layer(x)`): traced
    as constants, so a branch on one (`if drop_connect_rate:`) does not stop the trace."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _set_module(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def fold_batch_norm(model: nn.Module) -> fx.GraphModule:
    """`model` (modified in place: pass a copy) as a traced module with each batch norm that follows a
    convolution or linear layer (and is its only use; the layer called once) folded into that layer's weights."""
    graph = _ConvLeaves().trace(model, concrete_args=_defaults(model))
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), tuple(_FOLDS.values())) or not node.args:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) > 1 \
                or calls[prev.target] > 1:  # a layer called twice keeps its own weights
            continue
        layer, bn = modules.get(prev.target), modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        conv = next((c for c in _CONVS if isinstance(layer, c)), None)
        if conv is not None and type(bn) is _FOLDS[conv]:
            fused = fuse_conv_bn_eval(layer, bn)
        elif type(layer) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        modules[prev.target] = fused
        _set_module(model, prev.target, fused)
        node.replace_all_uses_with(prev)
        graph.erase_node(node)
    return fx.GraphModule(model, graph)


def plain_padding_convs(model: nn.Module) -> int:
    """Replace (in place) each `nn.Conv2d` subclass that zero-pads before an unpadded convolution by a
    plain `nn.Conv2d` with that padding (an asymmetric pad: the larger one on both sides, with zero
    kernel taps where it adds rows), when the two agree on a random input; the number replaced."""
    replaced = 0
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d or not isinstance(m, nn.Conv2d) or tuple(m.padding) != (0, 0) \
                or m.padding_mode != "zeros":
            continue
        pads = [c for c in m.children() if isinstance(c, nn.ZeroPad2d)]
        if len(pads) > 1:
            continue
        left, right, top, bottom = pads[0].padding if pads else (0, 0, 0, 0)
        if min(left, right, top, bottom) < 0 or (tuple(m.dilation) != (1, 1) and (left != right or top != bottom)):
            continue
        # an asymmetric pad ("same" at stride 2: one more row and column after than before) becomes the
        # larger symmetric pad with zero taps added to the kernel where the extra rows fall: the same
        # windows over the same values, no padded copy of the activation
        ph, pw = max(top, bottom), max(left, right)
        kh, kw = m.kernel_size
        weight = m.weight.new_zeros(*m.weight.shape[:2], kh + 2 * ph - top - bottom, kw + 2 * pw - left - right)
        weight[..., ph - top:ph - top + kh, pw - left:pw - left + kw] = m.weight.detach()
        plain = nn.Conv2d(m.in_channels, m.out_channels, tuple(weight.shape[-2:]), m.stride, (ph, pw), m.dilation,
                          m.groups, bias=m.bias is not None).to(m.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        plain.weight.requires_grad_(m.weight.requires_grad)
        side = 2 * max(m.kernel_size) * max(m.stride) + 3
        x = torch.randn(2, m.in_channels, side, side + 1, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, out = m(x), plain(x)
        if ref.shape != out.shape or float((ref - out).abs().max()) > 1e-5 * float(ref.abs().max().clamp_min(1.0)):
            continue
        _set_module(model, name, plain)
        replaced += 1
    return replaced


def folded(model: nn.Module, input_shape: tuple[int, ...], rtol: float = 1e-3) -> nn.Module:
    """An eval-mode, channels-last copy of `model` (in eval mode) with batch norm folded into its
    convolutions and no parameter gradients; `model` itself when that fails."""
    try:
        fast = copy.deepcopy(model).eval()
        fast = fold_batch_norm(fast)
        plain_padding_convs(fast)
        fast = fast.eval().to(memory_format=torch.channels_last)
    except Exception:  # not traceable by torch.fx (data-dependent control flow...): use the model as it is
        return model
    for p in fast.parameters():
        p.requires_grad_(False)
    x = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), fast(x)
    if ref.shape != out.shape or float((ref - out).abs().max()) > rtol * float(ref.abs().max().clamp_min(1e-6)):
        return model
    return fast


def folded_layers(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The same fold, layer by layer, keeping a `LayeredModel`'s `run(x, start, stop)`: one copy serves
    the KL oracle (the whole model) and the white-box attacker of every point (a prefix of it).

    A layer that cannot be folded is used as it is; a model that is not a `LayeredModel` gets the
    whole-model fold (`folded`).
    """
    from ..models.layers import LayeredModel

    if not isinstance(model, LayeredModel):
        return folded(model, input_shape)
    shapes = [tuple(input_shape)] + [p.out_shape for p in model.partition_points()]
    layers = [(name, folded(layer, shapes[i])) for i, (name, layer) in enumerate(model.layers.named_children())]
    return LayeredModel(layers, model.input_shape, model.num_classes).eval()
