"""The serving enclave worker process: `python -m enclaveml.serve.worker --channel-fd FD --tee sim`.

(Or `--channel-path PATH [--no-shm]` where the worker cannot inherit an fd, e.g. under Gramine.)

Trust side: enclave. Started by the host through `runtime.handle.EnclaveHandle`; the runtime's
worker main (`runtime.enclave.main`) hardens the process first (before any secret exists in its
memory), then serves the ops registered here, each calling `EnclaveService` (all logic lives
there; this file only moves bytes). Requests run on a thread pool so several proceed at once
(torch releases the GIL in its kernels); a lone small `front_batch` runs on the reading thread
while the pool is idle (`small_front_batch`: one thread hand-off less for a single request).

Operations (header "op"): info, ping (the runtime's), stats, evidence, deploy, restore, delete, identity,
front_batch, finish_batch, abort. Replies carry the same "id"; failures come back as {"error":
kind, "message": text}. A request may carry several images: `front_batch` answers per request
{"handle", "rows", "failed"} with the IR rows of all requests concatenated, and `finish_batch`
takes per handle its number of rows of scores. With "finish_rows" N > 0 (the host's placement,
`serve/placement.py`) a `front_batch` of at most N decoded images, for a deployment that holds its
BackNet, answers each request {"answered": true, "failed"} with its sealed answer in blob "rI"
(one round trip; no IR leaves). "stats" answers the per-stage totals of
`EnclaveService.clock` (calls, wall and CPU ns: aggregated timings, no more than the host sees of
each call's duration) and each batch op's handler time.
"""

from __future__ import annotations

import torch

from ..runtime import heap
from ..runtime.enclave.main import WorkerApp, run_worker
from ..runtime.enclave.ops import Hex, Int, Ints, OpRegistry, Str, Strs
from ..runtime.rpc import error_fields
from .placement import NCHW_COPY_MAX_BYTES

#: Largest number of requests (and of handles) in one batch op.
MAX_BATCH = 4096
#: Operations run on the channel's reading thread, not the pool: cheap ones, and "ping", which so
#: answers even while every pool thread runs a long FrontNet pass (a busy enclave is not a hung one).
INLINE_OPS = ("abort", "info", "finish_batch", "ping", "stats")
_MODEL = Str(512, default="")
#: A `front_batch` of one request of at most this many bytes runs on the reading thread when the
#: pool is idle (a lone request: one thread hand-off and wake-up less; about a FrontNet pass of a
#: few small images, so a ping waits milliseconds at most).
IDLE_INLINE_BYTES = 64 << 10


def small_front_batch(header: dict, tensors: dict, blobs: dict) -> bool:
    """Whether a request is a lone small `front_batch` (may run inline while the pool is idle)."""
    return (header.get("op") == "front_batch" and header.get("n") == 1 and not tensors
            and sum(len(b) for b in blobs.values()) <= IDLE_INLINE_BYTES)


def register_ops(ops: OpRegistry, svc) -> OpRegistry:
    """The serving ops on `svc` (an `EnclaveService`)."""
    from ..errors import DataError
    from .enclave import Answered

    @ops.op("front_batch", n=Int(0, MAX_BATCH, default=0), model=_MODEL, finish_rows=Int(0, 1 << 20, default=0))
    def front_batch(call, n, model, finish_rows):
        with svc.clock.stage("op_front_batch"):
            return _front_batch(call, n, model, finish_rows)

    def _front_batch(call, n, model, finish_rows):
        outs = svc.front_batch(model, [call.blobs.get(f"r{i}", b"") for i in range(n)], finish_rows)
        items, irs, answers = [], [], {}
        for i, o in enumerate(outs):
            if isinstance(o, Exception):
                items.append(error_fields(o))
            elif isinstance(o, Answered):  # answered whole here: the sealed answer, no IR
                items.append({"answered": True, "failed": o.failed})
                answers[f"r{i}"] = o.sealed
            else:
                items.append({"handle": o[0], "rows": int(o[1].shape[0]) if o[1].dim() else 0, "failed": o[2]})
                if o[1].numel():
                    irs.append(o[1])
        return {"items": items}, ({"ir": torch.cat(irs)} if irs else None), (answers or None)

    @ops.op("finish_batch", inline=True, handles=Strs(MAX_BATCH, 64, default=[]),
            rows=Ints(MAX_BATCH, 0, MAX_BATCH, default=[]))
    def finish_batch(call, handles, rows):
        with svc.clock.stage("op_finish_batch"):
            return _finish_batch(call, handles, rows)

    def _finish_batch(call, handles, rows):
        if len(rows) != len(handles):
            raise DataError("finish_batch: handles and rows must be lists of one length")
        scores = call.tensors.get("scores")
        total = sum(rows)
        if (scores is None and total) or (scores is not None and (scores.dim() != 2 or scores.shape[0] != total)):
            raise DataError("finish_batch: the scores must have one row per decoded image")
        items, blobs_out, row = [], {}, 0
        for i, (hd, r) in enumerate(zip(handles, rows)):
            try:
                part = scores[row:row + r] if r else torch.empty(0)
                blobs_out[f"r{i}"] = svc.finish(hd, part)
                items.append({"ok": True})
            except Exception as e:
                items.append(error_fields(e))
            row += r
        return {"items": items}, None, blobs_out

    @ops.op("abort", inline=True, handles=Strs(MAX_BATCH, 64, default=[]))
    def abort(call, handles):
        for hd in handles:
            svc.abort(hd)
        return {}

    @ops.op("evidence", nonce=Hex(0, 1024, default=b""), keys=Str(8, default=""))
    def evidence(call, nonce, keys):
        issued = svc.issue_nonce(nonce)
        pq = keys == "pq"  # also bind the hybrid key (crypto/suites.py)
        out = {"evidence": svc.evidence(issued, pq), "public_key": svc.public_key().hex(), "nonce": issued.hex()}
        if pq:
            out["pq_public_key"] = svc.pq_public_key().hex()
        return out

    @ops.op("stats", inline=True)
    def stats(call):
        return {"stages": svc.clock.snapshot()}

    @ops.op("deploy", model=_MODEL)
    def deploy(call, model):
        files = {k: v for k, v in call.blobs.items() if k not in ("key_release", "sealed")}
        out = svc.deploy(model, call.blobs.get("key_release", b""), files)
        heap.settle(again=True)  # the new deployment's objects join the frozen heap
        return {k: v for k, v in out.items() if k != "sealed"}, None, {"sealed": out["sealed"]}

    @ops.op("restore", model=_MODEL)
    def restore(call, model):
        files = {k: v for k, v in call.blobs.items() if k not in ("key_release", "sealed")}
        out = svc.restore(model, call.blobs.get("sealed", b""), files)
        heap.settle(again=True)
        return out

    @ops.op("identity", model=_MODEL)
    def identity(call, model):
        return {}, None, {"identity": svc.identity(model, call.blobs.get("request", b""))}

    @ops.op("delete", model=_MODEL)
    def delete(call, model):
        return svc.delete(model, call.blobs.get("command", b""))

    return ops


def _add_arguments(p) -> None:
    p.add_argument("--replay-window", type=float, default=120.0)
    p.add_argument("--allow-factory", action="append", default=[],
                   help="a model factory 'package.module:function' this enclave may build (measured)")
    p.add_argument("--backnet-copy-max-bytes", type=int, default=NCHW_COPY_MAX_BYTES,
                   help="largest BackNet of which this enclave keeps a second, NCHW copy (serve/placement.py)")


def _config(args) -> dict:
    from ..models.servable import enclave_config

    return enclave_config(args.allow_factory)  # part of the measurement (sim); argv under Gramine


def _build(backend, args, config):
    from .enclave import EnclaveService

    svc = EnclaveService(backend, replay_window_s=args.replay_window,
                         allowed_factories=config.get("allowed_factories", ()),
                         nchw_copy_max_bytes=args.backnet_copy_max_bytes)
    heap.observe(svc.clock)  # collections timed as stages gc_gen0..2 (the "stats" op)
    public_key = svc.public_key().hex()
    suites = sorted(svc.keys.accepted)
    return register_ops(OpRegistry(), svc), lambda: {"public_key": public_key, "suites": suites, "models": svc.models()}


APP = WorkerApp(prog="enclaveml.serve.worker", build=_build, add_arguments=_add_arguments, config=_config,
                inline_when_idle=small_front_batch)


def main(argv: list[str] | None = None) -> None:
    run_worker(APP, argv)


if __name__ == "__main__":
    main()
