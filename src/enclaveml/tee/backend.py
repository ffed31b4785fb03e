"""The enclave backend interface and its registry (enclave side: what produces evidence).

A backend is where the enclave worker runs: `sim` (a hardened local process), `gramine-sgx`
(the worker inside an SGX enclave under Gramine), `tsm` (a TDX or SEV-SNP confidential VM through
Linux configfs-tsm). Each is one module that subclasses `EnclaveBackend` and registers its name,
the habit of Flower's strategies: a new backend is a new file, not an `if`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Callable

from ..errors import UserInputError
from .evidence import Evidence

_REGISTRY: dict[str, type["EnclaveBackend"]] = {}

#: Where each built-in backend lives, so `get_backend` imports only the one asked for
#: (the gramine and tsm modules touch no hardware on import, but there is no need to load them).
_BUILTIN_MODULES = {"sim": "enclaveml.tee.sim", "gramine-sgx": "enclaveml.tee.gramine", "tsm": "enclaveml.tee.tsm"}


class EnclaveBackend(ABC):
    """One way of running the enclave worker and getting attestation evidence for it."""

    #: The registry name ("sim", "gramine-sgx", "tsm").
    name: str = ""

    @abstractmethod
    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence binding these 64 bytes of report data (see `bind_report_data`)."""

    @abstractmethod
    def sealing_key(self, label: bytes) -> bytes:
        """A 32-byte key that only this enclave code on this platform can derive again."""

    @abstractmethod
    def harden(self) -> dict[str, Any]:
        """Lock the current process down; called first in the enclave worker. Returns what applied."""

    @abstractmethod
    def measurement(self) -> str:
        """This enclave's code identity as hex (what a verifier's policy pins)."""


def register_backend(name: str) -> Callable[[type[EnclaveBackend]], type[EnclaveBackend]]:
    """Class decorator: make a backend available to `get_backend(name)`."""

    def deco(cls: type[EnclaveBackend]) -> type[EnclaveBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def get_backend(name: str, **options: Any) -> EnclaveBackend:
    """The backend registered under `name`, constructed with `options`."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UserInputError(f"unknown TEE backend {name!r} (available: {', '.join(available_backends())})")
    return cls(**options)
