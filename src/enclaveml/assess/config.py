"""Settings of one assessment run, with defaults strong enough for real findings (owner side)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Usable EPC of SGX1 (the 128 MiB EPC minus the enclave page cache metadata): the default budget.
SGX1_EPC_BYTES = 93 * 1024 * 1024


@dataclass
class AssessConfig:
    samples: int = 64  # test samples: KL test and decoder evaluation
    points: tuple[int, ...] | None = None  # None: every candidate point
    tests: tuple[str, ...] = ("kl", "decoder", "rmle")
    ssim_threshold: float = 0.3  # SSIM <= this is "unrecognisable" (He et al., ACSAC 2019)
    kl_tolerance: float = 0.1  # a point leaks when own channels beat uniform on this fraction more samples than chance
    kl_confidence: float = 0.95  # level of the interval on that difference; a point passes when its upper bound <= tolerance
    budget_bytes: int = SGX1_EPC_BYTES
    # decoder inversion (black box): one small decoder per point, trained on held-out data
    decoder_train: int = 4000
    # 200 steps of a width-256 decoder on MSE + 0.05 (1 - SSIM), peak lr 4e-3: as strong as 400 steps of
    # width 512 on MSE alone at lr 2e-3 (darknet, docs/benchmarks.md), for about a quarter of the work
    # (150 steps: 0.006-0.025 weaker at every darknet point, measured again by asm3: not the default)
    decoder_steps: int = 200
    decoder_batch: int = 32
    decoder_lr: float = 4e-3
    decoder_width: int = 256  # channels x side at each level (Decoder's `base`): 8 at 32x32, 64 at 4x4
    decoder_ssim_weight: float = 0.05
    # the decoders' forward (and so their backward) under bfloat16 autocast where the CPU has native
    # bfloat16 (AVX512-BF16/AMX; else float32): ~0.7x the CPU time per step, SSIM per point within
    # noise of float32 training on darknet (docs/benchmarks.md, asm3); weights, Adam and loss stay float32
    decoder_bf16: bool = True
    # early stop: every `check_every` steps, validation MSE on held-out attacker images; after
    # `patience` checks without a `min_delta` relative improvement the final decay starts
    decoder_early_stop: bool = True
    decoder_check_every: int = 24
    decoder_patience: int = 2
    decoder_min_delta: float = 0.01
    # white-box rMLE with a total-variation prior
    rmle_samples: int = 8
    rmle_steps: int = 150
    rmle_lr: float = 0.05
    rmle_tv: float = 0.02
    # compute per search at large inputs: a point whose FrontNet costs more than rmle_full_flops FLOPs per
    # image gets rmle_steps x rmle_full_flops / its FLOPs steps, at least rmle_min_steps. Every darknet and
    # cnn26 point (at most 87 MFLOPs) keeps all its steps. On EfficientNet-Lite0 at 224x224 points 1-3 keep
    # 150 (point 1's rMLE SSIM still climbs: 0.64 after 50 steps, 0.90 after 150) and the deeper ones get
    # 99 down to 25: there rMLE's SSIM is flat or falls with more steps (point 5: 0.109 after 25 steps, 0.118
    # after 150; point 9: 0.094, 0.080) and the decoder is the stronger attack at every point past 1: rMLE
    # 278 vs 594 CPU s for all 19 points, SSIM within 0.05 of 150 steps at each (docs/benchmarks.md, lt)
    rmle_full_flops: float = 1e8
    rmle_min_steps: int = 25
    # a point searched with fewer steps whose SSIM comes within this of ssim_threshold (or above it) searches
    # again with all rmle_steps: the budget is cut only where the attack is far from deciding anything
    rmle_full_near: float = 0.1
    rmle_early_stop: bool = True  # stop once the objective improves < rmle_min_delta over rmle_window steps
    rmle_window: int = 30
    rmle_min_delta: float = 0.01
    # the staircase's FrontNet passes under bfloat16 autocast where the CPU has native bfloat16 (the
    # objective, TV prior and Adam in float32): 0.67x the CPU time, SSIM per point within 0.011 of
    # float32 on darknet (docs/benchmarks.md, asm3); the per-point fallback search stays float32
    rmle_bf16: bool = True
    # KL test and cost
    # oracle pass sizes, one thread each: bfloat16 passes of 256 and float32 passes of 128 images beat
    # 512 by ~10% and ~15% on darknet (activations closer to the caches; docs/benchmarks.md, asm2);
    # both at most kl_batch_pixels pixels (H x W) in all: 41 images at 224x224 (bounded memory)
    kl_batch: int = 256
    kl_batch_float32: int = 128
    kl_batch_pixels: int = 2 ** 21
    kl_screen: bool = True  # bfloat16 oracle pass first, float32 near each minimum (assess/kl_screen.py)
    # the screen's final audit: this share (at least kl_audit_min) of the images it skipped, drawn at random
    # (seeded) and computed in float32; one below its row's minimum sends the point to float32, one whose
    # error the margin did not cover widens it (assess/kl_screen.py)
    kl_audit_share: float = 0.02
    kl_audit_min: int = 32
    latency_repeats: int = 10
    report_images: int = 6
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = list(self.points) if self.points is not None else None
        d["tests"] = list(self.tests)
        return d
