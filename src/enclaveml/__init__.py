"""enclaveml: confidential deep learning with enclave-partitioned models.

The Python API (each name is imported on first use, so `import enclaveml` stays fast):

    import enclaveml as eml
    a = eml.assess("darknet", "data/cifar10")                 # owner: where to split
    b = eml.partition("darknet", assessment=a, out="bundle", owner_key=eml.OwnerKey.generate())
    with eml.Client(url, "policy.toml") as c:                 # owner, then any client
        c.deploy(b, owner_key=key)
        c.infer("cat.jpg", model="darknet")
    eml.caltrain.contribute(...) / train(...) / trace(...)    # CalTrain's three parties

Owner side: ``enclaveml.assess`` (where to split), ``enclaveml.models`` (how to split).
Host side: ``enclaveml.serve`` (untrusted server). Enclave side: the worker in ``enclaveml.serve``
and ``enclaveml.train``. Pure protocol code: ``enclaveml.protocol`` (the messages),
``enclaveml.crypto`` and ``enclaveml.tee``; key files: ``enclaveml.keyfiles``.
The wrappers live in ``enclaveml.api``; docs/python-api.md describes each call.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (import time)

__version__ = "0.1.0"

#: Public name -> (module under enclaveml, attribute); None: the module itself.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "assess": ("assess", None),  # the package, made callable: it forwards to api.assessment.assess
    "Assessment": ("api.assessment", "Assessment"),
    "PointResult": ("api.assessment", "PointResult"),
    "Recommendation": ("api.assessment", "Recommendation"),
    "partition": ("api.bundles", "partition"),
    "Bundle": ("api.bundles", "Bundle"),
    "ShallowPartitionPoint": ("models.choose", "ShallowPartitionPoint"),
    "load_model": ("api.models", "load_model"),
    "OwnerKey": ("api.keys", "OwnerKey"),
    "Client": ("api.inference", "Client"),
    "Prediction": ("api.inference", "Prediction"),
    "Deployment": ("api.inference", "Deployment"),
    "local_server": ("api.servers", "local_server"),
    "sim_policy": ("api.servers", "sim_policy"),
    "caltrain": ("api.caltrain", None),
    "EnclaveMLError": ("errors", "EnclaveMLError"),
    "UserInputError": ("errors", "UserInputError"),
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .api import caltrain
    from .api.assessment import Assessment, PointResult, Recommendation, assess
    from .api.bundles import Bundle, partition
    from .api.inference import Client, Deployment, Prediction
    from .api.keys import OwnerKey
    from .api.models import load_model
    from .api.servers import local_server, sim_policy
    from .models.choose import ShallowPartitionPoint
    from typing import Any

    from .errors import EnclaveMLError, UserInputError


def __getattr__(name: str) -> "Any":
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'enclaveml' has no attribute {name!r}") from None
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
