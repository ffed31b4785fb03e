"""Load the model to assess: a zoo name, or the user's own `module:factory` plus weights (owner side).

A user's factory may return a `LayeredModel`, an `nn.Sequential` (its child names become layer
names), a list of blocks, or any other `nn.Module` (its partition points come from its traced
graph, `models/graph.py`; its weights load under its own parameter names before the cut). Weights come from `.safetensors` or a `.pt`/`.pth` state dict read
with `torch.load(weights_only=True)` (no pickled code runs). Preprocessing comes from --mean/--std,
else from a `preprocessing` attribute (a `Preprocessing` or a dict) on the factory's module or
the returned model, else raw [0, 1] pixels. Every failure is one `UserInputError` line.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import UnknownModel, UserInputError
from .graph import graph_model
from .layers import LayeredModel


def parse_input_size(text: str) -> tuple[int, int, int]:
    """'3x224x224' -> (3, 224, 224)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*[xX,]\s*(\d+)\s*", text or "")
    if not m:
        raise UserInputError(f"--input-size {text!r}: expected CxHxW, e.g. 3x224x224")
    shape = tuple(int(g) for g in m.groups())
    if min(shape) < 1 or shape[0] != 3:
        raise UserInputError(f"--input-size {text!r}: expected 3 colour channels and positive sizes")
    return shape  # type: ignore[return-value]


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    """`--mean`/`--std` style comma-separated numbers (None stays None)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _import_factory(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UnknownModel(f"{spec!r}: a user model is given as module:factory, e.g. mypkg.nets:build")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UnknownModel(f"{spec!r}: cannot import module {mod_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UnknownModel(f"{spec!r}: module {mod_name!r} has no callable {attr!r}")
    return module, factory


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a plain .pt/.pth state dict (weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"--weights {p}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: one line, not a traceback
        raise UserInputError(f"--weights {p}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"--weights {p}: not a state dict of tensors")
    return state


def load_weights(model: LayeredModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a LayeredModel's own keys ('layers.x...') or a plain Sequential's keys ('x...')."""
    target: nn.Module = model if any(k.startswith("layers.") for k in state) else model.layers
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2]
        raise UserInputError(f"--weights {source} does not fit the model: {first[0] if first else e}"[:300]) from None


def _load_module_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2]
        raise UserInputError(f"--weights {source} does not fit the model: {first[0] if first else e}"[:300]) from None


def _preprocessing_from(obj, size: tuple[int, int]) -> Preprocessing | None:
    pre = getattr(obj, "preprocessing", None)
    if pre is None:
        return None
    if isinstance(pre, Preprocessing):
        return Preprocessing(size=size, mean=tuple(pre.mean), std=tuple(pre.std))
    if isinstance(pre, dict):
        return Preprocessing(size=size, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    raise UserInputError(f"{obj!r}.preprocessing: expected a Preprocessing or a dict with mean and std")


def load_user_model(spec: str, weights: str | None = None, input_size: str | Sequence[int] | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    resize: bool = False) -> tuple[LayeredModel, Preprocessing, list[str] | None]:
    """`module:factory` (+ weights) -> (LayeredModel in eval mode, its Preprocessing, class names or None).

    `spec` is a model specification (`models/spec.py`): `module:factory`, optionally with integer
    options `module:factory:width=16` passed to the factory as keyword arguments."""
    from .spec import ModelSpec

    parsed = ModelSpec.parse(spec)
    if not parsed.is_factory:
        raise UnknownModel(f"{spec!r}: a user model is given as module:factory, e.g. mypkg.nets:build")
    spec = parsed.target
    module, factory = _import_factory(spec)
    try:
        built = factory(**parsed.options)
    except Exception as e:
        raise UserInputError(f"{spec}: the factory failed ({type(e).__name__}: {e})"[:300]) from None
    if isinstance(input_size, str):
        shape = parse_input_size(input_size)
    elif input_size is not None:
        shape = tuple(int(v) for v in input_size)
    elif isinstance(built, LayeredModel):
        shape = built.input_shape
    else:
        shape = getattr(built, "input_shape", None) or getattr(module, "input_shape", None)
        if shape is None:
            raise UserInputError(f"{spec}: pass --input-size CxHxW (the model does not say its input shape)")
        shape = tuple(shape)
    if isinstance(built, LayeredModel):
        model = built
        model.input_shape = tuple(shape)
    elif isinstance(built, nn.Sequential) or (isinstance(built, (list, tuple)) and all(isinstance(m, nn.Module) for m in built)):
        model = LayeredModel.from_sequential(built, shape, num_classes=0)
    elif isinstance(built, nn.Module):
        if weights:  # the user's own parameter names, before the graph is cut into stages
            _load_module_weights(built, read_state_dict(weights), weights)
            weights = None
        model = graph_model(built, tuple(shape))
    else:
        raise UserInputError(f"{spec}: the factory returned {type(built).__name__}; expected an nn.Module "
                             "(a LayeredModel, an nn.Sequential, a list of blocks or any model with a forward())")
    if weights:
        load_weights(model, read_state_dict(weights), weights)
    model.num_classes = probe_classes(model, shape, f"{spec}: ")
    size = (shape[1], shape[2])
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise UserInputError("--mean and --std go together, three values each (e.g. 0.485,0.456,0.406)")
        pre = Preprocessing(size=size, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    else:
        pre = _preprocessing_from(built, size) or _preprocessing_from(module, size) or Preprocessing(size=size, mean=(0.0,) * 3, std=(1.0,) * 3)
    pre = Preprocessing(size=pre.size, mean=pre.mean, std=pre.std, resize=resize)
    classes = getattr(built, "classes", None) or getattr(module, "classes", None)
    return model, pre, (list(classes) if classes is not None else None)


def load_onnx_model(path: str, input_size: str | Sequence[int] | None = None, mean=None, std=None,
                    resize: bool = False) -> tuple[LayeredModel, Preprocessing, list[str] | None]:
    """An .onnx file (converted by onnx2torch, cut from its graph) -> the same triple as `load_user_model`."""
    from .onnx_in import load_onnx

    module, stated = load_onnx(path)
    if isinstance(input_size, str):
        shape = parse_input_size(input_size)
    elif input_size is not None:
        shape = tuple(int(v) for v in input_size)
    elif stated is not None:
        shape = stated
    else:
        raise UserInputError(f"--onnx {path}: the file does not state its input size; pass --input-size CxHxW "
                             "or put input_size in a model.json beside it")
    if stated is not None and tuple(stated) != tuple(shape):
        raise UserInputError(f"--input-size {'x'.join(map(str, shape))}: {path} takes {'x'.join(map(str, stated))}")
    with torch.no_grad():
        try:
            out = module(torch.zeros(2, *shape))
        except Exception as e:
            raise UserInputError(f"--onnx {path}: the model fails on an input of shape {'x'.join(map(str, shape))} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if out.dim() != 2:
        raise UserInputError(f"--onnx {path}: the model's output has shape {tuple(out.shape)}; expected (batch, classes)")
    model = graph_model(module, tuple(shape), int(out.shape[1]))
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise UserInputError("--mean and --std go together, three values each (e.g. 0.485,0.456,0.406)")
        pre = Preprocessing(size=(shape[1], shape[2]), mean=tuple(mean), std=tuple(std), resize=resize)
    else:
        pre = Preprocessing(size=(shape[1], shape[2]), mean=(0.0,) * 3, std=(1.0,) * 3, resize=resize)
    return model, pre, None


def load_model(name: str, weights: str | None = None, input_size: str | None = None, mean=None, std=None,
               resize: bool = False, pretrained: bool = True,
               card: "str | Path | None" = None) -> tuple[LayeredModel, Preprocessing, list[str] | None]:
    """A zoo name, a `module:factory` spec or an .onnx file, with the same result shape either way.

    A user model's card (`card`, else a `model.json` beside the weights or the .onnx file; see
    `models/card.py`) fills in the input size, preprocessing and class names not given as flags.
    """
    if name.lower().endswith(".onnx") or (":" in name and "=" not in name.split(":")[1]):  # a factory (models/spec.py)
        from .card import find_card, read_card

        onnx_file = name if name.lower().endswith(".onnx") else None
        card_path = card or find_card(weights, onnx_file)
        c = read_card(card_path) if card_path else None
        if c is not None:
            input_size = input_size if input_size is not None else c.input_size_text
            if mean is None and std is None and c.mean is not None:
                mean, std = list(c.mean), list(c.std)
        if onnx_file is not None:
            if weights:
                raise UserInputError(f"--onnx {name}: the weights come from the .onnx file; drop --weights")
            m, pre, classes = load_onnx_model(name, input_size, mean, std, resize)
        else:
            m, pre, classes = load_user_model(name, weights, input_size, mean, std, resize)
        if c is not None and c.classes is not None:
            if len(c.classes) != m.num_classes:
                raise UserInputError(f"{c.path}: {len(c.classes)} class names for a model with {m.num_classes} outputs")
            classes = list(c.classes)
        return m, pre, classes
    from . import zoo
    from .spec import ModelSpec

    spec = ModelSpec.parse(name)  # a zoo name, with integer options as CalTrain names them (darknet:width=16)
    e = zoo.entry(spec.target)
    if spec.options:
        if pretrained and weights is None:
            raise UserInputError(f"zoo model {spec.text} has no trained weights (only {spec.target} with its default "
                                 "options has): pass --weights FILE, or --untrained")
        model = spec.build().eval()
    else:
        model = zoo.load(name, pretrained=pretrained and weights is None)
    if weights:
        load_weights(model, read_state_dict(weights), weights)
    if input_size is not None and parse_input_size(input_size) != tuple(model.input_shape):
        raise UserInputError(f"--input-size {input_size}: zoo model {name!r} takes {'x'.join(map(str, model.input_shape))}")
    p = e.preprocessing
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise UserInputError("--mean and --std go together, three values each")
        p = Preprocessing(size=p.size, mean=tuple(mean), std=tuple(std))
    return model, Preprocessing(size=p.size, mean=p.mean, std=p.std, resize=resize), list(spec.classes)


def probe_classes(model: torch.nn.Module, shape: "tuple[int, ...]", what: str = "") -> int:
    """Run `model` (put in eval mode) on one zero input of `shape` and return its number of
    classes; `UserInputError` (prefixed by `what`) when it fails or its output is not (batch, classes)."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except Exception as e:
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserInputError(f"{what}the model fails on an input of shape {'x'.join(map(str, shape))} "
                             f"({type(e).__name__}: {first})") from None
    if out.dim() != 2:
        raise UserInputError(f"{what}the model's output has shape {tuple(out.shape)}; expected (batch, classes)")
    return int(out.shape[1])
