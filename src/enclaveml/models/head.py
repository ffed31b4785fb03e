"""Find the classifier whose output rows the secret class mapping permutes (owner side, no I/O).

The class mapping hides which BackNet output is which class by permuting the rows of the last
`nn.Linear` (or 1x1 `nn.Conv2d`) that produces the class scores. That is only sound when
everything after that layer treats the classes alike, i.e. the model's output is a
permutation-equivariant function of the classifier's output: elementwise activations (ReLU,
Sigmoid, ...), Softmax/LogSoftmax over the class dimension, Dropout, Identity, and, after a 1x1
convolution, global pooling and flattening. Anything else after the classifier (a per-class
bias or BatchNorm, a reshape that mixes classes, a second Linear) is refused with its name.

The search reads the model's graph backwards from its output, one layer at a time (each layer
traced with torch.fx; stages of a graph model are already graphs).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import PartitionError
from .layers import LayeredModel

#: Modules that act on each class's score alone (or on all of them alike: softmax over classes).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Dropout,
                nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.AvgPool2d,
          nn.MaxPool2d)
_F_ELEMENTWISE = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, torch.sigmoid,
                  F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardsigmoid, F.hardswish, F.softplus, F.dropout,
                  torch.dropout, F.dropout1d, F.dropout2d, torch.clamp, torch.clip}
_F_CLASSWISE = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_F_POOL = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, torch.flatten, torch.squeeze,
           torch.mean, torch.amax}
_METHODS_ELEMENTWISE = {"relu", "sigmoid", "tanh", "clamp", "clip", "contiguous", "float"}
_METHODS_CLASSWISE = {"softmax", "log_softmax"}
_METHODS_POOL = {"flatten", "squeeze", "mean", "amax", "view", "reshape"}


def _aten(name: str):
    try:
        return getattr(torch.ops.aten, name.split(".")[0]).__getattr__(name.split(".")[1])
    except (AttributeError, RuntimeError):
        return None


# the same ops as torch.export writes them
_ATEN_ELEMENTWISE = {_aten(n) for n in ("relu.default", "relu_.default", "hardtanh.default", "sigmoid.default",
                                        "tanh.default", "gelu.default", "silu.default", "dropout.default",
                                        "clone.default", "leaky_relu.default", "clamp.default")} - {None}
_ATEN_CLASSWISE = {_aten(n) for n in ("softmax.int", "log_softmax.int", "_softmax.default",
                                      "_log_softmax.default")} - {None}
_ATEN_POOL = {_aten(n) for n in ("adaptive_avg_pool2d.default", "mean.dim", "flatten.using_ints", "view.default",
                                 "reshape.default", "squeeze.dims", "squeeze.dim", "amax.default",
                                 "max_pool2d.default", "avg_pool2d.default")} - {None}


@dataclass(frozen=True)
class Classifier:
    """The layer holding the class rows and their parameter names (keys of `model.layers`)."""

    layer: int  # index into model.layers: the BackNet must start at or before it
    keys: tuple[str, ...]  # e.g. ("fc.fc.weight", "fc.fc.bias"); dim 0 of each is the class
    kind: str  # "linear" or "conv1x1"


def _shape(node) -> tuple[int, ...] | None:
    from torch.fx.passes.shape_prop import TensorMetadata

    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _dim_arg(node: fx.Node, pos: int, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get("dim", default)


class _Refusal(PartitionError):
    pass


def _why(layer_name: str, what: str) -> _Refusal:
    return _Refusal(f"the class mapping cannot hide the class order: after the classifier, {what} (in layer "
                    f"{layer_name}) does not treat all classes alike; the output must be a permutation-equivariant "
                    "function of the last nn.Linear or 1x1 nn.Conv2d (ReLU, Softmax, LogSoftmax, Dropout, Identity, "
                    "global pooling)")


def _traced(name: str, layer: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    from torch.fx.passes.shape_prop import ShapeProp

    root = nn.Sequential(OrderedDict([(name, layer)]))
    try:
        gm = fx.symbolic_trace(root)
    except Exception as e:
        raise PartitionError(f"the class mapping needs to read layer {name}'s graph, which torch.fx cannot trace "
                             f"({type(e).__name__}); end the model in a plain nn.Linear layer") from None
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    return gm


def _class_dim_ok(node: fx.Node, dim, ndim: int) -> bool:
    if dim is None:  # softmax's legacy implicit dim: 1 for 2-D and 4-D inputs
        return ndim in (2, 4)
    return dim in (1, -1) if ndim == 2 else dim in (1, 1 - ndim)


def _step(gm: fx.GraphModule, node: fx.Node, num_classes: int, layer_name: str):
    """('found', Classifier-parts) | ('next', input node) for one node on the output path."""
    shape = _shape(node)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Linear) and mod.out_features == num_classes:
            return "found", (str(node.target), "linear", ("weight", "bias") if mod.bias is not None else ("weight",))
        if (isinstance(mod, nn.Conv2d) and mod.out_channels == num_classes and mod.kernel_size == (1, 1)
                and mod.groups == 1):
            return "found", (str(node.target), "conv1x1", ("weight", "bias") if mod.bias is not None else ("weight",))
        if isinstance(mod, nn.Sequential) and len(mod) == 0:
            return "next", node.args[0]
        if isinstance(mod, _ELEMENTWISE) or isinstance(mod, _POOLS):
            if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
                raise _why(layer_name, f"{type(mod).__name__} with per-channel slopes")
            return "next", node.args[0]
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            if shape is None or not _class_dim_ok(node, mod.dim, len(shape)):
                raise _why(layer_name, f"{type(mod).__name__}(dim={mod.dim}) over another dimension than the classes")
            return "next", node.args[0]
        if isinstance(mod, nn.Flatten):
            return "next", node.args[0]
        raise _why(layer_name, f"{type(mod).__name__} ({node.target})")
    if node.op in ("call_function", "call_method"):
        t = node.target
        if t in _F_ELEMENTWISE or t in _ATEN_ELEMENTWISE or (node.op == "call_method" and t in _METHODS_ELEMENTWISE):
            return "next", node.args[0]
        if t in _F_CLASSWISE or t in _ATEN_CLASSWISE or (node.op == "call_method" and t in _METHODS_CLASSWISE):
            dim = _dim_arg(node, 1)
            if shape is None or not _class_dim_ok(node, dim, len(shape)):
                raise _why(layer_name, f"{getattr(t, '__name__', t)}(dim={dim}) over another dimension than the classes")
            return "next", node.args[0]
        if t in _F_POOL or t in _ATEN_POOL or (node.op == "call_method" and t in _METHODS_POOL):
            return "next", node.args[0]
        if t in (F.linear, _aten("linear.default")):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            ws = _shape(w)
            if isinstance(w, fx.Node) and w.op == "get_attr" and (ws is None or ws[0] == num_classes):
                keys = [str(w.target)] + ([str(b.target)] if isinstance(b, fx.Node) and b.op == "get_attr" else [])
                return "found", ("", "linear", tuple(keys))
        if t in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul):
            raise _why(layer_name, f"an arithmetic op ({node.name}) that could add per-class constants")
        raise _why(layer_name, f"{getattr(t, '__name__', t)} ({node.name})")
    raise _why(layer_name, f"{node.op} {node.name}")


_RESHAPES = {torch.flatten, torch.squeeze, "flatten", "squeeze", "view", "reshape"} | {
    _aten(n) for n in ("flatten.using_ints", "view.default", "reshape.default", "squeeze.dims", "squeeze.dim")}


def _keeps_classes(node: fx.Node, arg, n: int, layer_name: str) -> None:
    """The class axis must stay axis 1 of size n; a reshape only drops 1x1 spatial axes."""
    out, inp = _shape(node), _shape(arg)
    if out is None or inp is None or len(out) < 2 or out[1] != n or inp[1] != n:
        raise _why(layer_name, f"{node.name}, which moves or resizes the class axis,")
    is_reshape = (node.op == "call_module" and isinstance(gm_module(node), nn.Flatten)) or node.target in _RESHAPES
    if is_reshape and any(d != 1 for d in inp[2:]):
        raise _why(layer_name, f"{node.name}, which folds spatial positions into the class axis,")


def gm_module(node: fx.Node):
    return node.graph.owning_module.get_submodule(str(node.target))


def find_classifier(model: LayeredModel) -> Classifier:
    """The classifier layer of `model` and the names of its class rows; `PartitionError` saying why not."""
    n = model.num_classes
    if n < 1:
        raise PartitionError("the model's number of classes is unknown")
    names = model.names
    layers = list(model.layers)
    # inputs of every layer (one zero image), for shapes
    ins = []
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            x = torch.zeros(2, *model.input_shape)
            for layer in layers:
                ins.append(x)
                x = layer(x)
        finally:
            model.train(was)
    for i in range(len(layers) - 1, -1, -1):
        name = names[i]
        layer = layers[i]
        if isinstance(layer, nn.Linear) and layer.out_features == n:  # today's case: no tracing needed
            return Classifier(i, tuple(f"{name}.{s}" for s in ("weight", "bias") if getattr(layer, s) is not None),
                              "linear")
        gm = _traced(name, layer, ins[i])
        out = next(nd for nd in gm.graph.nodes if nd.op == "output")
        node = out.args[0]
        while True:
            if not isinstance(node, fx.Node):
                raise _why(name, "a non-tensor output")
            if node.op == "placeholder":
                break  # nothing but equivariant ops in this layer: the classifier is further up
            what, arg = _step(gm, node, n, name)
            if what == "found":  # paths are relative to a root holding the layer under its own name
                path, kind, parts = arg
                return Classifier(i, tuple(f"{path}.{p}" if path else p for p in parts), kind)
            _keeps_classes(node, arg, n, name)
            node = arg
    raise PartitionError("no nn.Linear or 1x1 nn.Conv2d with one output per class found at the end of the model")
