"""The training host's disk: sealed instances, checkpoints and linkage stores of each run.

Trust side: host (untrusted). Everything written here is ciphertext made by the enclave, except
the BackNet checkpoint (the host's own half) and run status. Layout under the store folder:

    instances.db                  instances(seq, tag UNIQUE, owner, token): sealed instances
    runs/<run>/checkpoint.json    {"step", "enclave": file, "host": file, "sha256": {...}}
    runs/<run>/ckpt-<step>.enclave   sealed enclave state       (AES-256-GCM, enclave's state key)
    runs/<run>/ckpt-<step>.host      BackNet weights + momentum (safetensors)
    runs/<run>/linkage.db         sealed linkage records (linkage.LinkageStore)
    runs/<run>/final.sealed       the enclave's sealed release (model + linkage key)

A checkpoint is written file by file and published by atomically replacing checkpoint.json, so a
kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
import threading
from pathlib import Path

from ..errors import TamperedMessage, UserInputError

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or run_id in (".", ".."):
        raise UserInputError("run id: 1-64 letters, digits, '_', '.', '-'")
    return run_id


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class InstanceStore:
    """Sealed instances keyed by the enclave's keyed tag; insertion order kept."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(root / "instances.db"), check_same_thread=False)
        self._lock = threading.Lock()
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS instances (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "tag TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, token BLOB NOT NULL)")

    def add(self, tag: str, owner: str, token: bytes) -> str:
        """'accepted' (new), 'exists' (same contributor sent it before) or 'duplicate' (someone else's)."""
        with self._lock, self._db:
            row = self._db.execute("SELECT owner FROM instances WHERE tag=?", (tag,)).fetchone()
            if row is not None:
                return "exists" if hmac.compare_digest(row[0], owner) else "duplicate"
            self._db.execute("INSERT INTO instances (tag, owner, token) VALUES (?, ?, ?)", (tag, owner, token))
            return "accepted"

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def count_by_owner(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT owner, COUNT(*) FROM instances GROUP BY owner").fetchall())

    def iter_chunks(self, size: int = 1000):
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute("SELECT seq, tag, token FROM instances WHERE seq > ? ORDER BY seq LIMIT ?",
                                        (last, size)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [(t, bytes(tok)) for _, t, tok in rows]


class RunStore:
    """One run's folder: checkpoints, linkage store, sealed release, status."""

    def __init__(self, root: Path, run_id: str):
        self.dir = root / "runs" / check_run_id(run_id)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def linkage_path(self) -> Path:
        return self.dir / "linkage.db"

    def save_checkpoint(self, step: int, enclave_token: bytes, host_state: bytes) -> None:
        enc, host = f"ckpt-{step}.enclave", f"ckpt-{step}.host"
        _atomic_write(self.dir / enc, enclave_token)
        _atomic_write(self.dir / host, host_state)
        old = self._pointer()
        ptr = {"step": step, "enclave": enc, "host": host,
               "sha256": {enc: hashlib.sha256(enclave_token).hexdigest(), host: hashlib.sha256(host_state).hexdigest()}}
        _atomic_write(self.dir / "checkpoint.json", json.dumps(ptr).encode())
        if old and old.get("step") != step:
            for name in (old.get("enclave"), old.get("host")):
                if name:
                    (self.dir / name).unlink(missing_ok=True)

    def _pointer(self) -> dict | None:
        try:
            return json.loads((self.dir / "checkpoint.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def load_checkpoint(self) -> tuple[int, bytes, bytes] | None:
        ptr = self._pointer()
        if ptr is None:
            return None
        enc = (self.dir / ptr["enclave"]).read_bytes()
        host = (self.dir / ptr["host"]).read_bytes()
        for name, data in ((ptr["enclave"], enc), (ptr["host"], host)):
            if hashlib.sha256(data).hexdigest() != ptr["sha256"][name]:
                raise TamperedMessage(f"checkpoint file {name} does not match its hash")
        return int(ptr["step"]), enc, host

    def save_final(self, final: bytes) -> None:
        _atomic_write(self.dir / "final.sealed", final)

    def load_final(self) -> bytes | None:
        try:
            return (self.dir / "final.sealed").read_bytes()
        except FileNotFoundError:
            return None
