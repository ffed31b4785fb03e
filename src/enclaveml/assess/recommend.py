"""Choose the partition point: the shallowest that passes both privacy tests within budget (owner side).

Pure function over the per-point records of assessment.json, so the rule is testable on its own
and the owner can re-run it with another threshold, or override it with `--point`.

The KL test passes a point only when its verdict is certain at the configured confidence: the
interval of (leak_fraction - chance_fraction) lies wholly at or below the tolerance (`kl.ci`,
assess/confidence.py). An undecided point fails, and the reason says how many samples would
decide it. Records without `kl.ci` (older assessments) fall back to the point estimate `kl.leaks`.
"""

from __future__ import annotations


def _kl_reason(kl: dict) -> str | None:
    ci = kl.get("ci")
    shares = (f"own channels beat the uniform baseline on {kl['leak_fraction']:.0%} of samples, "
              f"another image's channels on {kl['chance_fraction']:.0%}")
    if ci is None:
        return f"KL test: {shares}" if kl.get("leaks") else None
    span = (f"difference {ci['difference']:+.2f}, {ci['confidence']:.0%} CI {ci['lower']:+.2f}..{ci['upper']:+.2f}, "
            f"tolerance {ci['tolerance']:.2f}")
    if ci["verdict"] == "leaks":
        return f"KL test leaks: {shares} ({span})"
    if ci["verdict"] == "undecided":
        n = ci.get("samples_needed")
        need = (f"a stable verdict needs about {n} samples (--samples {n})" if n is not None
                else "no sample size decides it: the estimate sits on the tolerance")
        return f"KL test undecided: {shares} ({span}); {need}"
    return None


def point_verdict(p: dict, ssim_threshold: float) -> list[str]:
    """Reasons this point fails (empty list: it passes)."""
    why = []
    kl = p.get("kl")
    reason = _kl_reason(kl) if kl is not None else None
    if reason:
        why.append(reason)
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
            undecided = _only_kl_undecided(points, verdicts, p["index"])
            if undecided:
                reason += (f"; point {undecided['index']} is shallower and fails only because its KL verdict is "
                           f"undecided: {verdicts[undecided['index']][0]}")
            return {"index": p["index"], "reason": reason, "overridden": False,
                    "undecided_shallower": undecided["index"] if undecided else None}
    undecided = _only_kl_undecided(points, verdicts, None)
    if undecided:
        return {"index": None, "overridden": False, "undecided_shallower": undecided["index"],
                "reason": "no assessed point passes both privacy tests within the budget; point "
                          f"{undecided['index']} fails only because its KL verdict is undecided: "
                          f"{verdicts[undecided['index']][0]}"}
    return {"index": None, "overridden": False,
            "reason": "no assessed point passes both privacy tests within the budget: assess deeper points, "
                      "raise the budget, or choose one with --point"}


def _only_kl_undecided(points: list[dict], verdicts: dict[int, list[str]], before: int | None) -> dict | None:
    """The shallowest point (before `before`) whose one failure is an undecided KL verdict."""
    for p in sorted(points, key=lambda q: q["index"]):
        if before is not None and p["index"] >= before:
            break
        ci = (p.get("kl") or {}).get("ci") or {}
        if ci.get("verdict") == "undecided" and len(verdicts[p["index"]]) == 1:
            return p
    return None
