"""The CalTrain enclave process: `python -m enclaveml.train.enclave_worker --channel-fd FD --tee sim --owner HEX [--plan JSON]`.

(Or `--channel-path PATH --no-shm` where the worker cannot inherit an fd, e.g. under Gramine.)

Trust side: enclave. Started by the training host through `runtime.handle.EnclaveHandle`; the
runtime's worker main (`runtime.enclave.main`) hardens the process before any secret exists,
then serves the ops registered here one at a time (a training run is a sequence: one pool
thread, requests in the order they came; the runtime's `ping` is answered on the reading thread,
so a long step does not look like a hung enclave). All logic is in `CalTrainEnclave`; this file
only moves bytes. The owner is measured (sim config; the manifest's argv under Gramine); the
training plan (`--plan`, canonical JSON; default the owner's open plan) is bound by the enclave
itself: report data, per-plan keys (plan.py).

Ops (header "op"): info, ping (the runtime's), evidence, ingest, add_data, start, forward, loss,
backward (`then_forward`: and the next step's forward), checkpoint, finish, records, release,
audit_records, audit, stats (per-stage time totals, `timing.StageClock`, answered on the reading
thread); with `--group` (one enclave
of a data-parallel group, dp_enclave.py) also the `dp_*` ops of dp_worker_ops.py. Failures
travel back as {"error": kind, "message": text}. `--allow-factory` names the user architectures
this enclave may build (measured configuration).
"""

from __future__ import annotations

from ..runtime.enclave.main import WorkerApp, run_worker
from ..runtime.enclave.ops import Bool, Hex, Int, OpRegistry, Strs

#: Largest number of uploads, instances or records in one op.
MAX_ITEMS = 100_000
_STEP = Int(-1, 2**40, default=-1)
_INDEX = Int(-1, 2**40, default=0)


def register_ops(ops: OpRegistry, enc) -> OpRegistry:
    """The CalTrain ops on `enc` (a `CalTrainEnclave`)."""

    @ops.op("evidence", nonce=Hex(0, 1024, default=b""))
    def evidence(call, nonce):
        return enc.evidence(nonce)

    @ops.op("ingest", n=Int(0, MAX_ITEMS, default=0))
    def ingest(call, n):
        res = enc.ingest([call.blobs.get(f"u{i}", b"") for i in range(n)])  # decoded as the plan says
        out_blobs = {}
        for i, r in enumerate(res):
            if "sealed" in r:
                out_blobs[f"s{i}"] = r.pop("sealed")
        return {"results": res}, None, out_blobs

    @ops.op("add_data", tags=Strs(MAX_ITEMS, 256, default=[]), reset=Bool())
    def add_data(call, tags, reset):
        items = [(t, call.blobs.get(f"s{i}", b"")) for i, t in enumerate(tags)]
        return {"count": enc.add_data(items, reset)}

    @ops.op("start")
    def start(call):
        info, back = enc.start(call.blobs.get("command", b""), call.blobs.get("checkpoint") or None)
        return info, None, ({"back": back} if back is not None else None)

    @ops.op("forward", step=_STEP)
    def forward(call, step):
        return {}, {"ir": enc.forward(step)}, None

    @ops.op("loss", tensors=("scores",))
    def loss(call):
        return {}, {"grad": enc.loss_grad(call.tensors["scores"])}, None

    @ops.op("backward", tensors=("grad",), then_forward=Bool())
    def backward(call, then_forward):
        """dL/dIR of the current step; with `then_forward`, also the next step's IR in the same
        answer (one round trip fewer per step; the host asks for it except before a checkpoint)."""
        step = enc.backward(call.tensors["grad"])
        if then_forward and step < enc.trainer.total_steps:
            return {"step": step}, {"ir": enc.forward(step)}, None
        return {"step": step}

    @ops.op("stats", inline=True)
    def stats(call):
        return {"stages": enc.clock.snapshot()}

    @ops.op("checkpoint")
    def checkpoint(call):
        return {"step": enc.trainer.step}, None, {"checkpoint": enc.checkpoint()}

    @ops.op("finish")
    def finish(call):
        out = enc.finish(call.blobs.get("back", b""))
        return {"records": out["records"]}, None, {"meta": out["meta_token"], "final": out["final"]}

    @ops.op("records", start=_INDEX, count=Int(0, MAX_ITEMS, default=0))
    def records(call, start, count):
        toks = enc.records(start, count)
        return {"n": len(toks)}, None, {f"r{i}": t for i, t in enumerate(toks)}

    @ops.op("release")
    def release(call):
        return {}, None, {"release": enc.release(call.blobs.get("command", b""), call.blobs.get("final", b""))}

    @ops.op("audit_records", start=Int(-1, 2**40, default=-1), n=Int(0, MAX_ITEMS, default=0))
    def audit_records(call, start, n):
        return {"count": enc.audit_records(start, [call.blobs.get(f"r{i}", b"") for i in range(n)])}

    @ops.op("audit")
    def audit(call):
        b = call.blobs
        return {}, None, {"audit": enc.audit(b.get("command", b""), b.get("final", b""), b.get("meta", b""))}

    return ops


def make_handler(enc):
    """A channel handler serving the CalTrain ops on `enc` (for in-process callers and tests)."""
    return _registry(enc).handle


def _registry(enc) -> OpRegistry:
    ops = register_ops(OpRegistry(), enc)
    if hasattr(enc, "dp_hello"):  # a DistributedEnclave
        from .dp_worker_ops import register_dp_ops

        register_dp_ops(ops, enc)
    return ops


def _add_arguments(p) -> None:
    p.add_argument("--owner", required=True, help="the run owner's Ed25519 public key, hex (measured config)")
    p.add_argument("--plan", default=None, help="the training plan, JSON (train/plan.py); default: the owner's "
                   "open plan")
    p.add_argument("--group", action="store_true", help="one enclave of a data-parallel group (dp_enclave.py)")
    p.add_argument("--allow-factory", action="append", default=[],
                   help="a user architecture (package.module:function) this enclave may build (measured config)")


def _config(args) -> dict:
    from .enclave import enclave_config

    return enclave_config(args.owner, args.allow_factory)  # part of the measurement (sim); argv under Gramine


def _build(backend, args, config):
    import json

    from .enclave import CalTrainEnclave
    from .plan import TrainingPlan

    plan = TrainingPlan.from_dict(json.loads(args.plan)) if args.plan else None
    factories = tuple(config.get("allowed_factories", ()))
    if args.group:
        from .dp_enclave import DistributedEnclave

        enc = DistributedEnclave(backend, owner=config["owner"], plan=plan, allowed_factories=factories)
    else:
        enc = CalTrainEnclave(backend, owner=config["owner"], plan=plan, allowed_factories=factories)
    _warm_up()
    return _registry(enc), lambda: {"app": "caltrain", "plan_hash": enc.plan_hash.hex()}


def _warm_up() -> None:
    """Pay torch's one-time lazy imports (the first optimizer pulls in torch._dynamo: seconds) at
    launch, not inside the first run's `start`."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9, nesterov=True)


#: One request at a time: a training run is a strict sequence of steps.
APP = WorkerApp(prog="enclaveml.train.enclave_worker", build=_build, add_arguments=_add_arguments,
                config=_config, max_threads=1, default_threads=1)


def main(argv: list[str] | None = None) -> None:
    run_worker(APP, argv)


if __name__ == "__main__":
    main()
