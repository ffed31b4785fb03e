"""One partitioned training step: FrontNet in the enclave, BackNet on the host, loss in the enclave.

Trust side: `EnclaveTrainer` runs in the enclave, `HostTrainer` on the host; `PlainTrainer` is the
ordinary whole-model baseline. The two halves only exchange tensors, so the same objects run
in-process (tests, benchmarks) and across the enclave channel (the real system):

    enclave.forward(x_u8, y, step)  -> IR                     (enclave keeps x, y, the graph)
    host.forward(IR)                -> scores, secret order    (host keeps its graph)
    enclave.loss_grad(scores)       -> dL/dscores              (un-permute, softmax + loss)
    host.backward(dL/dscores)       -> dL/dIR                  (host SGD step on the BackNet)
    enclave.backward(dL/dIR)                                   (enclave SGD step on the FrontNet)

The host never sees labels, the loss or class names; its last layer's rows are in the order of
a secret permutation pi (column j of the scores is class pi[j]). It does see dL/dscores, which
gives away each row's (permuted) label column, and one colluding participant's known labels name
the columns. With a head in the enclave (`split_with_head`, `train run --head N`) the host runs
layers k..n-1-N and gets dL/dfeatures at the cut instead, which still clusters by class; a
defence (`defences.py`) perturbs it before it leaves (docs/caltrain.md, "What the host learns
about labels").

SGD is per parameter, so two optimisers over the two halves equal one over the whole model; the
learning rate is a pure function of the step, and batch order and augmentation come from
generators seeded by (seed, epoch, batch), so a resumed run redoes exactly what it would have done.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import TamperedMessage, UserInputError
from ..models.classmap import ClassMapping
from ..models.split import check_split, permute_classifier, split_model
from .augment import augment

if TYPE_CHECKING:
    from .defences import DefenceSpec


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters both sides agree on (the owner picks them; nothing here is secret)."""

    epochs: int = 4
    batch: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup: float = 0.2  # fraction of steps with a linear rise of the learning rate
    seed: int = 0
    augment: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def lr_at(self, step: int, total: int) -> float:
        """One-cycle-like schedule: linear warm-up, then linear decay to zero."""
        warm = max(1, int(self.warmup * total))
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * max(0.0, (total - step) / max(1, total - warm))

    def steps_per_epoch(self, n: int) -> int:
        return (n + self.batch - 1) // self.batch

    def epoch_order(self, n: int, epoch: int) -> torch.Tensor:
        """The shuffled instance order of one epoch (enclave side: the host never learns it)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g)

    def batch_generator(self, step: int) -> torch.Generator:
        """The augmentation randomness of one global step."""
        return torch.Generator().manual_seed(self.seed * 7_919 + 1_000_000 + step)

    def batches(self, n: int, start_step: int = 0):
        """Yield (global step, epoch, indices) from `start_step` to the end of training."""
        per = self.steps_per_epoch(n)
        for step in range(start_step, per * self.epochs):
            epoch, b = divmod(step, per)
            order = self.epoch_order(n, epoch)
            yield step, epoch, order[b * self.batch:(b + 1) * self.batch]


class _Half:
    """Common optimiser, schedule and state handling of both halves."""

    def __init__(self, module: nn.Module, cfg: TrainConfig, total_steps: int, device: str = "cpu"):
        self.module = module.to(device)
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.device = device
        self.step = 0
        self.opt = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                   weight_decay=cfg.weight_decay)

    def _apply_step(self) -> None:
        lr = self.cfg.lr_at(self.step, self.total_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1

    def state_bytes(self) -> bytes:
        """Weights, momentum buffers and the step as safetensors bytes (never a pickle)."""
        from safetensors.torch import save

        tensors = {f"w.{k}": v.detach().cpu().contiguous().clone() for k, v in self.module.state_dict().items()}
        for name, p in self.module.named_parameters():
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"m.{name}"] = buf.detach().cpu().contiguous().clone()
        return save(tensors, metadata={"step": str(self.step), "total_steps": str(self.total_steps)})

    def load_state_bytes(self, data: bytes) -> None:
        from safetensors.torch import load

        try:
            tensors = load(bytes(data))
        except Exception:
            raise TamperedMessage("checkpoint state is not a valid safetensors blob") from None
        meta = _safetensors_metadata(bytes(data))
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
        self.module.load_state_dict(weights)
        params = dict(self.module.named_parameters())
        for k, v in tensors.items():
            if k.startswith("m."):
                p = params[k[2:]]
                self.opt.state[p]["momentum_buffer"] = v.to(p.device)
        self.step = int(meta.get("step", "0"))


def _safetensors_metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}


class _FrontAndHead(nn.Module):
    """The enclave's parameters when the classifier head runs there too (one optimiser over both)."""

    def __init__(self, front: nn.Module, head: nn.Module):
        super().__init__()
        self.front, self.head = front, head


class _WithLocal(nn.Module):
    """The enclave's parameters with the local classifier that trains the FrontNet (`local=1`)."""

    def __init__(self, front: nn.Module, head: nn.Module | None, local: nn.Module):
        super().__init__()
        self.front, self.head, self.local = front, head, local


class EnclaveTrainer(_Half):
    """Enclave half: augment, normalise, FrontNet forward/backward, labels and loss.

    With `head` (the last layers of the model, `train run --head N`) the host's output is the
    cut-layer feature map, not the scores: the enclave runs the head and the loss on it and hands
    back dL/dfeatures. `defence` (`defences.DefenceSpec`) transforms the gradient before it leaves,
    with randomness from `defence_seed` and the step (secret: the enclave derives it from its key).
    A defence with a local FrontNet (`local=1`, `labelfree`) needs `ir_shape` (one instance's IR):
    the FrontNet then learns from a local classifier on the IR here, not from the host's dL/dIR.
    """

    def __init__(self, front: nn.Module, mapping: ClassMapping, pre: Preprocessing, cfg: TrainConfig,
                 total_steps: int, head: nn.Module | None = None, defence: "DefenceSpec | None" = None,
                 defence_seed: int = 0, ir_shape: "tuple[int, ...] | None" = None):
        from .defences import DefenceSpec, local_classifier

        self.local = None
        if defence is not None and defence.local_front:
            if ir_shape is None:
                raise UserInputError(f"defence {defence.text} trains the FrontNet locally and needs the IR shape")
            self.local = local_classifier(tuple(ir_shape), mapping.perm.numel(),
                                          torch.Generator().manual_seed(int(defence_seed) % (2 ** 63) + 1))
        parts = front if head is None else _FrontAndHead(front, head)
        super().__init__(parts if self.local is None else _WithLocal(front, head, self.local), cfg, total_steps)
        self.front, self.head = front, head
        self._local_loss: torch.Tensor | None = None
        self.mapping = mapping
        self.pre = pre
        self.defence = defence or DefenceSpec()
        self.defence_seed = int(defence_seed)
        self._ir: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self.last_loss = math.nan

    def prepare(self, x_u8: torch.Tensor, step: int) -> torch.Tensor:
        """The FrontNet's input for global step `step`: augmented (randomness of that step) and
        normalised. A pure function of (batch, step), so it may run ahead of the step (prefetch)."""
        gen = self.cfg.batch_generator(step)
        x = augment(x_u8, gen) if self.cfg.augment else x_u8.float()
        return self.pre.normalise(x.div_(255.0))

    def forward(self, x_u8: torch.Tensor, y: torch.Tensor, prepared: "torch.Tensor | None" = None) -> torch.Tensor:
        """Decrypted uint8 batch + labels -> IR for the host (labels stay here). `prepared`:
        `prepare(x_u8, self.step)` computed ahead (the same tensor; then `x_u8` is not used)."""
        self.module.train()
        x = self.prepare(x_u8, self.step) if prepared is None else prepared
        self._ir = self.front(x)
        self._y = y
        if self.local is not None:  # the FrontNet's own supervision, kept here (labels never leave)
            self._local_loss = F.cross_entropy(self.local(self._ir), y, label_smoothing=self.cfg.label_smoothing)
        return self._ir.detach()

    def loss_grad(self, scores: torch.Tensor) -> torch.Tensor:
        """The host's output -> the gradient the host receives for it.

        Without a head: BackNet scores in the secret order -> dL/dscores in that order (softmax +
        loss here). With a head: the cut-layer features -> dL/dfeatures (the head's own gradients
        stay here until `backward` steps). Either way the defence is applied last.
        """
        from .defences import step_generator

        if self._y is None:
            raise UserInputError("loss_grad before forward")
        out = scores.detach().requires_grad_(True)
        scores = out if self.head is None else self.head(out)
        logits = self.mapping.to_original(scores)
        loss = F.cross_entropy(logits, self._y, label_smoothing=self.cfg.label_smoothing)
        if self.head is None:
            (grad,) = torch.autograd.grad(loss, out)
        else:
            loss.backward()  # head parameter gradients accumulate for the step in `backward`
            grad = out.grad.detach()
        self.last_loss = float(loss.detach())
        self.clean_grad = grad  # before the defence: enclave-only (bench_label_leakage's --exact-front)
        if self.defence.name != "none":
            grad = self.defence.apply(grad, self._y, step_generator(self.defence_seed, self.step))
        return grad

    def backward(self, d_ir: torch.Tensor) -> None:
        if self._ir is None:
            raise UserInputError("backward before forward")
        if d_ir.shape != self._ir.shape:
            raise TamperedMessage(f"IR gradient has shape {tuple(d_ir.shape)}, expected {tuple(self._ir.shape)}")
        if self.local is None:
            self._ir.backward(d_ir)
        else:  # checked above, otherwise unused: the defended gradient does not reach the FrontNet
            self._local_loss.backward()
        self._ir, self._y, self._local_loss = None, None, None
        self._apply_step()


class HostTrainer(_Half):
    """Host half: BackNet forward/backward on IRs, on CPU or GPU. Sees no label and no loss.

    `objective` (`selfsup.HostObjective`, under `--defence selfsup`): a label-free loss of the
    host's own inputs and outputs, added to what the enclave's rows ask of its layers.
    """

    def __init__(self, back: nn.Module, cfg: TrainConfig, total_steps: int, device: str = "cpu",
                 objective=None):
        super().__init__(back, cfg, total_steps, device)
        self.objective = objective
        self._ir: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._own_loss: torch.Tensor | None = None

    def forward(self, ir: torch.Tensor) -> torch.Tensor:
        self.module.train()
        self._ir = ir.detach().to(self.device).requires_grad_(True)
        self._scores = self.module(self._ir)
        if self.objective is not None:
            self._own_loss = self.objective.loss(self.module, self._ir, self._scores, self.step)
        return self._scores.detach().cpu()

    def backward(self, d_scores: torch.Tensor) -> torch.Tensor:
        d_ir = self.backward_input(d_scores)
        self.apply_step()
        return d_ir

    def backward_input(self, d_scores: torch.Tensor) -> torch.Tensor:
        """dL/dscores -> dL/dIR, with the BackNet's gradients computed but not applied yet: the
        caller sends dL/dIR to the enclave first and steps (`apply_step`) while the enclave works."""
        if self._scores is None:
            raise UserInputError("backward before forward")
        if self._own_loss is None:
            self._scores.backward(d_scores.to(self.device))
        else:
            torch.autograd.backward([self._scores, self._own_loss], [d_scores.to(self.device), None])
        d_ir = self._ir.grad.detach().cpu()
        self._ir, self._scores, self._own_loss = None, None, None
        return d_ir

    def apply_step(self) -> None:
        """The BackNet's SGD step from the gradients `backward_input` left."""
        self._apply_step()


def partitioned_step(enclave: EnclaveTrainer, host: HostTrainer, x_u8: torch.Tensor, y: torch.Tensor) -> float:
    """One in-process step through both halves; returns the loss (known only to the enclave)."""
    ir = enclave.forward(x_u8, y)
    scores = host.forward(ir)
    d_scores = enclave.loss_grad(scores)
    d_ir = host.backward(d_scores)
    enclave.backward(d_ir)
    return enclave.last_loss


class PlainTrainer(_Half):
    """The baseline: the whole model in one process, same schedule, order and augmentation."""

    def __init__(self, model: nn.Module, pre: Preprocessing, cfg: TrainConfig, total_steps: int):
        super().__init__(model, cfg, total_steps)
        self.pre = pre

    def train_step(self, x_u8: torch.Tensor, y: torch.Tensor) -> float:
        self.module.train()
        gen = self.cfg.batch_generator(self.step)
        x = augment(x_u8, gen) if self.cfg.augment else x_u8.float()
        x = self.pre.normalise(x.div_(255.0))
        loss = F.cross_entropy(self.module(x), y, label_smoothing=self.cfg.label_smoothing)
        loss.backward()
        self._apply_step()
        return float(loss.detach())


def split_for_caltrain(model: nn.Module, k: int, mapping: ClassMapping):
    """Split a LayeredModel at k and permute its classifier rows: (FrontNet, BackNet)."""
    front, back, _ = split_with_head(model, k, 0, mapping)
    return front, back


def check_head(model: nn.Module, k: int, head: int) -> int:
    """`head` = how many of the last layers run in the enclave: 0 (none) up to leaving the host one
    (the one rule of bundles and CalTrain: `models.split.check_split`)."""
    check_split(model, k, head)
    return head


def host_layers(model: nn.Module, k: int, head: int = 0) -> nn.Sequential:
    """The host's part: layers k..n-1-head (the BackNet without the head). Shares the parameters."""
    check_split(model, k, head)
    return split_model(model, k, head).back


def split_with_head(model: nn.Module, k: int, head: int, mapping: ClassMapping):
    """(FrontNet, host layers, head or None) with the classifier rows permuted in place by `mapping`
    (`models.split`: the same partition as a bundle's). The parts share the parameters with `model`."""
    check_split(model, k, head)
    permute_classifier(model, mapping)
    parts = split_model(model, k, head)
    return parts.front, parts.back, parts.head
