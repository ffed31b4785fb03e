"""Models from ONNX (Keras/TensorFlow via tf2onnx, scikit-learn, other frameworks): owner side,
and the enclave/host rebuilding a bundle's architecture.

`load_onnx(path)` converts an .onnx file with onnx2torch into a torch.fx graph, which
`models/graph.py` cuts into partition points like any traced PyTorch model. The weights come
from the file's initializers.

A bundle cannot name the .onnx file as its architecture: the file holds every weight in the
clear, FrontNet's included. So `partition --onnx` writes an *architecture file* beside the
bundle, `BUNDLE.arch.onnx`: the same graph with every float initializer that becomes a model
parameter or buffer set to zero (the bundle's own parts carry the real values: sealed for the
FrontNet). The stripping is checked, not assumed: the stripped graph plus the model's state dict
must reproduce the model's outputs exactly, else partition refuses. The manifest's arch is
`{"factory": "enclaveml.models.onnx_in:architecture", "kwargs": {"path": ..., "sha256": ...}}`,
so a server must allow that factory (`serve --allow-factory enclaveml.models.onnx_in:architecture`)
and find the architecture file at that path; its SHA-256, in the signed manifest, pins its content.

onnx2torch imports torchvision for two detection ops (NMS, RoIAlign). Where torchvision is not
installed (a CPU-only torch has no matching torchvision build here), those two converters get a
stand-in that raises if a model uses them; every other op converts as usual.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

from ..errors import UserInputError

#: An architecture file is read before anything checks it; keep that bounded.
MAX_ONNX_BYTES = 1 << 31
FACTORY = "enclaveml.models.onnx_in:architecture"


def _onnx2torch():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserInputError("ONNX models need `pip install onnx==1.23.2 onnx2torch==1.5.15` "
                             "(or `pip install -e '.[onnx]'`)") from None
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build for another torch: only NMS/RoIAlign need it
        _torchvision_stand_in()
    try:
        import onnx2torch
    except ImportError:
        raise UserInputError("ONNX models need `pip install onnx2torch==1.5.15` (or `pip install -e '.[onnx]'`)") from None
    return onnx2torch


def _torchvision_stand_in() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]

    def missing(*_a, **_k):
        raise UserInputError("this ONNX model uses NMS or RoIAlign, which need torchvision")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = missing
    tv.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops


def _read(path: "str | Path") -> bytes:
    """A regular file's bytes, at most MAX_ONNX_BYTES (an uploaded manifest names this path:
    never a device or FIFO that would read forever)."""
    import stat

    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserInputError(f"{p}: not a regular file")
            data = f.read(MAX_ONNX_BYTES + 1)
    except OSError as e:
        raise UserInputError(f"--onnx {p}: cannot read ({e.strerror})") from None
    if len(data) > MAX_ONNX_BYTES:
        raise UserInputError(f"{p}: larger than {MAX_ONNX_BYTES >> 20} MiB")
    return data


def _parse(data: bytes, source: str):
    import onnx

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as e:
        raise UserInputError(f"--onnx {source}: not a valid ONNX model ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]})") from None
    return model


def _inline_identity_initializers(model) -> None:
    """Exporters share equal tensors through Identity nodes; onnx2torch wants plain initializers."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
            model.graph.initializer.append(copy)
            inits[node.output[0]] = copy
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def input_shape_of(model) -> tuple[int, ...] | None:
    """(C, H, W) of the graph's one image input when the file states it, else None."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserInputError(f"the ONNX model has {len(inputs)} inputs; a partitionable model takes one image batch")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or any(s is None or s < 1 for s in shape[1:]):
        return None
    return tuple(shape[1:])


def _convert(model, source: str) -> nn.Module:
    o2t = _onnx2torch()
    _inline_identity_initializers(model)
    try:
        gm = o2t.convert(model)
    except UserInputError:
        raise
    except Exception as e:  # an op onnx2torch has no converter for, mostly
        raise UserInputError(f"--onnx {source}: onnx2torch cannot convert it ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
    return gm.eval()


def load_onnx(path: "str | Path") -> tuple[nn.Module, tuple[int, ...] | None]:
    """(the model as a torch.fx GraphModule with its weights, input shape (C, H, W) if stated)."""
    data = _read(path)
    model = _parse(data, str(path))
    return _convert(model, str(path)), input_shape_of(model)


def strip_weights(path: "str | Path", model) -> bytes:
    """The ONNX file with every float initializer that `model` (the `LayeredModel` cut from it)
    holds as a parameter or buffer zeroed: a public architecture. Checked the way a server uses
    it: rebuilt, cut, loaded with `model`'s state dict, it must compute exactly what `model` does."""
    import numpy as np
    from onnx import numpy_helper

    from .graph import graph_model

    onnx_model = _parse(_read(path), str(path))
    state = model.state_dict()
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for v in state.values():
        by_shape.setdefault(tuple(v.shape), []).append(v)
    for init in onnx_model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if not np.issubdtype(arr.dtype, np.floating):
            continue  # shapes, axes, indices: architecture
        t = torch.from_numpy(np.array(arr))
        if any(c.dtype == t.dtype and torch.equal(c, t) for c in by_shape.get(tuple(t.shape), [])):
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(arr), init.name))
    stripped = onnx_model.SerializeToString()
    shape = tuple(model.input_shape)
    rebuilt = graph_model(_convert(_parse(stripped, "architecture"), "architecture"), shape, model.num_classes)
    try:
        rebuilt.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserInputError("the weight-free ONNX graph does not rebuild with the same parameters; "
                             "it cannot be partitioned") from None
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if rebuilt.names != model.names or not torch.equal(rebuilt(x), model(x)):
            raise UserInputError("the ONNX graph uses its weights outside the model's parameters (a folded "
                                 "constant?); it cannot be split without publishing them")
    return stripped


def architecture(path: str, sha256: str) -> nn.Module:
    """Allowed factory (enclave and host): the stripped graph at `path`, if its SHA-256 matches
    the one in the signed manifest; its weights are zeros until the bundle's parts are loaded."""
    data = _read(path)
    if hashlib.sha256(data).hexdigest() != str(sha256).lower():
        raise UserInputError(f"{path}: not the architecture this bundle was made with (SHA-256 differs)")
    return _convert(_parse(data, path), path)
