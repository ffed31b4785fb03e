"""Turn what a PyTorch user holds into the library's model view (owner side).

A model argument is a zoo name (`"darknet"`), a `"package.module:factory"` spec (with
`weights=`), or an `nn.Module`: a `LayeredModel`, an `nn.Sequential` (its children are the
layers) or a list of blocks. Strings go through `models.loading.load_model`, exactly as the CLI's
MODEL argument does. A module object carries no recipe an enclave could rebuild it from, so a
bundle of one needs `factory="pkg.mod:fn"` (or the tag `load_model` puts on zoo models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from ..errors import UserInputError

if TYPE_CHECKING:
    from torch import nn

    from ..data.preprocess import Preprocessing
    from ..models.layers import LayeredModel

#: What `assess` and `partition` accept as a model.
ModelLike = Union[str, "os.PathLike[str]", "nn.Module", Sequence["nn.Module"]]

#: Attribute `load_model` sets on the models it returns: the bundle `arch` that rebuilds them.
ARCH_ATTR = "enclaveml_arch"


@dataclass
class ResolvedModel:
    """A model ready for the library: layers, preprocessing, class names, name and recipe."""

    model: "LayeredModel"
    preprocessing: "Preprocessing"
    classes: list[str] | None
    name: str  # what assessment.json's "model" and the manifest call it
    arch: dict | None  # {"zoo": name} or {"factory": spec}: how an enclave rebuilds it; None: unknown


def load_model(model: str, *, weights: "str | os.PathLike[str] | None" = None, pretrained: bool = True) -> "LayeredModel":
    """A zoo model (trained weights unless `pretrained=False`) or a user factory's model, in eval mode.

    The result is an ordinary `nn.Module`; it remembers its recipe so that `partition` can name it.
    """
    from ..models.loading import load_model as _load

    m, _, _ = _load(str(model), str(weights) if weights else None, pretrained=pretrained)
    object.__setattr__(m, ARCH_ATTR, spec_arch(str(model)))
    return m


def spec_arch(text: str) -> dict:
    """The manifest `arch` of a model named by text: the one model specification (`models/spec.py`)."""
    from ..models.spec import ModelSpec

    if text.lower().endswith(".onnx"):
        return {"factory": text}
    return ModelSpec.parse(text).arch


def model_name(model: Any, name: str | None = None) -> str:
    """The name a model goes by (cheap: builds nothing)."""
    if name is not None:
        return str(name)
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    arch = getattr(model, ARCH_ATTR, None)
    if isinstance(arch, Mapping):
        return str(arch.get("zoo") or arch.get("factory"))
    return type(model).__name__


def _preprocessing(model: Any, size: tuple[int, int], preprocessing: Any, mean, std, resize: bool) -> "Preprocessing":
    from ..data.preprocess import Preprocessing

    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise UserInputError("mean= and std= go together, three values each (e.g. 0.485, 0.456, 0.406)")
        preprocessing = {"mean": mean, "std": std}
    if preprocessing is None:
        preprocessing = getattr(model, "preprocessing", None)
    if preprocessing is None:
        mean_, std_ = (0.0,) * 3, (1.0,) * 3
    elif isinstance(preprocessing, Preprocessing):
        mean_, std_ = tuple(preprocessing.mean), tuple(preprocessing.std)
    elif isinstance(preprocessing, Mapping) and "mean" in preprocessing and "std" in preprocessing:
        mean_, std_ = tuple(preprocessing["mean"]), tuple(preprocessing["std"])
    else:
        raise UserInputError("preprocessing= must be a Preprocessing or a dict with 'mean' and 'std'")
    return Preprocessing(size=size, mean=tuple(float(v) for v in mean_), std=tuple(float(v) for v in std_),
                         resize=resize)


def _from_module(model: Any, input_shape: Sequence[int] | None, classes, preprocessing, mean, std,
                 resize: bool) -> tuple["LayeredModel", "Preprocessing", list[str] | None]:
    import torch
    from torch import nn

    from ..models.layers import LayeredModel

    shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
    if isinstance(model, LayeredModel):
        layered = model
        shape = shape or tuple(model.input_shape)
    elif isinstance(model, nn.Sequential) or (isinstance(model, (list, tuple)) and model
                                              and all(isinstance(m, nn.Module) for m in model)):
        shape = shape or (tuple(getattr(model, "input_shape", ())) or None)
        if shape is None:
            raise UserInputError("give input_shape=(C, H, W): the model does not say what it takes")
        layered = LayeredModel.from_sequential(model, shape, num_classes=0)
    elif isinstance(model, nn.Module):
        raise UserInputError(f"a {type(model).__name__} is not a sequence of layers: pass an nn.Sequential "
                             "(or a LayeredModel, or a list of blocks) so that every boundary is a partition point")
    else:
        raise UserInputError(f"model must be a zoo name, a 'module:factory' spec or an nn.Module, "
                             f"not {type(model).__name__}")
    if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
        raise UserInputError(f"input_shape {shape}: expected (3, H, W)")
    from ..models.loading import probe_classes

    num_classes = probe_classes(layered, shape)
    layered.input_shape = shape
    layered.num_classes = num_classes
    names = classes if classes is not None else getattr(model, "classes", None)
    pre = _preprocessing(model, (shape[1], shape[2]), preprocessing, mean, std, resize)
    return layered, pre, (list(names) if names is not None else None)


def resolve_model(model: ModelLike, *, name: str | None = None, weights: "str | os.PathLike[str] | None" = None,
                  input_shape: Sequence[int] | None = None, classes: Sequence[str] | None = None,
                  preprocessing: Any = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  resize: bool = False, pretrained: bool = True, factory: str | None = None) -> ResolvedModel:
    """Whatever the caller passed, as a `ResolvedModel` (one `UserInputError` line if unusable)."""
    if isinstance(model, (str, os.PathLike)):
        from ..models.loading import load_model as _load

        spec = os.fspath(model)
        size = "x".join(str(int(v)) for v in input_shape) if input_shape is not None else None
        m, pre, names = _load(spec, str(weights) if weights else None, size, mean, std, resize=resize,
                              pretrained=pretrained)
        if preprocessing is not None:
            pre = _preprocessing(None, pre.size, preprocessing, None, None, resize)
        if factory is not None:
            raise UserInputError("factory= goes with a model object; a zoo name or 'module:factory' spec names itself")
        arch = spec_arch(spec)
        return ResolvedModel(m, pre, list(classes) if classes is not None else names, name or spec, arch)
    if weights is not None:
        raise UserInputError("weights= goes with a zoo name or a 'module:factory' spec; load an nn.Module's "
                             "weights yourself (model.load_state_dict)")
    m, pre, names = _from_module(model, input_shape, classes, preprocessing, mean, std, resize)
    tag = getattr(model, ARCH_ATTR, None)
    arch = {"factory": factory} if factory is not None else (dict(tag) if isinstance(tag, Mapping) else None)
    if isinstance(tag, Mapping) and "zoo" in tag and names is None and preprocessing is None and mean is None:
        from ..models import zoo

        e = zoo.entry(tag["zoo"])  # a zoo model object: its own classes and normalisation
        names, pre = list(e.classes), type(pre)(size=pre.size, mean=e.preprocessing.mean, std=e.preprocessing.std,
                                                resize=resize)
    return ResolvedModel(m, pre, names, model_name(model, name), arch)
