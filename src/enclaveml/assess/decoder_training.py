"""Train every point's decoder attacker together, on shared forward batches, until converged (owner side).

Why together: the decoders of all points learn from the same held-out images, and one forward pass
of the model yields the IRs of a batch at every point (assess/forward.py). So the training set is
streamed in chunks (one model pass per chunk of 256 images, never all IRs of all points in memory),
and every decoder takes its minibatch steps on the chunk's IRs; the model runs only as deep as the
deepest decoder still training.

Why it is faster without being weaker:
* the decoders' small convolutions use one core badly when split across threads (intra-op), so
  each decoder runs single-threaded and the decoders run side by side on the available cores;
* each decoder follows a warmup-stable-decay learning-rate schedule and is checked on a held-out
  validation split of the attacker's images; when its validation MSE stops improving (a plateau),
  the final decay starts at once instead of at the step budget. A decoder that plateaus early
  (deep points, which learn only a blurry average) stops early; one that keeps improving trains
  to the budget. The decay phase gives the same final-annealing gain a one-cycle schedule does;
* with `bf16`, each decoder's forward runs under bfloat16 autocast (its convolutions and their
  backward in bfloat16 on a CPU with native bfloat16), while the weights, Adam's state, the loss
  and the SSIM term's moments stay float32: ~0.7x the CPU time of a step, the same SSIM within
  noise on darknet (docs/benchmarks.md, asm3).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .decoder_net import Decoder, channel_stats
from .metrics import ssim_target, ssim_training
from .threads import side_by_side, single_threaded

#: (pixel indices into the attacker's images, deepest point wanted) -> {point: IR of those images}
IRSource = Callable[[torch.Tensor, int], dict[int, torch.Tensor]]


@dataclass
class WSDSchedule:
    """Warmup-stable-decay learning-rate factor over at most `steps` steps.

    Linear warmup from 1/25 over `warmup_frac` of the budget, then constant, then a linear decay
    to zero over `decay_frac` of the budget, started by `begin_decay` (a plateau) or when the
    budget would otherwise run out. Pure: no tensors.
    """

    steps: int
    warmup_frac: float = 0.15
    decay_frac: float = 0.2
    decay_start: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"a schedule needs at least one step (got {self.steps})")
        self.warmup = max(1, round(self.warmup_frac * self.steps))
        self.decay = max(1, round(self.decay_frac * self.steps))

    @property
    def end(self) -> int:
        """The step count at which training is done."""
        start = self.steps - self.decay if self.decay_start is None else min(self.decay_start, self.steps - self.decay)
        return start + self.decay

    @property
    def decaying_from(self) -> int:
        return self.end - self.decay

    def begin_decay(self, t: int) -> None:
        if self.decay_start is None:
            self.decay_start = max(t, self.warmup)

    def factor(self, t: int) -> float:
        """Multiplier of the peak learning rate for step t (0-based)."""
        if t >= self.decaying_from:
            return max(0.0, (self.end - t) / self.decay)
        if t < self.warmup:
            return 1 / 25 + (1 - 1 / 25) * t / self.warmup
        return 1.0

    def done(self, t: int) -> bool:
        return t >= self.end


@dataclass
class Plateau:
    """Early-stopping rule: no relative improvement of `min_delta` in `patience` consecutive checks."""

    patience: int = 2
    min_delta: float = 0.01
    best: float = math.inf
    bad: int = 0

    def update(self, loss: float) -> bool:
        """Record one validation loss; True once the loss has plateaued."""
        if not math.isfinite(loss):
            raise FloatingPointError("decoder validation loss is not finite")
        if loss < self.best * (1 - self.min_delta):
            self.best, self.bad = loss, 0
        else:
            self.best = min(self.best, loss)
            self.bad += 1
        return self.bad >= self.patience


@dataclass
class DecoderRun:
    """One point's decoder while it trains, and how its training went."""

    point: int
    decoder: Decoder
    optimizer: torch.optim.Optimizer
    schedule: WSDSchedule
    plateau: Plateau
    lr: float
    ssim_weight: float = 0.0  # loss = MSE + ssim_weight * (1 - SSIM): the attacker optimises what it is scored by
    steps: int = 0
    val_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0  # CPU time of the last chunk's steps: the slowest go to the cores first
    bf16: bool = False  # the decoder's forward under bfloat16 autocast; weights, Adam state and loss in float32

    @property
    def active(self) -> bool:
        return not self.schedule.done(self.steps)

    def train_on(self, ir: torch.Tensor, x: torch.Tensor, batch: int,
                 moments: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Consecutive minibatch steps over one chunk, until the chunk or the schedule ends.

        `moments`: each minibatch's target moments for the SSIM term (`ssim_target`), shared by all
        decoders; computed here when absent.
        """
        self.decoder.train()
        t0 = time.thread_time()
        try:
            self._steps(ir, x, batch, moments)
        finally:
            self.seconds = time.thread_time() - t0

    def _steps(self, ir: torch.Tensor, x: torch.Tensor, batch: int,
               moments: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        for b, i in enumerate(range(0, ir.shape[0] - batch + 1, batch)):
            if not self.active:
                return
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr * self.schedule.factor(self.steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                y = self.decoder(ir[i:i + batch])
            target = x[i:i + batch]  # y: float32 already (`Decoder` widens it)
            loss = F.mse_loss(y, target)
            if self.ssim_weight:
                tm = moments[b] if moments is not None else None
                loss = loss + self.ssim_weight * (1 - ssim_training(y, target, target=tm))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1

    @torch.no_grad()
    def validate(self, ir: torch.Tensor, x: torch.Tensor) -> float:
        """Validation MSE, in the training forward's precision: under bfloat16 autocast the losses are
        within ~0.1% of float32 (an early-stop rule with a 1% threshold), the decisions, steps and SSIM
        on darknet identical, for 0.7x the validation CPU time (docs/benchmarks.md, helper dk)."""
        self.decoder.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            y = self.decoder(ir)
        loss = float(F.mse_loss(y.float(), x))
        self.val_losses.append(round(loss, 6))
        return loss


@dataclass
class TrainingResult:
    decoders: dict[int, Decoder]
    info: dict[int, dict]  # point -> JSON-ready: steps, stopped early, validation losses
    chunks: int  # chunks of the attacker's images trained on (one model pass each, unless the set is one chunk)


def split_validation(m: int, gen: torch.Generator, max_val: int = 256) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(train indices, validation indices, whether a held-out validation split exists).

    A tenth of the attacker's images, at most `max_val`, checks convergence; with fewer than 80
    images there is no split (and no early stop): all images train, and give the IR statistics.
    """
    perm = torch.randperm(m, generator=gen)
    n_val = min(max_val, m // 10)
    if n_val < 8:
        return perm, perm, False
    return perm[n_val:], perm[:n_val], True


def train_decoders(source: IRSource, x_train: torch.Tensor, shapes: dict[int, tuple[int, ...]], steps: int,
                   batch: int, lr: float, seed: int, early_stop: bool = True, check_every: int = 24,
                   patience: int = 2, min_delta: float = 0.01, workers: int = 1, chunk: int = 256,
                   width: int = 512, ssim_weight: float = 0.0, bf16: bool = False) -> TrainingResult:
    """Fit one decoder IR_k -> pixels per point k in `shapes`, all on the same shared batches."""
    if steps < 1 or batch < 1:
        raise ValueError(f"decoder training needs steps >= 1 and batch >= 1 (got {steps}, {batch})")
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx, has_val = split_validation(x_train.shape[0], gen)
    batch = min(batch, train_idx.numel())
    chunk = max(batch, chunk // batch * batch)
    deepest = max(shapes)
    outer = max(1, workers)

    def forward(idx: torch.Tensor, upto: int) -> dict[int, torch.Tensor]:
        # the model's pass over a chunk: its parts side by side, one per core (assess/threads.py)
        parts = side_by_side(lambda part: source(part, upto), idx.tensor_split(outer), outer) if outer > 1 \
            and idx.numel() >= 2 * outer else [source(idx, upto)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    with single_threaded():
        ir_val = forward(val_idx, deepest)
        x_val = x_train[val_idx]
        # a training set no larger than one chunk (e.g. 4 ImageNet photos): its IRs once, not once per
        # epoch (200 model passes over the same images otherwise); with no validation split they are ir_val's
        cached: dict[int, torch.Tensor] | None = None
        if train_idx.numel() <= chunk:
            cached = ir_val if not has_val else forward(train_idx, deepest)
            where = torch.full((x_train.shape[0],), -1, dtype=torch.long)
            where[train_idx] = torch.arange(train_idx.numel())
        runs = {}
        for k in sorted(shapes):
            torch.manual_seed(seed + k)
            mean, std = channel_stats(ir_val[k])
            dec = Decoder(tuple(shapes[k]), tuple(x_train.shape[-2:]), mean, std, base=width
                          ).to(memory_format=torch.channels_last)
            # fused Adam: one kernel per parameter instead of a dozen small ops (same update rule)
            runs[k] = DecoderRun(k, dec, torch.optim.Adam(dec.parameters(), lr=lr, fused=True), WSDSchedule(steps),
                                 Plateau(patience, min_delta), lr, ssim_weight, bf16=bf16)
        chunks = 0
        t = 0
        while any(r.active for r in runs.values()):
            perm = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
            perm = perm[: perm.numel() // batch * batch]  # whole minibatches only (batch norm)
            for c in range(0, perm.numel(), chunk):
                active = [r for r in runs.values() if r.active]
                if not active:
                    break
                idx = perm[c:c + chunk]
                irs = forward(idx, max(r.point for r in active)) if cached is None else \
                    {k: v[where[idx]] for k, v in cached.items()}
                xs = x_train[idx]
                chunks += 1
                # the targets' SSIM moments: once per minibatch for all decoders
                moments = [ssim_target(xs[i:i + batch]) for i in range(0, xs.shape[0] - batch + 1, batch)
                           ] if ssim_weight else None
                # slowest first, so the cores finish the chunk together (the order changes no result)
                order = sorted(active, key=lambda r: -r.seconds)
                side_by_side(lambda r: r.train_on(irs[r.point], xs, batch, moments), order, workers)
                t_new = t + idx.numel() // batch
                if early_stop and has_val and t_new // check_every > t // check_every:
                    # a decoder already in its final decay has nothing left to decide: no check
                    checking = [r for r in active if r.active and r.schedule.decay_start is None
                                and r.schedule.warmup <= r.steps < r.schedule.decaying_from]
                    losses = side_by_side(lambda r: r.validate(ir_val[r.point], x_val), checking, workers)
                    for r, loss in zip(checking, losses):
                        if r.plateau.update(loss):
                            r.schedule.begin_decay(r.steps)
                            r.stopped_early = r.schedule.end < steps
                t = t_new
        info = {}
        for k, r in runs.items():
            r.decoder.eval()
            info[k] = {"steps": r.steps, "budget": steps, "stopped_early": r.stopped_early,
                       "precision": "bfloat16 autocast" if bf16 else "float32",
                       "val_mse": r.validate(ir_val[k], x_val) if has_val else None,
                       "val_curve": r.val_losses[:-1] if has_val else []}
    return TrainingResult({k: r.decoder.eval() for k, r in runs.items()}, info, chunks)

