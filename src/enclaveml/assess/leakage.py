"""The leakage-test interface and its registry (owner side, assessment).

Each privacy test (the paper's KL test, decoder inversion, white-box rMLE) is one class in one
file that implements `LeakageTest.evaluate` and registers itself by name with `@register`, the
way Flower's aggregation strategies plug in: a new attack is a new file, not an `if` in the runner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..data.preprocess import Preprocessing
from ..errors import UserInputError
from ..models.layers import FrontNet, LayeredModel, PartitionPoint
from .config import AssessConfig
from .forward import PointForward


@dataclass
class AssessContext:
    """What every test may use, computed once per assessment."""

    model: LayeredModel  # the whole model: the KL test's oracle, the white-box attacker's view
    pre: Preprocessing
    x_test: torch.Tensor  # test samples as [0, 1] pixels (N, 3, H, W)
    x_train: torch.Tensor  # the attacker's held-out same-distribution pixels (M, 3, H, W)
    probs_test: torch.Tensor  # F(x) = softmax of the whole model on x_test (N, K)
    config: AssessConfig
    # one pass of the model -> IRs at every assessed point (assess/forward.py); None: tests use PointData's IRs
    forward: "PointForward | None" = None
    # the oracle the KL test queries: an inference copy of `model` (assess/inference.py); None: `model`
    oracle: "torch.nn.Module | None" = None
    # the cores the tests' items spread over (0: torch's thread count when asked); fixed for the run, so
    # batch sizes and point sets do not depend on the thread count of the moment (assess/threads.py)
    workers: int = 0

    def cores(self) -> int:
        return self.workers if self.workers > 0 else max(1, torch.get_num_threads())


@dataclass
class PointData:
    """One candidate partition point with the IRs the host would see there."""

    point: PartitionPoint
    front: FrontNet
    ir_test: torch.Tensor  # IR of x_test (N, *out_shape)
    ir_train: torch.Tensor | None = None  # IR of x_train (M, *out_shape) when stored; the runner streams it instead


@dataclass
class LeakageResult:
    """A test's finding at one point: a JSON-ready summary and pictures for the report."""

    summary: dict
    # images in [0, 1] for the HTML report: name -> (n, C, H, W) with C in {1, 3}
    images: dict[str, torch.Tensor] = field(default_factory=dict)


class LeakageTest(ABC):
    """One privacy test, evaluated independently at each partition point."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "kl" (the paper's oracle test) or "inversion" (reconstruction attack)
    # order in the shared pool of cores when the tests run at once (lower first, assess/threads.py)
    pool_priority: ClassVar[int] = 0

    def __init__(self, config: AssessConfig):
        self.config = config

    def prepare(self, ctx: AssessContext, points: list[PointData]) -> None:
        """Work shared by all points, done once before `evaluate` (e.g. training every decoder together)."""

    @abstractmethod
    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        """Measure the leakage of `pt`'s IR; must not modify the model."""


TESTS: dict[str, type[LeakageTest]] = {}


def register(cls: type[LeakageTest]) -> type[LeakageTest]:
    """Class decorator: make a test available by its `name`."""
    TESTS[cls.name] = cls
    return cls


def get(name: str) -> type[LeakageTest]:
    _load_builtin()
    try:
        return TESTS[name]
    except KeyError:
        raise UserInputError(f"unknown leakage test {name!r}; known: {', '.join(sorted(TESTS))}") from None


def _load_builtin() -> None:
    """Import the built-in tests so their `@register` runs."""
    from . import decoder, kl, rmle  # noqa: F401
