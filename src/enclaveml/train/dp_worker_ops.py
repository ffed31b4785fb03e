"""The enclave worker's ops for data-parallel CalTrain (`dp_*`), registered beside the others.

Trust side: enclave (moves bytes between the channel and `dp_enclave.DistributedEnclave`; no logic).
Arguments are range-checked by the runtime's op registry (`runtime.enclave.ops`) before a
handler runs.
"""

from __future__ import annotations

from ..errors import UserInputError
from ..runtime.enclave.ops import Int, OpRegistry

#: Largest data-parallel group (as `train serve --enclaves` allows).
MAX_GROUP = 64
_N = Int(0, MAX_GROUP, default=0)


def register_dp_ops(ops: OpRegistry, enc) -> OpRegistry:
    """The `dp_*` ops on `enc` (a `DistributedEnclave`)."""

    @ops.op("dp_hello", rank=Int(-1, MAX_GROUP, default=-1), world=Int(0, MAX_GROUP, default=0))
    def dp_hello(call, rank, world):
        return {}, None, {"hello": enc.dp_hello(rank, world)}

    @ops.op("dp_attest", n=_N)
    def dp_attest(call, n):
        return {"evidence": enc.dp_attest([call.blobs.get(f"h{i}", b"") for i in range(n)])}

    @ops.op("dp_verify")
    def dp_verify(call):
        evs = call.header.get("evidences")
        if not isinstance(evs, list) or len(evs) > MAX_GROUP or not all(isinstance(e, dict) for e in evs):
            raise UserInputError("dp_verify needs a list of evidence objects")
        enc.dp_verify(evs)
        return {}

    @ops.op("dp_lead_start")
    def dp_lead_start(call):
        info, back, joins = enc.dp_lead_start(call.blobs.get("command", b""), call.blobs.get("checkpoint") or None)
        return info, None, {"back": back, **{f"j{r}": j for r, j in enumerate(joins, start=1)}}

    @ops.op("dp_join")
    def dp_join(call):
        info, back = enc.dp_join(call.blobs.get("join", b""))
        return info, None, {"back": back}

    @ops.op("dp_backward", tensors=("grad",))
    def dp_backward(call):
        return {}, None, {"grad": enc.dp_backward(call.tensors["grad"])}

    @ops.op("dp_apply", n=_N)
    def dp_apply(call, n):
        return {"step": enc.dp_apply([call.blobs.get(f"g{i}", b"") for i in range(n)])}

    @ops.op("dp_records")
    def dp_records(call):
        return {}, None, {"records": enc.dp_records(call.blobs.get("back", b""))}

    @ops.op("dp_finish", n=_N)
    def dp_finish(call, n):
        out = enc.dp_finish(call.blobs.get("back", b""), [call.blobs.get(f"p{i}", b"") for i in range(n)])
        return {"records": out["records"]}, None, {"meta": out["meta_token"], "final": out["final"]}

    return ops
