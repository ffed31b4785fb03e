"""Evidence verifiers, one module per evidence type family (client/owner side).

Each verifier is a pure function object: quote bytes + collateral + a clock in, `Claims` out.
`verify` does the cryptography only (signatures, certificate chains, collateral) and raises
`EvidenceRejected`; `check_policy` applies the rules specific to that evidence type and raises
`PolicyViolation`. Modules in this package register themselves with `register_verifier`; a new
evidence type is a new file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Callable

from ...errors import EvidenceRejected
from ..evidence import Claims, Evidence
from ..policy import Policy

_REGISTRY: dict[str, "Verifier"] = {}
_loaded = False


class Verifier(ABC):
    """Verifies one family of evidence types."""

    @abstractmethod
    def verify(self, evidence: Evidence, now: datetime) -> Claims:
        """Check signatures/chain/collateral at time `now`; raise EvidenceRejected on any failure."""

    def complete(self, evidence: Evidence, policy: Policy) -> Evidence:
        """Evidence with whatever collateral the policy says to fetch (the only I/O step; default none)."""
        return evidence

    def check_policy(self, claims: Claims, policy: Policy, now: datetime) -> None:
        """Apply the policy rules specific to this evidence type; raise PolicyViolation."""

    def measurement_hint(self, claims: Claims) -> str:
        """Why a verified measurement may not be pinned, when the evidence can tell (e.g. the
        enclave configuration it carries), and how to make a matching policy; "" if unknown."""
        return ""


def register_verifier(*types: str) -> Callable[[type[Verifier]], type[Verifier]]:
    def deco(cls: type[Verifier]) -> type[Verifier]:
        inst = cls()
        for t in types:
            _REGISTRY[t] = inst
        return cls

    return deco


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for m in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{m.name}")
        _loaded = True


def get_verifier(evidence_type: str) -> Verifier:
    if evidence_type not in _REGISTRY:
        _load_all()
    v = _REGISTRY.get(evidence_type)
    if v is None:
        raise EvidenceRejected(f"no verifier for evidence type {evidence_type!r}")
    return v
