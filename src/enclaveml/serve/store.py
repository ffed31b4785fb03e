"""The host's store of deployed bundles: public parts and ciphertext only, on untrusted disk.

Trust side: host. One folder per model id holding the bundle files exactly as uploaded
(manifest.json, manifest.sig, backnet.safetensors, frontnet.sealed, classmap.sealed) and the
enclave's sealed deployment (deployment.sealed: the model key sealed to the enclave's identity,
which only an enclave with the same measurement on the same platform can open). Never a
plaintext model key, a key release (it is useless after the enclave session anyway), an input or
a label.
Writes are atomic (temporary folder, then rename), so a crash leaves the old version or the new.
An upload being received is streamed to a hidden `.upload-*` file here (removed when the upload
ends, however it ends; leftovers of a crashed server are removed at start).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..models.bundle import BACKNET, CLASSMAP, FRONTNET, MANIFEST, SIGNATURE
from .protocol import check_model_id

SEALED_DEPLOYMENT = "deployment.sealed"
UPLOAD_PREFIX = ".upload-"
STORED_PARTS = (MANIFEST, SIGNATURE, BACKNET, FRONTNET, CLASSMAP, SEALED_DEPLOYMENT)


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(UPLOAD_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def new_upload_path(self) -> Path:
        """A fresh file name for an upload being received (the caller removes it)."""
        return self.root / f"{UPLOAD_PREFIX}{os.urandom(8).hex()}"

    def _dir(self, model_id: str) -> Path:
        return self.root / check_model_id(model_id)

    def save(self, model_id: str, files: dict[str, bytes]) -> Path:
        target = self._dir(model_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=self.root))
        try:
            for name in STORED_PARTS:
                if name in files:
                    (tmp / name).write_bytes(files[name])
            old = None
            if target.exists():
                old = self.root / f".{model_id}.old.{os.getpid()}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load(self, model_id: str) -> dict[str, bytes]:
        """The stored files of one deployment (those present)."""
        d = self._dir(model_id)
        return {name: (d / name).read_bytes() for name in STORED_PARTS if (d / name).is_file()}

    def delete(self, model_id: str) -> None:
        shutil.rmtree(self._dir(model_id), ignore_errors=True)

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
