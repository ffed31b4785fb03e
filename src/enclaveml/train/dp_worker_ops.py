"""The enclave worker's ops for data-parallel CalTrain (`dp_*`), as one block the worker dispatches to.

Trust side: enclave (moves bytes between the channel and `dp_enclave.DistributedEnclave`; no logic).
"""

from __future__ import annotations

from ..errors import UserInputError


def handle_dp(enc, op: str, h: dict, tensors: dict, blobs: dict):
    """One `dp_*` request -> (header, tensors, blobs)."""
    n = int(h.get("n", 0))
    if op == "dp_hello":
        return {}, None, {"hello": enc.dp_hello(int(h.get("rank", -1)), int(h.get("world", 0)))}
    if op == "dp_attest":
        return {"evidence": enc.dp_attest([blobs.get(f"h{i}", b"") for i in range(n)])}, None, None
    if op == "dp_verify":
        evs = h.get("evidences")
        if not isinstance(evs, list) or not all(isinstance(e, dict) for e in evs):
            raise UserInputError("dp_verify needs a list of evidence objects")
        enc.dp_verify(evs)
        return {}, None, None
    if op == "dp_lead_start":
        info, back, joins = enc.dp_lead_start(blobs.get("command", b""), blobs.get("checkpoint") or None)
        return info, None, {"back": back, **{f"j{r}": j for r, j in enumerate(joins, start=1)}}
    if op == "dp_join":
        info, back = enc.dp_join(blobs.get("join", b""))
        return info, None, {"back": back}
    if op == "dp_backward":
        return {}, None, {"grad": enc.dp_backward(tensors["grad"])}
    if op == "dp_apply":
        return {"step": enc.dp_apply([blobs.get(f"g{i}", b"") for i in range(n)])}, None, None
    if op == "dp_records":
        return {}, None, {"records": enc.dp_records(blobs.get("back", b""))}
    if op == "dp_finish":
        out = enc.dp_finish(blobs.get("back", b""), [blobs.get(f"p{i}", b"") for i in range(n)])
        return {"records": out["records"]}, None, {"meta": out["meta_token"], "final": out["final"]}
    raise UserInputError(f"unknown op {op!r}")
