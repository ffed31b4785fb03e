"""Label-leakage defences: what the enclave does to a gradient before it leaves for the host.

Trust side: enclave. Pure tensor functions, no I/O. The gradient that the enclave hands the host
(dL/dscores, or dL/dfeatures at the cut layer when the head runs in the enclave, `train run
--head N`) carries each instance's label: a host that colludes with one participant names the
classes from that participant's instances and reads everyone else's labels (docs/caltrain.md,
"What the host learns about labels"; `benchmarks/bench_label_leakage.py` measures it). A defence
maps the batch's gradient rows (and the labels, which only the enclave has) to the rows the
host receives. Each is registered by name and parsed from `NAME[:key=value,...]`:

    none              the gradient as it is
    noise:scale=S     class-targeted Gaussian noise (after Marvell, Li et al., ICLR 2022): per row,
                      S x N(0, 1) along each of the batch's class-mean directions (mu_c - mean of
                      the mu), the directions that separate the classes; zero mean (unbiased) and
                      centred over the batch (the batch sum is kept exactly); `classwise=1`
                      centres it within each class of the batch instead (each class sum kept)
    mix:group=M       gradient mixing: a random partition of the batch into groups of M rows, each
                      row replaced by its group's mean (the batch sum is kept; each row is biased
                      towards its group)
    labelfree         no label reaches the host: every row receives the batch's mean gradient (one
                      vector for the whole batch: rows cannot be told apart, so no per-instance
                      label can be read from them); the FrontNet learns from a local classifier
                      in the enclave (below), not from the host's dL/dIR
    selfsup:weight=W,views=V   `labelfree`'s rows, and the host trains its layers with a label-free
                      self-supervised loss of its own inputs and outputs (`selfsup.py`: VICReg
                      between the IR's output and a second view's, `views=1`: variance and
                      covariance only), weighted by W (default 0.01, views 2)

`local=1` (noise, mix; always on for labelfree): the FrontNet is trained by a local auxiliary
classifier on the IR inside the enclave (decoupled greedy learning, Belilovsky et al., ICML 2020)
instead of by the dL/dIR the host returns, so the defended gradient no longer reaches it; the
host's reply is still checked and otherwise ignored (`local_classifier`).

Which layers the host holds matters more than the defence: `labelfree` with a thin host (`train run
--split 8 --head 3` on darknet: the host runs one conv layer, 24% of the work, between a FrontNet
and a head the enclave trains) takes the gradient channel to chance at 1.4 points of accuracy,
where at k=5 / head 1 it costs 26 (docs/caltrain.md, "Third round").

The randomness must be secret: a host that could redraw the noise would subtract it. The enclave
seeds it from its keyed run seed and the step (`step_generator`), so a rerun or a resumed run is
bit-for-bit the same training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserInputError

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_SETTING = re.compile(r"^([a-z_]{1,20})=([0-9]{1,6}(?:\.[0-9]{1,6})?)$")


@dataclass(frozen=True)
class _Kind:
    fn: Callable[..., torch.Tensor]
    settings: dict[str, tuple[float, float, type]]  # name -> (low, high, int or float)
    defaults: dict[str, float]


def class_noise(grad: torch.Tensor, labels: torch.Tensor, scale: float, gen: torch.Generator,
                classwise: int = 0, local: int = 0) -> torch.Tensor:
    """Rows + scale x N(0,1) along each class-mean direction of the batch, centred over the batch.

    Unbiased (E[noise] = 0), keeps the batch sum exactly, and puts all its power where a label
    attack looks: the directions mu_c - mean(mu) between the rows' class means (with one class in
    the batch, mu_c itself).
    """
    g = grad.reshape(grad.shape[0], -1)
    classes = torch.unique(labels)
    means = torch.stack([g[labels == c].mean(0) for c in classes])
    dirs = means - means.mean(0, keepdim=True) if len(classes) > 1 else means
    xi = torch.randn((g.shape[0], dirs.shape[0]), generator=gen, dtype=torch.float64)
    noise = scale * (xi @ dirs.double())
    if classwise:  # centred within each class of the batch: every class's sum is kept too, except
        for c in classes:  # a class of 1 or 2 rows, where centring would cancel or pair the noise
            m = labels == c
            if int(m.sum()) >= 3:
                noise[m] -= noise[m].mean(0, keepdim=True)
    else:
        noise -= noise.mean(0, keepdim=True)
    return (g.double() + noise).to(grad.dtype).reshape(grad.shape)


def group_mix(grad: torch.Tensor, labels: torch.Tensor, group: int, gen: torch.Generator,
              local: int = 0) -> torch.Tensor:
    """Each row replaced by the mean of its random group of `group` rows (the last group may be
    smaller, never a single row: that one joins the group before it); the batch sum is kept.
    `labels` is unused: mixing does not need them."""
    del labels, local
    n = grad.shape[0]
    g = grad.reshape(n, -1)
    order = torch.randperm(n, generator=gen)
    out = torch.empty_like(g)
    starts = list(range(0, n, group))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()  # a lone last row would leave the enclave as it is
    for i, start in enumerate(starts):
        idx = order[start:starts[i + 1] if i + 1 < len(starts) else n]
        out[idx] = g[idx].double().mean(0).to(g.dtype)
    return out.reshape(grad.shape)


def batch_mean(grad: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, local: int = 1) -> torch.Tensor:
    """Every row replaced by the batch's mean row: the batch sum is kept and the rows are equal, so
    the host's rows carry no per-instance label (only the batch's class mix, through the mean)."""
    del labels, gen, local
    g = grad.reshape(grad.shape[0], -1)
    return g.double().mean(0, keepdim=True).expand_as(g).to(g.dtype).reshape(grad.shape).clone()


def self_supervised_rows(grad: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, local: int = 1,
                         weight: float = 1.0, views: int = 2) -> torch.Tensor:
    """`selfsup`'s rows: `labelfree`'s (the batch mean); the host's layers learn from their own
    label-free objective (`selfsup.HostObjective`), which runs on the host."""
    del weight, views
    return batch_mean(grad, labels, gen, local)


def local_classifier(ir_shape: "tuple[int, ...]", classes: int, gen: torch.Generator) -> torch.nn.Module:
    """The enclave's auxiliary classifier that trains the FrontNet under `local=1`: the IR pooled
    to 2x2 (a feature vector as is), then one Linear layer (DGL's simplest auxiliary problem).
    Initialised from the enclave's secret generator: the host never learns it."""
    from torch import nn

    if len(ir_shape) == 3:
        body: list[nn.Module] = [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        width = int(ir_shape[0]) * 4
    elif len(ir_shape) == 1:
        body, width = [], int(ir_shape[0])
    else:
        raise UserInputError(f"a local classifier needs an IR of shape (C,H,W) or (D,), not {tuple(ir_shape)}")
    fc = nn.Linear(width, classes)
    bound = 1.0 / width ** 0.5
    with torch.no_grad():
        fc.weight.copy_(torch.rand(fc.weight.shape, generator=gen) * 2 * bound - bound)
        fc.bias.copy_(torch.rand(fc.bias.shape, generator=gen) * 2 * bound - bound)
    return nn.Sequential(*body, fc)


def _none(grad: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return grad


DEFENCES: dict[str, _Kind] = {
    "none": _Kind(_none, {}, {}),
    "noise": _Kind(class_noise, {"scale": (0.0, 100.0, float), "classwise": (0, 1, int), "local": (0, 1, int)},
                   {"scale": 2.0, "classwise": 0}),  # a setting without a default (local) is in `to_dict` only when given
    "mix": _Kind(group_mix, {"group": (2, 4096, int), "local": (0, 1, int)}, {"group": 4}),
    "labelfree": _Kind(batch_mean, {"local": (1, 1, int)}, {"local": 1}),
    "selfsup": _Kind(self_supervised_rows, {"local": (1, 1, int), "weight": (0.0, 100.0, float), "views": (1, 2, int)},
                     {"local": 1, "weight": 0.01, "views": 2}),
}


@dataclass(frozen=True)
class DefenceSpec:
    """A named defence and its settings, as the owner's start command (and a plan) carries it."""

    name: str = "none"
    settings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = DEFENCES.get(self.name)
        if kind is None:
            raise UserInputError(f"unknown defence {self.name!r}; known: {', '.join(DEFENCES)}")
        full = dict(kind.defaults)
        for key, value in dict(self.settings).items():
            if key not in kind.settings:
                raise UserInputError(f"defence {self.name!r} has no setting {key!r}"
                                     + (f"; it takes {', '.join(kind.settings)}" if kind.settings else ""))
            low, high, typ = kind.settings[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserInputError(f"defence setting {key!r} must be a number")
            if typ is int and float(value) != int(value):
                raise UserInputError(f"defence setting {key!r} must be an integer")
            ok = low < value <= high if typ is float else low <= value <= high
            if not ok:
                span = f"({low:g}, {high:g}]" if typ is float else f"{low}..{high}"
                raise UserInputError(f"defence setting {key}={value} is out of range {span}")
            full[key] = typ(value)
        object.__setattr__(self, "settings", full)

    @classmethod
    def parse(cls, text: "str | None") -> "DefenceSpec":
        """`NAME[:key=value,...]`, e.g. `noise:scale=2` or `mix:group=8`; None or "" is `none`."""
        text = (text or "none").strip()
        name, _, rest = text.partition(":")
        if not _NAME.match(name):
            raise UserInputError(f"defence {text!r}: expected NAME[:key=value,...]")
        settings: dict[str, float] = {}
        for part in filter(None, rest.split(",")):
            m = _SETTING.match(part.strip())
            if not m:
                raise UserInputError(f"defence setting {part!r}: expected key=number")
            settings[m.group(1)] = float(m.group(2))
        return cls(name, settings)

    @classmethod
    def from_dict(cls, d: "dict | None") -> "DefenceSpec":
        """{"name": str, "settings": {...}} (the start command's and plan's form); None is `none`."""
        if d is None:
            return cls()
        if not isinstance(d, dict) or not isinstance(d.get("name", "none"), str) \
                or not isinstance(d.get("settings", {}), dict):
            raise UserInputError('a defence must be {"name": str, "settings": {key: number}}')
        return cls(d.get("name", "none"), dict(d.get("settings", {})))

    def to_dict(self) -> dict:
        return {"name": self.name, "settings": dict(sorted(self.settings.items()))}

    @property
    def text(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v:g}" for k, v in sorted(self.settings.items()))
                            if self.settings else "")

    @property
    def local_front(self) -> bool:
        """Whether the FrontNet learns from the enclave's local classifier, not the host's dL/dIR."""
        return bool(self.settings.get("local", 0))

    def host_objective(self):
        """The label-free loss the host adds to its own training (`selfsup`), else None."""
        if self.name != "selfsup":
            return None
        from .selfsup import HostObjective

        return HostObjective(weight=float(self.settings["weight"]), views=int(self.settings["views"]))

    def apply(self, grad: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The rows the host receives in place of `grad` (one row per instance)."""
        if grad.shape[0] != labels.shape[0]:
            raise UserInputError("a defence needs one label per gradient row")
        return DEFENCES[self.name].fn(grad, labels, gen=gen, **self.settings)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The defence's randomness at one step: a pure function of a secret seed and the step."""
    return torch.Generator().manual_seed((int(seed) * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407
                                          * (int(step) + 1)) % (2 ** 63))
