"""Black-box inversion: a decoder trained to map IR_k back to the input (owner side, assessment).

The host sees IR tensors; an attacker with data of the same distribution (here: the held-out
split) can learn the inverse of the FrontNet without its weights (He et al., ACSAC 2019, "inverse
network"). One small convolutional decoder per point (assess/decoder_net.py), trained with Adam on
MSE; all points' decoders train together on shared forward batches and stop when converged
(assess/decoder_training.py); each is scored by SSIM and PSNR on the test samples.
"""

from __future__ import annotations

import math

import torch

from .affine import AffineCopy, affine_copies
from .decoder_net import Decoder
from .decoder_training import train_decoders
from .kl_screen import bf16_is_fast
from .leakage import AssessContext, LeakageResult, LeakageTest, PointData, register
from .metrics import psnr, ssim


@register
class DecoderInversion(LeakageTest):
    name = "decoder"
    kind = "inversion"

    def __init__(self, config):
        super().__init__(config)
        self._trained: dict[int, tuple[Decoder, dict]] = {}
        self._copies: dict[int, AffineCopy] = {}  # point -> the earlier point whose decoder serves it

    def _train(self, ctx: AssessContext, source, shapes: dict[int, tuple[int, ...]]) -> None:
        cfg = self.config
        self._bf16 = cfg.decoder_bf16 and bf16_is_fast()  # emulated bfloat16 would be slower, not faster
        res = train_decoders(source, ctx.x_train, shapes, cfg.decoder_steps, cfg.decoder_batch, cfg.decoder_lr,
                             cfg.seed, early_stop=cfg.decoder_early_stop, check_every=cfg.decoder_check_every,
                             patience=cfg.decoder_patience, min_delta=cfg.decoder_min_delta,
                             workers=ctx.cores(), width=cfg.decoder_width,
                             ssim_weight=cfg.decoder_ssim_weight, bf16=self._bf16)
        for k, dec in res.decoders.items():
            self._trained[k] = (dec, res.info[k])

    def prepare(self, ctx: AssessContext, points: list[PointData]) -> None:
        """Train every point's decoder in one pass over the attacker's images (shared forward batches)."""
        if ctx.forward is None or not points:
            return
        fwd, pre, x = ctx.forward, ctx.pre, ctx.x_train
        # a point whose IR is a per-channel affine copy of an earlier one's (conv -> batch norm) needs
        # no decoder of its own: the earlier point's, after the inverse map, is the same attack
        self._copies = affine_copies({pt.point.index: pt.ir_test for pt in points})
        # channels-last input: the same IRs (bit-identical on darknet), ~8% less CPU per chunk's pass
        self._train(ctx, lambda idx, upto: fwd(pre.normalise(x[idx]).contiguous(memory_format=torch.channels_last),
                                               upto=upto)[0],
                    {pt.point.index: tuple(pt.point.out_shape) for pt in points if pt.point.index not in self._copies})

    def evaluate(self, ctx: AssessContext, pt: PointData) -> LeakageResult:
        cfg = self.config
        k = pt.point.index
        copy = self._copies.get(k)
        ir_test = pt.ir_test if copy is None else copy.to_source(pt.ir_test)
        if copy is not None and copy.source in self._trained:
            k = copy.source
        elif k not in self._trained:  # not prepared: train this point's decoder alone, on its stored IRs
            if pt.ir_train is None:
                raise ValueError(f"point {k}: no decoder prepared and no stored training IRs")
            ir = pt.ir_train
            self._train(ctx, lambda idx, upto: {k: ir[idx]}, {k: tuple(ir.shape[1:])})
        dec, info = self._trained[k]
        if not any(c.source == k and later > pt.point.index for later, c in self._copies.items()):
            del self._trained[k]  # no later point needs it
        with torch.no_grad():
            recon = torch.cat([dec(ir_test[i:i + 256]) for i in range(0, ir_test.shape[0], 256)])
        s, p = ssim(recon, ctx.x_test), psnr(recon, ctx.x_test)
        summary = {"ssim": float(s.mean()), "psnr": float(p.mean()), "ssim_min": float(s.min()),
                   "ssim_max": float(s.max()), "samples": int(s.numel()), "train_images": int(ctx.x_train.shape[0]),
                   "steps": info["steps"], "step_budget": info["budget"], "stopped_early": info["stopped_early"],
                   "val_mse": info["val_mse"], "precision": info["precision"]}
        if copy is not None and k == copy.source:
            summary["decoder_of"] = k  # this point's IR is an affine copy of point k's
        if not math.isfinite(summary["ssim"]):
            raise FloatingPointError("decoder inversion produced NaN")
        return LeakageResult(summary, {"reconstructions": recon[: cfg.report_images]})
