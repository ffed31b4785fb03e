"""The simulated TEE backend: the enclave worker as a hardened local process (enclave side).

Evidence is signed by a local platform Ed25519 key kept in `enclaveml.paths.home()/sim-platform`
(created on first use, mode 0600). Only the enclave worker and the owner's tooling open that
file; the untrusted host server never does. The measurement is a hash of the enclaveml package's
source and the enclave configuration, so a client computes the expected value from its own copy
(`expected_sim_measurement`), the analogue of checking a reproducible build's MRENCLAVE.

What sim does NOT give: hardware memory protection. Root or the kernel can read the worker's
memory, and the platform key is a file on the same machine. See docs/tee.md.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .. import paths
from ..errors import UserInputError
from . import sim_evidence
from .backend import EnclaveBackend, register_backend
from .evidence import REPORT_DATA_SIZE, Evidence
from .harden import harden_process

PLATFORM_DIR = "sim-platform"
SEED_FILE = "platform-ed25519.key"
MEASUREMENT_DOMAIN = b"enclaveml sim measurement v1\x00"
SEALING_SALT = b"enclaveml sim sealing v1"


def package_root() -> Path:
    """The installed enclaveml package directory (the 'enclave code' that is measured)."""
    return Path(__file__).resolve().parents[1]


def expected_sim_measurement(config: dict[str, Any] | None = None, root: Path | None = None) -> str:
    """SHA-256 over the enclave code and configuration, as hex.

    Code: every `.py` file under the enclaveml package, sorted by relative POSIX path, each fed as
    length-prefixed path then length-prefixed content (the prefixes make the encoding
    unambiguous). Configuration: canonical JSON of `config` (None means `{}`), length-prefixed.
    """
    root = root or package_root()
    h = hashlib.sha256(MEASUREMENT_DOMAIN)
    files = sorted((p for p in root.rglob("*.py") if "__pycache__" not in p.parts), key=lambda p: p.relative_to(root).as_posix())
    for p in files:
        rel = p.relative_to(root).as_posix().encode("utf-8")
        data = p.read_bytes()
        h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    cfg = sim_evidence.canonical_json(config or {})
    h.update(b"config" + len(cfg).to_bytes(8, "big") + cfg)
    return h.hexdigest()


def _platform_dir(platform_dir: Path | None) -> Path:
    return Path(platform_dir) if platform_dir is not None else paths.home() / PLATFORM_DIR


def _load_or_create_seed(platform_dir: Path | None = None) -> bytes:
    """The 32-byte platform secret, created atomically (temp file + link) with mode 0600."""
    d = _platform_dir(platform_dir)
    f = d / SEED_FILE
    if not f.exists():
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".seed-")  # mkstemp creates with mode 0600
        try:
            os.write(fd, os.urandom(32))
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, f)  # fails if another process won the race: then use theirs
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    mode = f.stat().st_mode & 0o777
    if mode & 0o077:  # like ssh with a private key: refuse rather than use a key others can read
        raise UserInputError(f"sim platform key {f} is readable by others (mode {mode:o}); chmod 600 it")
    seed = f.read_bytes()
    if len(seed) != 32:
        raise UserInputError(f"sim platform key {f} is corrupt ({len(seed)} bytes, want 32)")
    return seed


def _platform_key(platform_dir: Path | None = None) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_load_or_create_seed(platform_dir))


def sim_platform_public_key(platform_dir: Path | None = None) -> bytes:
    """The raw 32-byte Ed25519 public key of this machine's sim platform (owner tooling pins it)."""
    return _platform_key(platform_dir).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@register_backend("sim")
class SimBackend(EnclaveBackend):
    """The simulated TEE. Options: `config` (the enclave configuration that is measured), `platform_dir`
    (the platform key directory; default home()/sim-platform), `lock_memory` (try mlockall in
    `harden`), `clock` (a callable returning an aware datetime; for tests)."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        platform_dir: Path | str | None = None,
        lock_memory: bool = True,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = dict(config or {})
        sim_evidence.canonical_json(self.config)  # fail early on a config that cannot be measured
        self.platform_dir = Path(platform_dir) if platform_dir is not None else None
        self.lock_memory = lock_memory
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self._measurement: str | None = None

    def measurement(self) -> str:
        # Measured once per worker, like a TEE measures at launch: later edits to the source on
        # disk do not change what this running enclave reports.
        if self._measurement is None:
            self._measurement = expected_sim_measurement(self.config)
        return self._measurement

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        key = _platform_key(self.platform_dir)
        body = {
            "version": sim_evidence.VERSION,
            "backend": "sim",
            "measurement": self.measurement(),
            "report_data": bytes(report_data).hex(),
            "timestamp": self.clock().astimezone(timezone.utc).isoformat(),
            "config": self.config,
            "platform_key": key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex(),
        }
        sig = key.sign(sim_evidence.signed_message(body))
        return Evidence(backend="sim", quote=sim_evidence.encode_quote(body, sig))

    def sealing_key(self, label: bytes) -> bytes:
        """HKDF-SHA256(platform secret; salt fixed; info = measurement || label) -> 32 bytes.

        Why: the key depends on the platform secret (other machines cannot derive it) and on the
        measurement (changed enclave code cannot), like SGX's MRENCLAVE sealing policy.
        """
        info = bytes.fromhex(self.measurement()) + bytes(label)
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=SEALING_SALT, info=info).derive(
            _load_or_create_seed(self.platform_dir)
        )

    def harden(self) -> dict[str, Any]:
        return {"backend": "sim", **harden_process(lock=self.lock_memory)}


def sim_policy(config: dict[str, Any] | None = None, platform_dir: Path | None = None, **overrides: Any):
    """A policy that accepts only this machine's sim platform running this code with `config`."""
    from .policy import Policy

    fields: dict[str, Any] = {
        "allowed_backends": ["sim"],
        "measurements": {"sim": [expected_sim_measurement(config)]},
        "sim_platform_keys": [sim_platform_public_key(platform_dir).hex()],
    }
    fields.update(overrides)
    return Policy(**fields)
