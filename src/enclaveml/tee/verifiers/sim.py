"""Verifier for simulated-TEE evidence (client/owner side): Ed25519 over canonical JSON.

The signature proves the evidence came from a holder of the sim platform key; the policy's
`sim_platform_keys` decides whether that platform is trusted. The quote must be exactly the
canonical encoding of what it carries, so any changed byte is refused (not only those the
signature covers after parsing).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ...errors import EvidenceRejected, PolicyViolation
from .. import rules, sim_evidence
from ..evidence import REPORT_DATA_SIZE, Claims, Evidence
from ..policy import Policy
from . import Verifier, register_verifier

_BODY_FIELDS = {"version", "backend", "measurement", "report_data", "timestamp", "config", "platform_key"}


def _hex_field(body: dict, name: str, size: int) -> bytes:
    v = body.get(name)
    try:
        b = bytes.fromhex(v) if isinstance(v, str) else b""
    except ValueError:
        b = b""
    if len(b) != size or v != b.hex():
        raise EvidenceRejected(f"sim evidence field {name} is not {size} bytes of lowercase hex")
    return b


@register_verifier("sim")
class SimVerifier(Verifier):
    def verify(self, evidence: Evidence, now: datetime) -> Claims:
        raw = bytes(evidence.quote)
        if len(raw) > sim_evidence.MAX_QUOTE_BYTES:
            raise EvidenceRejected("sim evidence is too large")
        try:
            doc = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise EvidenceRejected(f"sim evidence is not JSON: {type(e).__name__}") from None
        if not isinstance(doc, dict) or set(doc) != {"body", "signature"} or not isinstance(doc["body"], dict):
            raise EvidenceRejected("sim evidence must be {body, signature}")
        body = doc["body"]
        if set(body) != _BODY_FIELDS:
            raise EvidenceRejected(f"sim evidence body has fields {sorted(body)}, want {sorted(_BODY_FIELDS)}")
        if body["version"] != sim_evidence.VERSION or body["backend"] != "sim":
            raise EvidenceRejected(f"unsupported sim evidence version {body['version']!r} / backend {body['backend']!r}")
        sig = _hex_field(doc, "signature", 64)
        pub = _hex_field(body, "platform_key", 32)
        measurement = _hex_field(body, "measurement", 32)
        report_data = _hex_field(body, "report_data", REPORT_DATA_SIZE)
        try:
            canonical = sim_evidence.encode_quote(body, sig)
        except (TypeError, ValueError) as e:
            raise EvidenceRejected(f"sim evidence cannot be canonicalised: {e}") from None
        if canonical != raw:
            raise EvidenceRejected("sim evidence is not in canonical form (altered after signing?)")
        try:
            Ed25519PublicKey.from_public_bytes(pub).verify(sig, sim_evidence.signed_message(body))
        except InvalidSignature:
            raise EvidenceRejected("sim evidence signature is invalid") from None
        try:
            ts = datetime.fromisoformat(body["timestamp"])
        except (TypeError, ValueError):
            raise EvidenceRejected("sim evidence timestamp is not ISO 8601") from None
        if ts.tzinfo is None:
            raise EvidenceRejected("sim evidence timestamp has no time zone")
        return Claims(
            backend="sim",
            measurement=measurement.hex(),
            report_data=report_data,
            tcb_status="Simulated",
            advisories=[],
            timestamp=ts.astimezone(timezone.utc),
            details={"platform_key": pub.hex(), "config": body["config"], "hardware_protection": False},
        )

    def measurement_hint(self, claims: Claims) -> str:
        """The sim measurement hashes code and configuration, and the evidence carries the
        configuration: say which one the enclave runs, whether this copy of enclaveml with that
        configuration gives the measurement, and the command that writes the matching policy."""
        from ..sim import expected_sim_measurement

        config = claims.details.get("config")
        if not isinstance(config, dict):
            return ""
        shown = sim_evidence.canonical_json(config).decode()
        try:
            same_code = expected_sim_measurement(config) == claims.measurement
        except (OSError, TypeError, ValueError):
            same_code = False
        command = "enclaveml attest policy --tee sim " + policy_flags(config) + "--out POLICY.toml"
        if same_code and config:
            return (f"the measurement differs because of the enclave configuration: the enclave runs this "
                    f"enclaveml with configuration {shown}; make the matching policy with: {command}")
        if same_code:
            return f"the enclave runs this enclaveml with no configuration; make the matching policy with: {command}"
        return (f"the enclave runs other enclaveml code than this copy, with configuration {shown}; for that "
                f"configuration on this code the policy is made with: {command}")

    def check_policy(self, claims: Claims, policy: Policy, now: datetime) -> None:
        key = claims.details["platform_key"]
        if not rules.hex_in(key, policy.sim_platform_keys):
            known = "[" + ", ".join(policy.sim_platform_keys) + "]"
            raise PolicyViolation(f"policy rule sim_platform_keys: platform key {key} is not in {known}")
        rules.max_age(claims, policy, now)


def policy_flags(config: dict) -> str:
    """`enclaveml attest policy` flags for a sim enclave configuration (trailing space if any)."""
    import shlex

    if not config:
        return ""
    factories = config.get("allowed_factories")
    if set(config) == {"allowed_factories"} and isinstance(factories, list) and all(isinstance(f, str) for f in factories):
        return "".join(f"--allow-factory {shlex.quote(f)} " for f in factories)
    return f"--config {shlex.quote(sim_evidence.canonical_json(config).decode())} "
