"""Linkage records and their store: which instance, from whom, with what fingerprint and label.

Trust side: the record format is pure; the enclave writes records and the owner (or an auditor
holding the linkage key) reads them. The store lives on untrusted disk, so each record's payload
is AES-256-GCM encrypted under the linkage key. What is in the clear and what is not:

    table records(seq INTEGER PRIMARY KEY, token BLOB)
    token = seal(linkage key, payload, aad = "caltrain/linkage" || store id || seq)
    payload = "CTL1" || label (u32) || dim (u32) || instance hash (32) || participant id (32)
              || signature (64) || fingerprint (dim float32, little-endian)

In the clear: the number of records and their order (= the enclave's instance order). Encrypted:
fingerprint, label, instance hash, participant id and signature. The seq in the AAD stops the
host moving a record to another row or another store; a `meta` row holds the store id and the
record count sealed under the same key, so a host that deletes or truncates records is caught.
SQLite by default; `postgresql://` URLs are planned (docs/caltrain.md) but not built.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..crypto import open_sealed, seal
from ..errors import TamperedMessage, UserInputError

_HEAD = struct.Struct("<4sII32s32s64s")
MAGIC = b"CTL1"


@dataclass(frozen=True)
class LinkageRecord:
    """One training instance as the tracer knows it."""

    fingerprint: np.ndarray  # float32 (dim,), unit norm
    label: int
    instance_hash: bytes
    participant: bytes  # 32-byte id = SHA-256 of the participant's Ed25519 key
    signature: bytes

    def to_bytes(self) -> bytes:
        fp = np.ascontiguousarray(self.fingerprint, dtype="<f4")
        return _HEAD.pack(MAGIC, self.label, fp.size, self.instance_hash, self.participant, self.signature) + fp.tobytes()

    @classmethod
    def from_bytes(cls, b: bytes) -> "LinkageRecord":
        if len(b) < _HEAD.size:
            raise TamperedMessage("linkage record is truncated")
        magic, label, dim, h, pid, sig = _HEAD.unpack_from(b)
        if magic != MAGIC or len(b) != _HEAD.size + 4 * dim:
            raise TamperedMessage("linkage record has a bad layout")
        fp = np.frombuffer(b, dtype="<f4", offset=_HEAD.size).astype(np.float32)
        return cls(fp, label, h, pid, sig)


def records_to_arrays(records: list[LinkageRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,D fingerprints, N labels) for search."""
    if not records:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return (torch.from_numpy(np.stack([r.fingerprint for r in records])),
            torch.tensor([r.label for r in records], dtype=torch.long))


def _aad(seq: int, store_id: str) -> bytes:
    return b"caltrain/linkage\x00" + str(seq).encode() + b"\x00" + store_id.encode()


def seal_records(key: bytes, records: list[LinkageRecord], store_id: str) -> tuple[list[bytes], bytes]:
    """Enclave: each record sealed for row `seq`, plus the sealed summary (store id, count)."""
    tokens = [seal(key, r.to_bytes(), _aad(i, store_id)) for i, r in enumerate(records)]
    meta = json.dumps({"store_id": store_id, "count": len(records)}).encode()
    return tokens, seal(key, meta, b"caltrain/linkage-meta")


class LinkageStore:
    """An SQLite file of encrypted linkage records (one store per trained model)."""

    def __init__(self, path: str | Path, key: bytes | None = None):
        self.path = Path(path)
        self._key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, token BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, token BLOB NOT NULL)")
        self._db.commit()

    @classmethod
    def open_url(cls, url: str, key: bytes) -> "LinkageStore":
        if url.startswith(("postgres://", "postgresql://")):
            raise UserInputError("PostgreSQL linkage stores are not built yet; use an SQLite path")
        return cls(url.removeprefix("sqlite:///"), key)

    def write_all(self, records: list[LinkageRecord], store_id: str) -> None:
        """Seal and store `records` (owner/enclave side, holding the key)."""
        self.write_sealed(*seal_records(self._key, records, store_id))

    def write_sealed(self, tokens: list[bytes], meta_token: bytes) -> None:
        """Replace the store's content with already-sealed records (host side: no key needed)."""
        with self._db:
            self._db.execute("DELETE FROM records")
            self._db.executemany("INSERT INTO records (seq, token) VALUES (?, ?)", list(enumerate(tokens)))
            self._db.execute("INSERT OR REPLACE INTO meta (name, token) VALUES ('summary', ?)", (meta_token,))

    def read_all(self) -> list[LinkageRecord]:
        """Decrypt every record; TamperedMessage if any was changed, moved, added or removed."""
        row = self._db.execute("SELECT token FROM meta WHERE name='summary'").fetchone()
        if row is None:
            raise UserInputError(f"{self.path}: not a linkage store (no summary)")
        meta = json.loads(open_sealed(self._key, row[0], b"caltrain/linkage-meta"))
        sid = str(meta["store_id"])
        rows = self._db.execute("SELECT seq, token FROM records ORDER BY seq").fetchall()
        if len(rows) != meta["count"] or any(not hmac.compare_digest(str(s), str(i)) for i, (s, _) in enumerate(rows)):
            raise TamperedMessage("linkage store has missing or extra records")
        return [LinkageRecord.from_bytes(open_sealed(self._key, tok, _aad(s, sid))) for s, tok in rows]

    def close(self) -> None:
        self._db.close()
