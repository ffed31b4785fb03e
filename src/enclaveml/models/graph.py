"""Partition points of any PyTorch model, read from its graph (torch.fx; torch.export as fallback).

Trust side: owner (finding the points) and enclave/host (rebuilding the same split from an
allowed factory). No I/O.

A model with its own `forward()` (residual blocks, concatenations, functional calls) is traced
into a graph of operations. A candidate partition point is a place in that graph where exactly
one tensor crosses from the front to the back: inside a residual block the skip tensor is also
alive, inside a dense block the concatenated inputs are, so those are cut between blocks only.
Cuts that would put one parameter on both sides (a weight used before and after the point)
are skipped, so FrontNet weights never travel in the plain BackNet.

The graph between two consecutive points becomes one stage (an `fx.GraphModule` holding just
the modules and parameters it uses); the stages in order make a `LayeredModel`, so every other
part of enclaveml (assessment, bundles, serving) sees the usual list of layers. A stage is
named by the module path that ends there ("layer1.0" -> `layer1_0`; a top-level functional call
by its graph node name, e.g. `flatten`). Running the stages in order runs exactly the traced
operations in the traced order, so FrontNet + BackNet is bit-identical to the traced model.

Rebuilding in the enclave: the manifest names an allowed factory; the enclave calls it, traces
the result the same way (same code, same torch: the same graph) and checks that the stage names
match the manifest's layer list before loading the sealed FrontNet weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import traceback
from pathlib import Path

import torch
from torch import fx, nn

from ..errors import PartitionError
from .layers import LayeredModel

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def _user_frame(exc: BaseException) -> str:
    """'file.py:12 `source line`' of the innermost traceback frame outside torch, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_TORCH_DIR) and "enclaveml/models/graph" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} `{(f.line or '').strip()[:80]}`"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs whole graphs on failure; the caller reports one line instead."""
    names = [n for n in logging.root.manager.loggerDict if n == "torch" or n.startswith("torch.")]
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.CRITICAL)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[fx.GraphModule, str]:
    """(graph module, "fx" | "export" | "graph"); `PartitionError` naming the op when neither tracer can."""
    model.eval()
    if isinstance(model, fx.GraphModule):  # already a graph (onnx2torch, a user's own fx pass)
        return model, "graph"
    try:
        return fx.symbolic_trace(model), "fx"
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError... on untraceable Python
        fx_err, where = e, _user_frame(e)
    try:
        with _quiet_torch_logs():
            x = torch.zeros(2, *input_shape)
            ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        return ep.module(), "export"
    except Exception as e:
        ex_err = e
    where = where or _user_frame(ex_err)
    raise PartitionError(
        f"{type(model).__name__} cannot be traced into a graph{' at ' + where if where else ''} "
        f"(torch.fx: {_first_line(fx_err)[:120]}; torch.export: {_first_line(ex_err)[:120]}); way out: "
        "write that step with tensor ops (torch.where, torch.cond) or move it into a leaf module, or give "
        "the model as an nn.Sequential of blocks (its children become the partition points)")


def _is_guard(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("_guards")


def _module_stack(node: fx.Node) -> list[str]:
    """Module paths enclosing `node`, outermost first (the leaf module itself included)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    paths = [p for p in paths if p]  # torch.export adds the root as ''
    if node.op == "call_module" and str(node.target) not in paths:
        paths.append(str(node.target))
    return paths


def _stage_name(node: fx.Node, following: fx.Node | None) -> str:
    """The outermost module that ends at `node`, else the op inside its innermost module ("layer1.0.add")."""
    mine = _module_stack(node)
    theirs = set(_module_stack(following)) if following is not None else set()
    for path in mine:
        if path not in theirs:
            return path
    base = re.sub(r"_\d+$", "", node.name)  # fx numbers repeated ops: add, add_1, ...
    return f"{mine[-1]}.{base}" if mine else base


def _touched(gm: fx.GraphModule, node: fx.Node) -> set[int]:
    """ids of the parameters and buffers a node uses directly."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return {id(t) for t in list(mod.parameters()) + list(mod.buffers())}
    if node.op == "get_attr":
        try:
            return {id(_get_attr(gm, str(node.target)))}
        except AttributeError:
            return set()
    return set()


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensor_output(node: fx.Node) -> bool:
    from torch.fx.passes.shape_prop import TensorMetadata

    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _cut_points(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node], fx.Node]:
    """(data nodes in order, cut nodes, output value node) of a shape-propagated graph."""
    nodes = [n for n in gm.graph.nodes if not _is_guard(n)]
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise PartitionError(f"the model's forward takes {len(inputs)} inputs; a partitionable model takes one image batch")
    output = next(n for n in nodes if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    if not isinstance(result, fx.Node):
        raise PartitionError("the model must return one tensor of class scores")
    # data nodes: those computed from the input; the rest (parameters, constants) go where used
    data: set[fx.Node] = {inputs[0]}
    for n in nodes:
        if n.op not in ("placeholder", "output", "get_attr") and any(a in data for a in n.all_input_nodes):
            data.add(n)
    order = [n for n in nodes if n in data]
    pos = {n: i for i, n in enumerate(order)}
    pos[output] = len(order)
    # last data position that reads each data node's value
    last_use = {n: max((pos.get(u, -1) for u in n.users), default=pos[n]) for n in order}
    # parameters: first and last data position that touches each one (through get_attr or a module)
    first_p: dict[int, int] = {}
    last_p: dict[int, int] = {}
    for n in order:
        ids = set(_touched(gm, n))
        for a in n.all_input_nodes:
            if a.op == "get_attr" or (a not in data and a.op != "placeholder"):
                ids |= _constant_ids(gm, a, data)
        for t in ids:
            first_p.setdefault(t, pos[n])
            last_p[t] = pos[n]
    cuts = []
    live: set[fx.Node] = set()
    for i, n in enumerate(order[:-1]):
        live.add(n)
        live = {m for m in live if last_use[m] > i}
        if i == 0 or live != {n} or n is result or not _tensor_output(n):
            continue
        if any(first_p[t] <= i < last_p[t] for t in first_p):
            continue  # a weight shared across the cut would reach the host in the plain BackNet
        cuts.append(n)
    return order, cuts, result


def _constant_ids(gm: fx.GraphModule, node: fx.Node, data: set) -> set[int]:
    ids = set(_touched(gm, node))
    for a in node.all_input_nodes:
        if a not in data:
            ids |= _constant_ids(gm, a, data)
    return ids


def _stage(gm: fx.GraphModule, body: list[fx.Node], source: fx.Node, result: fx.Node, data: set) -> fx.GraphModule:
    """A graph module computing `result` from `source` with the data nodes `body`."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: g.placeholder("x")}

    def bring(n: fx.Node) -> fx.Node:
        if n not in env:  # a constant (get_attr or computed from constants): copied into this stage
            for a in n.all_input_nodes:
                bring(a)
            env[n] = g.node_copy(n, lambda a: env[a])
        return env[n]

    for n in body:
        for a in n.all_input_nodes:
            if a not in data:
                bring(a)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[result])
    g.lint()
    return fx.GraphModule(gm, g, class_name="Stage")


@torch.no_grad()
def graph_model(model: nn.Module, input_shape: tuple[int, ...], num_classes: int = 0) -> LayeredModel:
    """Trace `model` and return it as a `LayeredModel` whose layers are the graph's stages.

    Deterministic: the same model code and torch version give the same stages, names and
    parameter names (what the enclave relies on to rebuild a FrontNet from an allowed factory).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm, how = trace(model, tuple(input_shape))
    try:
        ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    except Exception as e:
        raise PartitionError(f"{type(model).__name__}: the traced graph fails on an input of shape "
                             f"{'x'.join(map(str, input_shape))} ({_first_line(e)})") from None
    order, cuts, result = _cut_points(gm)
    if not cuts:
        raise PartitionError(f"{type(model).__name__}: no place in its graph where exactly one tensor crosses "
                             "(a whole-model skip connection?); give it as an nn.Sequential of blocks")
    data = set(order)
    pos = {n: i for i, n in enumerate(order)}
    stages: list[tuple[str, nn.Module]] = []
    used: dict[str, int] = {}
    bounds = [order[0], *cuts, result]
    for j in range(len(bounds) - 1):
        src, dst = bounds[j], bounds[j + 1]
        body = order[pos[src] + 1: pos[dst] + 1]
        following = order[pos[dst] + 1] if pos[dst] + 1 < len(order) else None
        name = re.sub(r"[./]", "_", _stage_name(dst, following)) or dst.name  # onnx2torch paths hold '/'
        if name in used:  # the same module called twice (e.g. one shared ReLU)
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        stages.append((name, _stage(gm, body, src, dst, data)))
    layered = LayeredModel(stages, tuple(input_shape), num_classes)
    layered.traced_with = how
    return layered.eval()


def as_layered(built, input_shape: tuple[int, ...], num_classes: int = 0) -> LayeredModel:
    """A `LayeredModel` from what a factory returned: itself, an `nn.Sequential` or list of blocks
    (today's points: one per child), or any other `nn.Module` (points from its graph)."""
    if isinstance(built, LayeredModel):
        return built
    if isinstance(built, nn.Sequential) or (isinstance(built, (list, tuple)) and built
                                            and all(isinstance(m, nn.Module) for m in built)):
        return LayeredModel.from_sequential(built, tuple(input_shape), num_classes)
    if isinstance(built, nn.Module):
        return graph_model(built, tuple(input_shape), num_classes)
    raise PartitionError(f"expected an nn.Module, got {type(built).__name__}")


__all__ = ["graph_model", "as_layered", "trace"]
