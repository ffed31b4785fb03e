"""The host's store of deployed bundles: public parts and ciphertext only, on untrusted disk.

Trust side: host. One folder per deployment, `OWNERHEX/name/` (names are scoped by owner, like the
enclave's deployments), holding the bundle files exactly as uploaded (manifest.json, manifest.sig,
backnet.safetensors, frontnet.sealed, classmap.sealed, head.sealed if any) and the enclave's sealed
deployment (deployment.sealed: the model key sealed to the enclave's identity, which only an
enclave with the same measurement on the same platform can open). Never a plaintext model key, a
key release (it is useless after the enclave session anyway), an input or a label.
Writes are atomic (temporary folder, then rename), so a crash leaves the old version or the new.
The host may of course wipe or edit all of it: the enclave opens only what it sealed, and clients
check the identity of what it serves against their pins.
An upload being received is streamed to a hidden `.upload-*` file here (removed when the upload
ends, however it ends; leftovers of a crashed server are removed at start).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..models.bundle import BACKNET, CLASSMAP, FRONTNET, HEAD, MANIFEST, SIGNATURE
from ..protocol.identity import ModelRef

SEALED_DEPLOYMENT = "deployment.sealed"
UPLOAD_PREFIX = ".upload-"
STORED_PARTS = (MANIFEST, SIGNATURE, BACKNET, FRONTNET, CLASSMAP, HEAD, SEALED_DEPLOYMENT)


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(UPLOAD_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def new_upload_path(self) -> Path:
        """A fresh file name for an upload being received (the caller removes it)."""
        return self.root / f"{UPLOAD_PREFIX}{os.urandom(8).hex()}"

    def _dir(self, ref: ModelRef) -> Path:
        return self.root / ref.owner / ref.name

    def save(self, ref: ModelRef, files: dict[str, bytes]) -> Path:
        target = self._dir(ref)
        target.parent.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{ref.name}.", dir=target.parent))
        try:
            for name in STORED_PARTS:
                if name in files:
                    (tmp / name).write_bytes(files[name])
            old = None
            if target.exists():
                old = target.parent / f".{ref.name}.old.{os.getpid()}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load(self, ref: ModelRef) -> dict[str, bytes]:
        """The stored files of one deployment (those present)."""
        d = self._dir(ref)
        return {name: (d / name).read_bytes() for name in STORED_PARTS if (d / name).is_file()}

    def delete(self, ref: ModelRef) -> None:
        shutil.rmtree(self._dir(ref), ignore_errors=True)

    def models(self) -> list[ModelRef]:
        """Every stored deployment (folders that are not a valid OWNERHEX/name are ignored)."""
        out = []
        for owner in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for d in sorted(p for p in owner.iterdir() if p.is_dir() and not p.name.startswith(".")):
                try:
                    out.append(ModelRef(owner.name, d.name))
                except Exception:  # noqa: BLE001 (a stray folder on untrusted disk)
                    continue
        return out
