"""The one partition of a model into FrontNet, BackNet and optional head, for bundles and CalTrain.

Trust side: owner (`partition`, the CalTrain release), enclave and host (rebuilding their halves,
CalTrain's FrontNet/BackNet training split). Pure model maths, no I/O.

    layers[0:k]             FrontNet   enclave
    layers[k:n-head]        BackNet    host (its classifier rows in the secret class order)
    layers[n-head:n]        head       enclave, only with head > 0 (the host never sees class scores)

`check_split` is the rule both systems apply: 1 <= k, k + head < n (the host keeps a layer), the
classifier (`head.find_classifier`: the last Linear or 1x1 conv, followed only by ops that treat
the classes alike) is not in the FrontNet, and a head holds it. `permute_classifier` moves the
classifier's rows into the secret order of a `ClassMapping` (and back with `inverse=True`); the
parts share the model's parameters, so permuting the model permutes whichever part holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PartitionError
from .classmap import ClassMapping
from .head import Classifier, find_classifier
from .layers import BackNet, FrontNet, LayeredModel


@dataclass(frozen=True)
class ModelParts:
    """The three parts of a partitioned model (they share the parameters with the model)."""

    front: FrontNet
    back: BackNet
    head: "nn.Sequential | None" = None


def check_split(model: LayeredModel, k: int, head: int = 0) -> Classifier:
    """The classifier of `model` if (k, head) is a valid split; `PartitionError` saying why not."""
    model.check_point(k)
    n = len(model)
    if type(head) is not int or head < 0 or k + head >= n:
        raise PartitionError(f"--head {head} is out of range with k={k}: it leaves no BackNet layer for the host "
                             f"(this model has {n} layers: need k + head < {n}, so head 0..{n - k - 1})")
    cls = find_classifier(model)
    if cls.layer < k:
        raise PartitionError(f"partition point {k} puts the classifier ({model.names[cls.layer]}) in the FrontNet: "
                             f"the host would see the class scores in their true order; choose k <= {cls.layer}")
    if head and cls.layer < n - head:
        raise PartitionError(f"--head {head} leaves the classifier ({model.names[cls.layer]}) on the host: the "
                             f"head must hold it (--head {n - cls.layer} or more)")
    return cls


def split_model(model: LayeredModel, k: int, head: int = 0) -> ModelParts:
    """FrontNet layers[:k], BackNet layers[k:n-head], head layers[n-head:] (None when head = 0).

    Only the range of k and head is checked here (a rebuilt manifest's split is trusted to the
    manifest's checks); a new split goes through `check_split` first.
    """
    model.check_point(k)
    n = len(model)
    if type(head) is not int or head < 0 or k + head >= n:
        raise PartitionError(f"--head {head} is out of range with k={k}: it leaves no BackNet layer for the host")
    items = list(model.layers.named_children())
    front = FrontNet(OrderedDict(items[:k]), k)
    back = BackNet(OrderedDict(items[k:n - head]), k)
    return ModelParts(front, back, nn.Sequential(OrderedDict(items[n - head:])) if head else None)


def permute_classifier(model: LayeredModel, mapping: ClassMapping, inverse: bool = False) -> None:
    """Put the classifier's rows (in place) into the mapping's secret order, or back with `inverse`."""
    cls = find_classifier(model)
    tensors = {**dict(model.layers.named_parameters()), **dict(model.layers.named_buffers())}
    with torch.no_grad():
        for key in cls.keys:
            t = tensors[key]
            if t.shape[0] != mapping.num_classes:
                raise PartitionError(f"the classifier {key} has {t.shape[0]} rows, the class mapping "
                                     f"{mapping.num_classes} classes")
            t.copy_(mapping.unpermute_rows(t) if inverse else mapping.permute_rows(t))


__all__ = ["ModelParts", "check_split", "split_model", "permute_classifier"]
