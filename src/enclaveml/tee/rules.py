"""Policy rules shared by the verifiers (client/owner side): each raises PolicyViolation naming itself.

The message format is fixed so a refusal reads the same everywhere:
"policy rule <name>: <what the evidence says> <why that is refused>".
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta

from ..errors import EvidenceRejected, PolicyViolation
from .evidence import Claims
from .policy import Policy

#: How far in the future a timestamp may be before it counts as forged (clock skew allowance).
MAX_CLOCK_SKEW = timedelta(seconds=60)


def _short(values: list[str]) -> str:
    return "[" + ", ".join(values) + "]"


def hex_in(value: str, accepted: list[str]) -> bool:
    """Is `value` (hex) one of `accepted`? Constant-time per comparison, as for every measurement."""
    v = value.lower().encode()
    return any(hmac.compare_digest(v, a.lower().encode()) for a in accepted)


def allowed_backend(evidence_type: str, policy: Policy) -> None:
    if evidence_type not in policy.allowed_backends:
        raise PolicyViolation(
            f"policy rule allowed_backends: evidence type {evidence_type} is not in {_short(policy.allowed_backends)}"
        )


def report_data(claims: Claims, expected: bytes | None) -> None:
    """The report data must equal the expected binding exactly (constant-time compare).

    A mismatch is `EvidenceRejected`, not a policy matter: the evidence is not about our key and
    nonce, so it proves nothing about this session (stale, replayed, or for another key).
    """
    if expected is None:
        return
    if not hmac.compare_digest(bytes(claims.report_data), bytes(expected)):
        raise EvidenceRejected(
            f"report data {claims.report_data.hex()[:32]}... does not match the expected binding "
            f"{bytes(expected).hex()[:32]}... (evidence is not for this key and nonce)"
        )


def measurement(claims: Claims, policy: Policy) -> None:
    accepted = policy.measurements.get(claims.backend, [])
    if not accepted:
        raise PolicyViolation(f"policy rule measurements: no measurement is pinned for {claims.backend} evidence")
    if not hex_in(claims.measurement, accepted):
        raise PolicyViolation(
            f"policy rule measurements: {claims.backend} measurement {claims.measurement} is not in {_short(accepted)}"
            + (" (a server run with --allow-factory or --card measures its configuration too: write the policy "
               "with `enclaveml attest policy --allow-factory ...` or `--card ...` to match)"
               if claims.backend == "sim" else "")
        )


def tcb_status(claims: Claims, policy: Policy) -> None:
    if claims.tcb_status not in policy.accepted_tcb_statuses:
        adv = f" (advisories: {', '.join(claims.advisories)})" if claims.advisories else ""
        raise PolicyViolation(
            f"policy rule accepted_tcb_statuses: TCB status {claims.tcb_status} is not in "
            f"{_short(policy.accepted_tcb_statuses)}{adv}"
        )
    bad = sorted(set(claims.advisories) & set(policy.rejected_advisories))
    if bad:
        raise PolicyViolation(f"policy rule rejected_advisories: the platform is affected by {', '.join(bad)}")


def debug(claims: Claims, policy: Policy, is_debug: bool) -> None:
    if is_debug and not policy.allow_debug:
        raise PolicyViolation(f"policy rule allow_debug: the {claims.backend} evidence is from a debug enclave and allow_debug is false")


def max_age(claims: Claims, policy: Policy, now: datetime) -> None:
    if claims.timestamp is None:
        return
    if claims.timestamp > now + MAX_CLOCK_SKEW:
        raise PolicyViolation(
            f"policy rule max_age_s: evidence timestamp {claims.timestamp.isoformat()} is in the future (now {now.isoformat()})"
        )
    age = (now - claims.timestamp).total_seconds()
    if age > policy.max_age_s:
        raise PolicyViolation(f"policy rule max_age_s: evidence is {age:.0f} s old, more than {policy.max_age_s} s")


def min_svn_bytes(rule: str, got: bytes, minimum: str | None) -> None:
    """Component-wise SVN minimum (each byte is one component's security version)."""
    if minimum is None:
        return
    mn = bytes.fromhex(minimum)
    if len(got) != len(mn) or any(g < m for g, m in zip(got, mn)):
        raise PolicyViolation(f"policy rule {rule}: {got.hex()} is below {minimum} (component-wise)")
