"""Which model a CalTrain run trains: the project's one model specification (`models/spec.py`).

Trust side: owner (chooses it), host and enclave (both build the same architecture; the host
only its BackNet half). A zoo name with integer options (`darknet:width=16`) or a user's
factory (`mypkg.nets:build`, built only where the enclave's measured configuration allows it).
"""

from __future__ import annotations

from ..models.spec import ModelSpec

__all__ = ["ModelSpec"]
