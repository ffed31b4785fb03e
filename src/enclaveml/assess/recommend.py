"""Choose the partition point: the shallowest that passes both privacy tests within budget (owner side).

Pure function over the per-point records of assessment.json, so the rule is testable on its own
and the owner can re-run it with another threshold, or override it with `--point`.
"""

from __future__ import annotations


def point_verdict(p: dict, ssim_threshold: float) -> list[str]:
    """Reasons this point fails (empty list: it passes)."""
    why = []
    kl = p.get("kl")
    if kl is not None and kl.get("leaks"):
        why.append(f"KL test: a channel beats the uniform baseline on {kl['leak_fraction']:.0%} of samples "
                   f"(another image's channels: {kl['chance_fraction']:.0%})")
    inv = p.get("inversion")
    if inv is not None and inv.get("ssim") is not None and inv["ssim"] > ssim_threshold:
        why.append(f"inversion SSIM {inv['ssim']:.3f} > {ssim_threshold} ({inv.get('attack', 'attack')})")
    cost = p.get("cost")
    if cost is not None and not cost.get("fits", True):
        why.append(f"enclave memory {cost['enclave_bytes'] / 2**20:.1f} MiB > budget {cost['budget_bytes'] / 2**20:.1f} MiB")
    return why


def recommend(points: list[dict], ssim_threshold: float, override: int | None = None) -> dict:
    """{'index': k or None, 'reason': str, 'overridden': bool} for the list of point records."""
    verdicts = {p["index"]: point_verdict(p, ssim_threshold) for p in points}
    if override is not None:
        if override not in verdicts:
            from ..errors import PartitionError

            raise PartitionError(f"--point {override} was not assessed; assessed points: {sorted(verdicts)}")
        fails = verdicts[override]
        reason = "chosen by the owner" + (f"; it fails: {'; '.join(fails)}" if fails else "; it passes every test")
        return {"index": override, "reason": reason, "overridden": True}
    for p in sorted(points, key=lambda q: q["index"]):
        if not verdicts[p["index"]]:
            shallower = [q["index"] for q in points if q["index"] < p["index"]]
            inv = (p.get("inversion") or {}).get("ssim")
            reason = (f"shallowest point passing the KL test and inversion SSIM <= {ssim_threshold} within the "
                      f"enclave budget" + (f" (inversion SSIM {inv:.3f})" if inv is not None else ""))
            if shallower:
                first = min(shallower)
                reason += f"; point {first} fails: {'; '.join(verdicts[first])}"
            return {"index": p["index"], "reason": reason, "overridden": False}
    return {"index": None, "overridden": False,
            "reason": "no assessed point passes both privacy tests within the budget: assess deeper points, "
                      "raise the budget, or choose one with --point"}
