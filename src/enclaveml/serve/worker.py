"""The enclave worker process: `python -m enclaveml.serve.worker --channel-fd FD --tee sim`.

(Or `--channel-path PATH [--no-shm]` where the worker cannot inherit an fd, e.g. under Gramine.)

Trust side: enclave. Started by the host with `channel.spawn_enclave_worker`; hardens itself
first (before any secret exists in its memory), then answers the host's requests on the channel
by calling `EnclaveService` (all logic lives there; this file only moves bytes). Requests run on
a thread pool so several proceed at once (torch releases the GIL in its kernels).

Operations (header "op"): info, ping, stats, evidence, deploy, restore, delete, identity, front_batch, finish_batch, abort. Replies
carry the same "id"; failures come back as {"error": kind, "message": text}. A request may carry
several images: `front_batch` answers per request {"handle", "rows", "failed"} with the IR rows of
all requests concatenated, and `finish_batch` takes per handle its number of rows of scores.
"stats" answers the per-stage totals of `EnclaveService.clock` (calls, wall and CPU ns: aggregated
timings, no more than the host sees of each call's duration) and each op's handler time.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..timing import now, since
from .channel import serve_channel, worker_channel_from_argv


#: Operations run on the channel's reading thread, not the pool: cheap ones, and "ping", which so
#: answers even while every pool thread runs a long FrontNet pass (a busy enclave is not a hung one).
INLINE_OPS = ("abort", "info", "finish_batch", "ping", "stats")


def _handler(svc, info: dict):
    from ..errors import DataError

    def handle(h: dict, tensors: dict, blobs: dict):
        t = now()
        try:
            return _handle(h, tensors, blobs)
        finally:
            if h.get("op") in ("front_batch", "finish_batch"):
                since(svc.clock, "op_" + h["op"], t)

    def _handle(h: dict, tensors: dict, blobs: dict):
        op = h.get("op")
        if op == "front_batch":
            n = h.get("n", 0)
            if type(n) is not int or not 0 <= n <= 4096:
                raise DataError("front_batch: n must be 0..4096")
            outs = svc.front_batch(str(h.get("model", "")), [blobs.get(f"r{i}", b"") for i in range(n)])
            items, irs = [], []
            for o in outs:
                if isinstance(o, Exception):
                    items.append(_error_item(o))
                else:
                    items.append({"handle": o[0], "rows": int(o[1].shape[0]) if o[1].dim() else 0, "failed": o[2]})
                    if o[1].numel():
                        irs.append(o[1])
            return {"items": items}, ({"ir": torch.cat(irs)} if irs else None), None
        if op == "finish_batch":
            handles, rows = h.get("handles", []), h.get("rows", [])
            if (not isinstance(handles, list) or not isinstance(rows, list) or len(rows) != len(handles)
                    or not all(type(r) is int and 0 <= r <= 4096 for r in rows)):
                raise DataError("finish_batch: handles and rows must be lists of one length")
            scores = tensors.get("scores")
            total = sum(rows)
            if (scores is None and total) or (scores is not None and (scores.dim() != 2 or scores.shape[0] != total)):
                raise DataError("finish_batch: the scores must have one row per decoded image")
            items, blobs_out, row = [], {}, 0
            for i, (hd, r) in enumerate(zip(handles, rows)):
                try:
                    part = scores[row:row + r] if r else torch.empty(0)
                    blobs_out[f"r{i}"] = svc.finish(str(hd), part)
                    items.append({"ok": True})
                except Exception as e:
                    items.append(_error_item(e))
                row += r
            return {"items": items}, None, blobs_out
        if op == "abort":
            for hd in h.get("handles", []):
                svc.abort(str(hd))
            return {}, None, None
        if op == "evidence":
            try:
                nonce = bytes.fromhex(str(h.get("nonce", "")))
            except ValueError:
                raise DataError("nonce must be hex") from None
            issued = svc.issue_nonce(nonce)
            pq = h.get("keys") == "pq"  # also bind the hybrid key (crypto/suites.py)
            out = {"evidence": svc.evidence(issued, pq), "public_key": svc.public_key().hex(), "nonce": issued.hex()}
            if pq:
                out["pq_public_key"] = svc.pq_public_key().hex()
            return out, None, None
        if op in ("deploy", "restore"):
            files = {k: v for k, v in blobs.items() if k not in ("key_release", "sealed")}
            if op == "deploy":
                out = svc.deploy(str(h.get("model", "")), blobs.get("key_release", b""), files)
                return {k: v for k, v in out.items() if k != "sealed"}, None, {"sealed": out["sealed"]}
            return svc.restore(str(h.get("model", "")), blobs.get("sealed", b""), files), None, None
        if op == "identity":
            return {}, None, {"identity": svc.identity(str(h.get("model", "")), blobs.get("request", b""))}
        if op == "delete":
            return svc.delete(str(h.get("model", "")), blobs.get("command", b"")), None, None
        if op == "stats":
            return {"stages": svc.clock.snapshot()}, None, None
        if op == "ping":  # liveness: answered on the reading thread (see INLINE_OPS)
            return {"pong": True}, None, None
        if op == "info":
            return {**info, "models": svc.models()}, None, None
        raise DataError(f"unknown enclave operation {str(op)[:32]!r}")

    return handle


def _error_item(e: Exception) -> dict:
    from ..errors import EnclaveMLError

    if isinstance(e, EnclaveMLError):
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": "InternalError", "message": "internal error in the worker"}


def main(argv: list[str] | None = None) -> None:
    channel, rest = worker_channel_from_argv(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="enclaveml.serve.worker")
    p.add_argument("--tee", default="sim")
    p.add_argument("--threads", type=int, default=2, help="requests handled at once")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--replay-window", type=float, default=120.0)
    p.add_argument("--no-lock-memory", action="store_true")
    p.add_argument("--allow-factory", action="append", default=[],
                   help="a model factory 'package.module:function' this enclave may build (measured)")
    args = p.parse_args(rest)

    from ..tee import get_backend
    from ..models.servable import enclave_config

    config = enclave_config(args.allow_factory)  # part of the measurement (sim); argv under Gramine
    options = {"lock_memory": not args.no_lock_memory, "config": config} if args.tee == "sim" else {}
    backend = get_backend(args.tee, **options)
    hardening = backend.harden()  # first: before any key or input exists in this process
    torch.set_num_threads(max(1, args.torch_threads))
    measurement = backend.measurement()  # measured at launch, like a TEE

    from .enclave import EnclaveService

    svc = EnclaveService(backend, replay_window_s=args.replay_window,
                         allowed_factories=config.get("allowed_factories", ()))
    info = {"tee": args.tee, "measurement": measurement, "hardening": hardening, "public_key": svc.public_key().hex(),
            "suites": sorted(svc.keys.accepted)}
    serve_channel(channel, _handler(svc, info), max_workers=max(1, args.threads),
                  inline=lambda h: h.get("op") in INLINE_OPS)


if __name__ == "__main__":
    main()
