"""Where enclaveml keeps state on a machine: one place, overridable for tests and deployments.

ENCLAVEML_HOME (default ~/.local/share/enclaveml): keys and platform state.
ENCLAVEML_CACHE (default ~/.cache/enclaveml): decoded data caches; safe to delete.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("ENCLAVEML_HOME", Path.home() / ".local" / "share" / "enclaveml"))


def cache() -> Path:
    return Path(os.environ.get("ENCLAVEML_CACHE", Path.home() / ".cache" / "enclaveml"))


def shared_dir() -> Path | None:
    """The read-only ../shared folder beside a developer checkout, if there is one."""
    env = os.environ.get("ENCLAVEML_SHARED")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared"
        if (parent / "pyproject.toml").exists() and cand.is_dir():
            return cand
    return None
