"""Helpers shared by the Gramine manifest tests: render a template the way gramine-manifest would
(for inspection only) and check that a path is covered by the manifest's trusted files."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def render(template: str) -> str:
    """What gramine-manifest would substitute (Gramine's own paths)."""
    return (template.replace("{{ gramine.libos }}", "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so")
            .replace("{{ gramine.runtimedir() }}", "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc")
            .replace("{{ arch_libdir }}", "/lib/x86_64-linux-gnu"))


def pkg_dir(name: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations))).resolve()


def covered(path: Path, trusted: list[str]) -> bool:
    for t in trusted:
        t = t.removeprefix("file:")
        if str(path) == t.rstrip("/") or (t.endswith("/") and str(path).startswith(t)):
            return True
    return False
