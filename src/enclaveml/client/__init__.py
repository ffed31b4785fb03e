"""The Infenclave client: attest an enclave, deploy bundles, send encrypted inference requests."""

from .sdk import AttestedEnclave, EnclaveClient

__all__ = ["EnclaveClient", "AttestedEnclave"]
