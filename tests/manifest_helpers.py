"""Helpers shared by the Gramine manifest tests: render a template the way gramine-manifest would
(for inspection only), check that a path is covered by the manifest's trusted files, and stand-in
Gramine tools that run the manifest's worker as a plain process (sim backend, no SGX)."""

from __future__ import annotations

import importlib.util
import os
import sys
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


FAKE_MANIFEST = "#!/bin/sh\n# stand-in gramine-manifest: -Darch_libdir=X TEMPLATE OUT\ncp \"$2\" \"$3\"\n"
FAKE_SIGN = f"""#!{sys.executable}
# stand-in gramine-sgx-sign: --manifest M --output OUT [--key K]; writes OUT and a SIGSTRUCT
import sys
a = sys.argv[1:]
open(a[a.index("--output") + 1], "wb").write(b"sgx")
sig = bytearray(1808)
sig[960:992] = bytes(range(32))
open("worker.sig", "wb").write(bytes(sig))
"""
FAKE_SGX = f"""#!{sys.executable}
# stand-in gramine-sgx: runs the manifest's worker argv as a plain process (sim backend, no SGX)
import os, sys, tomllib
m = tomllib.load(open("worker.manifest", "rb"))
argv = m["loader"]["argv"]
argv[argv.index("--tee") + 1] = "sim"
os.execv(sys.executable, [sys.executable, *argv[1:]])
"""


def fake_gramine_env(bin_dir: Path) -> dict[str, str]:
    """The environment with the stand-in Gramine tools first on PATH (written into `bin_dir`)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("gramine-manifest", FAKE_MANIFEST), ("gramine-sgx-sign", FAKE_SIGN), ("gramine-sgx", FAKE_SGX)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
