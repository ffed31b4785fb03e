"""The `gramine-sgx` backend: the enclave worker inside an Intel SGX enclave under Gramine.

Two sides live here, kept apart:
- host side (untrusted, runs `enclaveml serve --tee gramine-sgx`): `generate_manifest` writes the
  Gramine manifest template for the worker, `build_enclave` renders and signs it with the Gramine
  tools, `launch_enclave` starts it; `read_sigstruct` gives the MRENCLAVE/MRSIGNER to pin in a policy;
- enclave side (inside Gramine): `GramineSgxBackend` gets DCAP quotes through Gramine's
  /dev/attestation pseudo-files and derives sealing keys from Gramine's MRENCLAVE sealing key.

The manifest is measured into MRENCLAVE, so everything a host could use to change the enclave's
behaviour is fixed in it: the command line (`loader.argv`, no host argv), the environment (no host
environment), the trusted files (hashed at signing: the Python runtime, its standard library,
site-packages including torch, and enclaveml), and debug mode off.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import UserInputError
from .backend import EnclaveBackend, register_backend
from .evidence import REPORT_DATA_SIZE, Evidence

GIB = 1 << 30
MIB = 1 << 20
#: What CPython + torch + enclaveml need in the enclave before any model (measured on CPU torch).
RUNTIME_BYTES = 2 * GIB
#: Threads Gramine must provide besides torch's: Python main, channel/IO threads, Gramine helpers.
BASE_THREADS = 8
TOOLS = ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx")
#: The serving worker's module; CalTrain's is `enclaveml.train.enclave_worker` (`worker_argv(module=...)`).
WORKER_MODULE = "enclaveml.serve.worker"
WORKER_ARGV = ["python3", "-m", WORKER_MODULE, "--tee", "gramine-sgx"]
SEALED_DIR = "/enclaveml-sealed"


# ---------------------------------------------------------------------------- sizing

def enclave_size_for(model_bytes: int, threads: int = 1, runtime_bytes: int = RUNTIME_BYTES) -> str:
    """Enclave size for Gramine: runtime + twice the model's memory (weights + activations, and
    the copies made while loading), rounded up to a power of two as SGX requires, as "NG"/"NM"."""
    if model_bytes < 0 or threads < 1:
        raise UserInputError("model bytes must be >= 0 and threads >= 1")
    need = runtime_bytes + 2 * model_bytes + threads * 8 * MIB  # 8 MiB stack per thread
    size = 1 << math.ceil(math.log2(need))
    return f"{size // GIB}G" if size >= GIB else f"{size // MIB}M"


def sizing_from_cost(cost: dict[str, Any]) -> tuple[int, int]:
    """(model bytes, torch threads) from a cost report: FrontNet parameter bytes plus peak activation
    bytes. Accepts the keys `frontnet_param_bytes`/`param_bytes`/`weight_bytes` (assess's cost) and `peak_activation_bytes`/
    `peak_memory_bytes`, and `threads`/`torch_threads` (default 1)."""

    def pick(*names: str) -> int | None:
        for n in names:
            if isinstance(cost.get(n), (int, float)):
                return int(cost[n])
        return None

    params = pick("frontnet_param_bytes", "param_bytes", "params_bytes", "weight_bytes")
    peak = pick("peak_activation_bytes", "peak_memory_bytes", "activation_bytes")
    if params is None and peak is None:
        raise UserInputError(
            "cost report has no frontnet_param_bytes/param_bytes or peak_activation_bytes/peak_memory_bytes"
        )
    return (params or 0) + (peak or 0), pick("threads", "torch_threads") or 1


# ---------------------------------------------------------------------------- manifest (host side)

def _python_paths() -> dict[str, Any]:
    """Where this interpreter's runtime and packages are (what the worker imports)."""
    paths = sysconfig.get_paths()
    exe = Path(os.path.realpath(sys.executable))
    stdlib = Path(paths["stdlib"]).resolve()
    site = sorted({str(Path(p).resolve()) for p in (paths["purelib"], paths["platlib"]) if Path(p).is_dir()})
    spec = importlib.util.find_spec("enclaveml")
    enclaveml_dir = Path(next(iter(spec.submodule_search_locations))).resolve()  # type: ignore[union-attr]
    torch_spec = importlib.util.find_spec("torch")
    torch_dir = Path(next(iter(torch_spec.submodule_search_locations))).resolve() if torch_spec else None  # type: ignore[union-attr]
    libpython = None
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        cand = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("INSTSONAME") or "")
        libpython = cand.resolve() if cand.is_file() else None
    return {
        "python": exe,
        "libpython": libpython,
        "stdlib": stdlib,
        "dynload": stdlib / "lib-dynload",
        "site_packages": [Path(s) for s in site],
        "enclaveml_parent": enclaveml_dir.parent,
        "enclaveml": enclaveml_dir,
        "torch": torch_dir,
    }


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def generate_manifest(
    *,
    enclave_size: str = "4G",
    max_threads: int = 16,
    argv: list[str] | None = None,
    allowed_files: list[str] | None = None,
    state_dir: str | Path | None = None,
    env: dict[str, str] | None = None,
    isv_prod_id: int = 1,
    isv_svn: int = 1,
    debug: bool = False,
) -> str:
    """The Gramine manifest template (Jinja for gramine-manifest) for the enclave worker.

    Only Gramine's own locations stay as template expressions (`gramine.libos`,
    `gramine.runtimedir()`, `arch_libdir`), always inside TOML strings, so the template itself
    is well-formed TOML; every Python path is resolved here from this interpreter.
    `allowed_files` are host files passed through unprotected (e.g. the encrypted model store:
    its confidentiality and integrity come from enclaveml's AEAD, not from Gramine).
    `state_dir` on the host backs an encrypted mount at /enclaveml-sealed, keyed with Gramine's
    MRENCLAVE sealing key (only this enclave on this CPU can read it).
    """
    if enclave_size[-1:] not in ("G", "M") or not enclave_size[:-1].isdigit():
        raise UserInputError(f"enclave size {enclave_size!r} must look like 4G or 512M")
    n = int(enclave_size[:-1])
    if n & (n - 1):
        raise UserInputError(f"enclave size {enclave_size!r} must be a power of two")
    p = _python_paths()
    argv = list(argv or WORKER_ARGV)
    code_dirs = [p["stdlib"], *p["site_packages"]]
    if not _under(p["enclaveml"], code_dirs):  # an editable install: trust its source tree too
        code_dirs.append(p["enclaveml"])
    runtime_files = [p["python"]] + ([p["libpython"]] if p["libpython"] else [])  # the interpreter and its libpython
    pythonpath = [str(p["stdlib"]), str(p["dynload"]), *map(str, p["site_packages"]), str(p["enclaveml_parent"])]
    environment = {
        "LD_LIBRARY_PATH": ":".join(["/lib", "{{ arch_libdir }}", "/usr/{{ arch_libdir }}"]
                                    + ([str(p["libpython"].parent)] if p["libpython"] else [])),
        "PYTHONHOME": str(p["stdlib"].parent.parent),
        "PYTHONPATH": ":".join(dict.fromkeys(pythonpath)),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(max(1, max_threads - BASE_THREADS)),
        "ENCLAVEML_TEE": "gramine-sgx",
        "ENCLAVEML_HOME": SEALED_DIR,
        **(env or {}),
    }
    mounts = [
        '{ path = "/lib", uri = "file:{{ gramine.runtimedir() }}" }',
        '{ path = "{{ arch_libdir }}", uri = "file:{{ arch_libdir }}" }',
        '{ path = "/usr/{{ arch_libdir }}", uri = "file:/usr/{{ arch_libdir }}" }',
        *(f"{{ path = {_toml_str(str(f))}, uri = {_toml_str('file:' + str(f))} }}" for f in runtime_files),
        *(f"{{ path = {_toml_str(str(d))}, uri = {_toml_str('file:' + str(d))} }}" for d in dict.fromkeys(code_dirs)),
        '{ type = "tmpfs", path = "/tmp" }',
    ]
    if state_dir is not None:
        mounts.append(
            f'{{ type = "encrypted", path = "{SEALED_DIR}", uri = {_toml_str("file:" + str(Path(state_dir).resolve()))}, key_name = "_sgx_mrenclave" }}'
        )
    trusted = [
        "file:{{ gramine.libos }}",
        "file:{{ gramine.runtimedir() }}/",
        "file:{{ arch_libdir }}/",
        "file:/usr/{{ arch_libdir }}/",
        *("file:" + str(f) for f in runtime_files),
        *("file:" + str(d) + "/" for d in dict.fromkeys(code_dirs)),
    ]
    allowed = list(allowed_files or [])
    lines = [
        "# Gramine manifest template for the enclaveml enclave worker (generated by enclaveml.tee.gramine).",
        "# Render: gramine-manifest -Darch_libdir=/lib/x86_64-linux-gnu worker.manifest.template worker.manifest",
        "# Sign:   gramine-sgx-sign --manifest worker.manifest --output worker.manifest.sgx",
        f"# Python runtime: {p['python']} (libpython {p['libpython']}, stdlib {p['stdlib']})",
        f"# enclaveml: {p['enclaveml']}",
        f"# torch: {p['torch']}",
        "",
        'loader.entrypoint.uri = "file:{{ gramine.libos }}"',
        f"libos.entrypoint = {_toml_str(str(p['python']))}",
        f"loader.argv = {json.dumps(argv)}",
        'loader.log_level = "error"',
        *(f"loader.env.{k} = {_toml_str(v)}" for k, v in environment.items()),
        "",
        "sys.enable_sigterm_injection = true",
        'sys.stack.size = "8M"',
        "",
        "fs.mounts = [\n  " + ",\n  ".join(mounts) + ",\n]",
        "",
        f"sgx.debug = {'true' if debug else 'false'}",
        "sgx.edmm_enable = false",
        f'sgx.enclave_size = "{enclave_size}"',
        f"sgx.max_threads = {int(max_threads)}",
        'sgx.remote_attestation = "dcap"',
        f"sgx.isvprodid = {int(isv_prod_id)}",
        f"sgx.isvsvn = {int(isv_svn)}",
        "sgx.trusted_files = [\n  " + ",\n  ".join(_toml_str(t) for t in trusted) + ",\n]",
        "sgx.allowed_files = [" + ("\n  " + ",\n  ".join(_toml_str(a) for a in allowed) + ",\n" if allowed else "") + "]",
        "",
    ]
    return "\n".join(lines)


def manifest_for_cost(cost: dict[str, Any], **kw: Any) -> str:
    """`generate_manifest` with enclave size and thread count taken from a model's cost report."""
    model_bytes, threads = sizing_from_cost(cost)
    return generate_manifest(enclave_size=enclave_size_for(model_bytes, threads), max_threads=BASE_THREADS + threads, **kw)


def cost_from_file(path: str | Path) -> dict[str, Any]:
    """The cost report from `path`: an assessment.json (the cost of its recommended point) or a
    bare cost report (a JSON object with the sizing keys of `sizing_from_cost`)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read the cost report {path}: {e}") from None
    if not isinstance(record, dict):
        raise UserInputError(f"{path}: not a JSON object")
    if "points" in record:  # an assessment record
        rec = record.get("recommended")
        point = next((p for p in record["points"] if isinstance(p, dict) and p.get("index") == rec), None)
        if rec is None or point is None or not isinstance(point.get("cost"), dict):
            raise UserInputError(f"{path}: the assessment has no recommended point with a cost report")
        return dict(point["cost"])
    return record


def worker_argv(channel_path: str | Path, threads: int = 2, torch_threads: int | None = None,
                allowed_factories: list[str] | tuple[str, ...] = (), module: str = WORKER_MODULE,
                extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """A worker's fixed command line in the manifest (measured): socket-path channel, inline
    tensors. `module`: which enclave worker (serving's by default, or CalTrain's); `extra_args`:
    its own flags (CalTrain: the owner and the plan), measured with the rest."""
    argv = ["python3", "-m", module, "--tee", "gramine-sgx", "--channel-path", str(channel_path), "--no-shm",
            "--threads", str(int(threads))]
    if torch_threads is not None:
        argv += ["--torch-threads", str(int(torch_threads))]
    for f in allowed_factories:
        argv += ["--allow-factory", f]
    return argv + [str(a) for a in extra_args]


def build_commands(workdir: str | Path, signing_key: str | Path | None = None,
                   arch_libdir: str = "/lib/x86_64-linux-gnu") -> list[list[str]]:
    """The commands `build_enclave` then `launch_enclave` run, in `workdir` (render, sign, start)."""
    wd = Path(workdir)
    tmpl, manifest, sgx = wd / "worker.manifest.template", wd / "worker.manifest", wd / "worker.manifest.sgx"
    return [
        ["gramine-manifest", f"-Darch_libdir={arch_libdir}", str(tmpl), str(manifest)],
        ["gramine-sgx-sign", "--manifest", str(manifest), "--output", str(sgx)]
        + (["--key", str(signing_key)] if signing_key else []),
        ["gramine-sgx", "worker"],
    ]


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise UserInputError(
            f"--tee gramine-sgx needs the Gramine tools ({', '.join(missing)} not found on PATH); "
            "install Gramine on an SGX host (see docs/tee.md, 'Running on an SGX host')"
        )


@dataclass(frozen=True)
class EnclaveBuild:
    workdir: Path
    manifest: Path
    manifest_sgx: Path
    sigstruct: Path
    mrenclave: str
    mrsigner: str


def read_sigstruct(data: bytes) -> dict[str, Any]:
    """MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN and debug bit of an SGX SIGSTRUCT (the .sig file).

    Layout (Intel SDM vol. 3D, 37.14): MODULUS at 128 (384 bytes, little-endian), ATTRIBUTES at
    928, ENCLAVEHASH at 960, ISVPRODID at 1024, ISVSVN at 1026. MRSIGNER is SHA-256 of the modulus
    bytes as stored.
    """
    import hashlib

    if len(data) != 1808:
        raise UserInputError(f"a SIGSTRUCT is 1808 bytes, got {len(data)}")
    return {
        "mrenclave": data[960:992].hex(),
        "mrsigner": hashlib.sha256(data[128:512]).hexdigest(),
        "isv_prod_id": int.from_bytes(data[1024:1026], "little"),
        "isv_svn": int.from_bytes(data[1026:1028], "little"),
        "debug": bool(data[928] & 0x02),
    }


def build_enclave(workdir: str | Path, manifest_template: str, signing_key: str | Path | None = None,
                  arch_libdir: str = "/lib/x86_64-linux-gnu") -> EnclaveBuild:
    """Render, then sign the manifest with the Gramine tools (host side). Needs Gramine installed."""
    require_tools()
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    tmpl, manifest, sgx = wd / "worker.manifest.template", wd / "worker.manifest", wd / "worker.manifest.sgx"
    tmpl.write_text(manifest_template)
    for cmd in build_commands(wd, signing_key, arch_libdir)[:2]:
        r = subprocess.run(cmd, cwd=wd, capture_output=True, text=True)
        if r.returncode != 0:
            raise UserInputError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    sig = wd / "worker.sig"
    info = read_sigstruct(sig.read_bytes())
    return EnclaveBuild(wd, manifest, sgx, sig, info["mrenclave"], info["mrsigner"])


def launch_enclave(build: EnclaveBuild, **popen: Any) -> subprocess.Popen:
    """Start the signed worker: `gramine-sgx worker` in the build directory (host side)."""
    require_tools()
    return subprocess.Popen(["gramine-sgx", "worker"], cwd=build.workdir, **popen)


def build_and_launch(workdir: str | Path, cost: dict[str, Any] | None = None, signing_key: str | Path | None = None,
                     **manifest_options: Any) -> tuple[EnclaveBuild, subprocess.Popen]:
    """What `enclaveml serve --tee gramine-sgx` calls: manifest from the cost report, sign, start."""
    require_tools()
    text = manifest_for_cost(cost, **manifest_options) if cost else generate_manifest(**manifest_options)
    build = build_enclave(workdir, text, signing_key)
    return build, launch_enclave(build)


# ---------------------------------------------------------------------------- backend (enclave side)

@register_backend("gramine-sgx")
class GramineSgxBackend(EnclaveBackend):
    """Runs inside the Gramine enclave. `attestation_dir` is /dev/attestation (a temp dir in tests).

    Evidence: write the 64 report-data bytes to `user_report_data`, read the DCAP quote from
    `quote` (Gramine asks the Quoting Enclave through the AESM/DCAP service). Collateral is not
    in the enclave: the host or the verifier attaches collateral fetched from a PCCS (it is signed
    by Intel, so who fetched it does not matter).
    """

    def __init__(self, attestation_dir: str | Path = "/dev/attestation") -> None:
        self.dir = Path(attestation_dir)

    def _read(self, name: str) -> bytes:
        try:
            return (self.dir / name).read_bytes()
        except OSError as e:
            raise UserInputError(
                f"gramine-sgx: cannot read {self.dir / name} ({e.strerror}); is this running inside Gramine-SGX "
                "with sgx.remote_attestation = \"dcap\"?"
            ) from None

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        kind = self._read("attestation_type").strip()
        if kind != b"dcap":
            raise UserInputError(f"gramine-sgx: attestation type is {kind.decode(errors='replace')!r}, want 'dcap'")
        try:
            (self.dir / "user_report_data").write_bytes(bytes(report_data))
        except OSError as e:
            raise UserInputError(f"gramine-sgx: cannot write user_report_data ({e.strerror})") from None
        return Evidence(backend="sgx", quote=self._read("quote"))

    def sealing_key(self, label: bytes) -> bytes:
        """HKDF-SHA256(Gramine's MRENCLAVE sealing key; info = label) -> 32 bytes.

        Gramine's `_sgx_mrenclave` key is EGETKEY(SEAL, MRENCLAVE policy): bound to this CPU and
        this exact enclave. HKDF widens the 128-bit key to 256 bits per label (domain separation).
        """
        base = self._read("keys/_sgx_mrenclave")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"enclaveml gramine sealing v1", info=bytes(label)).derive(base)

    def harden(self) -> dict[str, Any]:
        return {
            "backend": "gramine-sgx",
            "memory_protection": "SGX enclave memory (hardware encrypted and access-controlled)",
            "attestation_type": self._read("attestation_type").strip().decode(errors="replace"),
        }

    def measurement(self) -> str:
        """MRENCLAVE: the first 32 bytes of Gramine's `my_target_info` (SGX TARGETINFO.MEASUREMENT)."""
        ti = self._read("my_target_info")
        if len(ti) < 32:
            raise UserInputError("gramine-sgx: my_target_info is too short")
        return ti[:32].hex()
