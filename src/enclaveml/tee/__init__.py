"""Trusted execution: enclave backends (enclave side) and evidence verification with a policy (client/owner side).

    from enclaveml.tee import Evidence, bind_report_data, get_backend, Policy, load_policy, verify_evidence, Claims

Backends (`get_backend(name)`): "sim", "gramine-sgx", "tsm". Evidence types: "sim", "sgx", "tdx",
"sev-snp". See docs/tee.md.
"""

from .backend import EnclaveBackend, available_backends, get_backend, register_backend
from .evidence import EVIDENCE_TYPES, Claims, Evidence, bind_report_data, bind_report_data_pq
from .policy import Policy, load_policy, write_policy
from .verify import verify_claims_only, verify_evidence

__all__ = [
    "EVIDENCE_TYPES",
    "Claims",
    "EnclaveBackend",
    "Evidence",
    "Policy",
    "available_backends",
    "bind_report_data", "bind_report_data_pq",
    "get_backend",
    "load_policy",
    "register_backend",
    "verify_claims_only",
    "verify_evidence",
    "write_policy",
]
