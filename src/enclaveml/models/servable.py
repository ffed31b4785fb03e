"""Which architectures a server builds: the zoo, plus factories the operator allowed by name.

Trust side: host and enclave (the serving enclave's allow-list is part of its measured
configuration, `enclave_config`). Not a wire format: the request and upload messages are in
`enclaveml.protocol`; this is the policy applied to an uploaded manifest's `arch`.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError


def check_servable_arch(arch: dict, allowed_factories: "tuple[str, ...] | frozenset[str]" = ()) -> None:
    """Only zoo architectures are built by the server (host and enclave), plus the factories the
    operator allowed by exact name (`serve --allow-factory`, part of the enclave's measured
    configuration: see `enclave_config`).

    Why: a manifest's `{"factory": "module:function", "kwargs": ...}` makes `build_arch` import
    and call any function the uploader names (e.g. `os:system`), in the host and, worse, in the
    enclave, which holds other owners' keys. Signing proves who uploaded, not that it is safe.
    """
    from . import zoo

    if not isinstance(arch, dict):
        raise UserInputError("arch must be an object")
    if "zoo" in arch and set(arch) <= {"zoo", "kwargs"} and str(arch.get("zoo")) in zoo.ZOO:  # options: check_arch
        return
    if ("factory" in arch and set(arch) <= {"factory", "kwargs"} and isinstance(arch["factory"], str)
            and arch["factory"] in frozenset(allowed_factories)):
        return
    raise UserInputError("only zoo architectures ({'zoo': name}) can be served"
                         + (" and the allowed factories" if allowed_factories else "")
                         + f"; known: {', '.join(sorted(zoo.ZOO))}")


def check_factory_names(names: "list[str] | tuple[str, ...]") -> tuple[str, ...]:
    """Validate `--allow-factory` values ('package.module:function'); sorted, without repeats."""
    from .bundle import check_arch

    for name in names:
        check_arch({"factory": name})  # UserInputError unless it looks like package.module:function
    return tuple(sorted(set(names)))


def enclave_config(allowed_factories: "tuple[str, ...] | list[str]" = ()) -> dict[str, Any]:
    """The serving enclave's measured configuration (sim backend: hashed into the measurement that
    clients pin; `enclaveml attest policy --tee sim --config JSON` with the same JSON). Empty by
    default, so a server without `--allow-factory` keeps the plain code measurement."""
    names = check_factory_names(list(allowed_factories))
    return {"allowed_factories": list(names)} if names else {}
