"""The CalTrain enclave process: `python -m enclaveml.train.enclave_worker --channel-fd FD --tee sim --owner HEX [--plan JSON] [--allow-factory PKG.MOD:FN]...`.

Trust side: enclave. Started by the training host with `serve.channel.spawn_enclave_worker`; it
hardens itself before any secret exists, then answers the host's requests one at a time (a
training run is a sequence). All logic is in `CalTrainEnclave`; this file only moves bytes.
The owner is measured (sim config); the training plan (`--plan`, canonical JSON; default the
owner's open plan) is bound by the enclave itself: report data, per-plan keys (plan.py).

Ops (header "op"): evidence, ingest, add_data, start, forward, loss, backward, checkpoint,
finish, records, release, audit_records, audit. Failures travel back as {"error": kind, "message": text}.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..serve.channel import Channel, channel_fd_from_argv, serve_channel


def make_handler(enc):
    from ..errors import UserInputError

    def handle(h: dict, tensors: dict, blobs: dict):
        op = h.get("op")
        if op == "evidence":
            return enc.evidence(bytes.fromhex(str(h.get("nonce", "")))), None, None
        if op == "ingest":
            n = int(h.get("n", 0))
            res = enc.ingest([blobs.get(f"u{i}", b"") for i in range(n)])  # decoded as the plan says
            out_blobs = {}
            for i, r in enumerate(res):
                if "sealed" in r:
                    out_blobs[f"s{i}"] = r.pop("sealed")
            return {"results": res}, None, out_blobs
        if op == "add_data":
            tags = [str(t) for t in h.get("tags", [])]
            items = [(t, blobs.get(f"s{i}", b"")) for i, t in enumerate(tags)]
            return {"count": enc.add_data(items, bool(h.get("reset")))}, None, None
        if op == "start":
            info, back = enc.start(blobs.get("command", b""), blobs.get("checkpoint") or None)
            return info, None, ({"back": back} if back is not None else None)
        if op == "forward":
            return {}, {"ir": enc.forward(int(h.get("step", -1)))}, None
        if op == "loss":
            return {}, {"grad": enc.loss_grad(tensors["scores"])}, None
        if op == "backward":
            return {"step": enc.backward(tensors["grad"])}, None, None
        if op == "checkpoint":
            return {"step": enc.trainer.step}, None, {"checkpoint": enc.checkpoint()}
        if op == "finish":
            out = enc.finish(blobs.get("back", b""))
            return {"records": out["records"]}, None, {"meta": out["meta_token"], "final": out["final"]}
        if op == "records":
            toks = enc.records(int(h.get("start", 0)), int(h.get("count", 0)))
            return {"n": len(toks)}, None, {f"r{i}": t for i, t in enumerate(toks)}
        if op == "release":
            return {}, None, {"release": enc.release(blobs.get("command", b""), blobs.get("final", b""))}
        if op == "audit_records":
            n = int(h.get("n", 0))
            return {"count": enc.audit_records(int(h.get("start", -1)), [blobs.get(f"r{i}", b"") for i in range(n)])}, \
                None, None
        if op == "audit":
            return {}, None, {"audit": enc.audit(blobs.get("command", b""), blobs.get("final", b""),
                                                 blobs.get("meta", b""))}
        # -- data-parallel CalTrain (`train serve --enclaves N`; dp_worker_ops.py) --
        if isinstance(op, str) and op.startswith("dp_") and hasattr(enc, "dp_hello"):
            from .dp_worker_ops import handle_dp

            return handle_dp(enc, op, h, tensors, blobs)
        raise UserInputError(f"unknown op {op!r}")

    return handle


def main(argv: list[str] | None = None) -> None:
    fd, rest = channel_fd_from_argv(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(prog="enclaveml.train.enclave_worker")
    ap.add_argument("--tee", default="sim")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--owner", required=True, help="the run owner's Ed25519 public key, hex (measured config)")
    ap.add_argument("--plan", default=None, help="the training plan, JSON (train/plan.py); default: the owner's "
                    "open plan")
    ap.add_argument("--group", action="store_true", help="one enclave of a data-parallel group (dp_enclave.py)")
    ap.add_argument("--allow-factory", action="append", default=[],
                    help="a user architecture (package.module:function) this enclave may build (measured config)")
    a = ap.parse_args(rest)
    import json

    from ..tee import get_backend
    from .enclave import CalTrainEnclave, enclave_config
    from .plan import TrainingPlan

    config = enclave_config(a.owner, a.allow_factory)  # part of the measurement (sim); argv under Gramine
    plan = TrainingPlan.from_dict(json.loads(a.plan)) if a.plan else None
    be = get_backend(a.tee, config=config) if a.tee == "sim" else get_backend(a.tee)
    be.harden()
    torch.set_num_threads(max(1, a.threads))
    factories = tuple(config.get("allowed_factories", ()))
    enc = CalTrainEnclave(be, owner=config["owner"], plan=plan, allowed_factories=factories)
    if a.group:
        from .dp_enclave import DistributedEnclave

        enc = DistributedEnclave(be, owner=config["owner"], plan=plan, allowed_factories=factories)
    chan = Channel.from_fd(fd)
    # One request at a time: a training run is a strict sequence of steps.
    serve_channel(chan, make_handler(enc), max_workers=1, inline=lambda h: True)


if __name__ == "__main__":
    main()
