"""`verify_evidence`: evidence + policy + expected report data + clock in, `Claims` out (client/owner side).

The order is fixed: the policy's backend rule first (cheap, and no parser runs on a type we
would refuse anyway), then the type's cryptographic verification (EvidenceRejected), then the
report-data binding (EvidenceRejected), then the measurement and the type's own rules
(PolicyViolation naming the rule).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ..errors import PolicyViolation
from . import rules
from .evidence import Claims, Evidence
from .policy import Policy
from .verifiers import get_verifier


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)


def verify_claims_only(evidence: Evidence, now: datetime | None = None) -> Claims:
    """Cryptographic verification with no policy: what the evidence says, if it is genuine.

    For inspection (`enclaveml attest verify` without a policy) only; never trust an enclave on
    this alone, since nothing checks what code it runs.
    """
    return get_verifier(evidence.backend).verify(evidence, _aware(now))


def verify_evidence(
    evidence: Evidence | dict[str, Any],
    policy: Policy,
    expected_report_data: bytes | None,
    now: datetime | None = None,
) -> Claims:
    """Verify `evidence` and apply `policy`; return the claims or raise EvidenceRejected/PolicyViolation.

    `expected_report_data` is `bind_report_data(enclave_public_key, nonce)`; pass None only when
    the binding is checked elsewhere. `now` pins the clock (naive means UTC).
    """
    if isinstance(evidence, dict):
        evidence = Evidence.from_dict(evidence)
    when = _aware(now)
    rules.allowed_backend(evidence.backend, policy)
    verifier = get_verifier(evidence.backend)
    evidence = verifier.complete(evidence, policy)
    claims = verifier.verify(evidence, when)
    rules.report_data(claims, expected_report_data)
    try:
        rules.measurement(claims, policy)
    except PolicyViolation as e:
        hint = verifier.measurement_hint(claims)
        if not hint:
            raise
        raise PolicyViolation(f"{e}; {hint}") from None
    verifier.check_policy(claims, policy, when)
    return claims
