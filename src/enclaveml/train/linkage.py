"""Linkage records and their store: which instance, from whom, with what fingerprint and label.

Trust side: the record format is pure; the enclave writes records and the owner (or an auditor
holding the linkage key) reads them. The store lives on untrusted storage, so each record's
payload is AES-256-GCM encrypted under the linkage key. What is in the clear and what is not:

    records(seq, token)   token = seal(linkage key, payload, aad = "caltrain/linkage" || seq || store id)
    meta('summary')       seal(linkage key, {"store_id", "count"}, aad = "caltrain/linkage-meta")
    payload = "CTL1" || label (u32) || dim (u32) || instance hash (32) || participant id (32)
              || signature (64) || fingerprint (dim float32, little-endian)

In the clear: the number of records and their order (= the enclave's instance order). Encrypted:
fingerprint, label, instance hash, participant id and signature. The seq in the AAD stops the
host moving a record to another row, the store id stops it moving one to another store, and the
sealed summary (store id, count) catches deleted, added or truncated records.

This module is the one place for the format and the crypto. Where the tokens live is a backend's
job (`LinkageBackend`): an SQLite file (`linkage_sqlite`, the default) or a PostgreSQL database
shared by many stores (`linkage_postgres`, for `postgresql://` URLs). Backends move opaque
tokens only; they never see a key or a plaintext.
"""

from __future__ import annotations

import hmac
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..crypto import open_sealed, seal
from ..errors import TamperedMessage, UserInputError

_HEAD = struct.Struct("<4sII32s32s64s")
MAGIC = b"CTL1"
META_AAD = b"caltrain/linkage-meta"
POSTGRES_SCHEMES = ("postgres://", "postgresql://")


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
    return tokens, seal(key, meta, META_AAD)


def open_records(key: bytes, meta_token: bytes | None, rows: list[tuple[int, bytes]], where: str = "linkage store",
                 expect_store: str | None = None) -> list[LinkageRecord]:
    """Owner/auditor: verify and decrypt what a backend returned, whichever backend it was.

    TamperedMessage if any record was changed, moved (to another row or from another store),
    added or removed, or if the summary belongs to another store than `expect_store`.
    """
    if meta_token is None:
        if rows:  # records without their sealed summary: someone removed it
            raise TamperedMessage("linkage store has records but no sealed summary")
        raise UserInputError(f"{where}: not a linkage store (no summary)")
    meta = json.loads(open_sealed(key, meta_token, META_AAD))
    sid = str(meta["store_id"])
    if expect_store is not None and not hmac.compare_digest(sid.encode(), expect_store.encode()):
        raise TamperedMessage("linkage store holds another store's summary")
    if len(rows) != meta["count"] or any(s != i for i, (s, _) in enumerate(rows)):
        raise TamperedMessage("linkage store has missing or extra records")
    return [LinkageRecord.from_bytes(open_sealed(key, tok, _aad(s, sid))) for s, tok in rows]


class LinkageBackend(Protocol):
    """Where sealed tokens live. Sees only opaque tokens; `where` never holds a password."""

    where: str

    def replace(self, tokens: list[bytes], meta_token: bytes) -> None:
        """Atomically make `tokens` (row seq = index) and the summary the store's whole content."""

    def load(self) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        """(summary token or None, [(seq, token)] in seq order), unverified."""

    def close(self) -> None: ...


def open_backend(where: str | Path, store: str | None = None) -> LinkageBackend:
    """A backend for an SQLite path (or `sqlite:///` URL) or a `postgresql://` URL."""
    if isinstance(where, str) and where.startswith(POSTGRES_SCHEMES):
        from .linkage_postgres import PostgresBackend

        return PostgresBackend(where, store)
    from .linkage_sqlite import SQLiteBackend

    if isinstance(where, str):
        where = where.removeprefix("sqlite:///")
    return SQLiteBackend(Path(where))


class LinkageStore:
    """Encrypted linkage records of one trained model, in SQLite (a path) or PostgreSQL (a URL).

    `store` names the store id the reader expects; PostgreSQL needs it (it is the row key shared
    databases are split by), SQLite checks it only when given (one file = one store).
    """

    def __init__(self, where: str | Path | LinkageBackend, key: bytes | None = None, store: str | None = None):
        self._backend = open_backend(where, store) if isinstance(where, (str, Path)) else where
        self._key = key
        self._store = store if store is not None else getattr(self._backend, "store", None)

    @classmethod
    def open_url(cls, url: str | Path, key: bytes | None = None, store: str | None = None) -> "LinkageStore":
        """`postgresql://user@host:port/db[?store=ID]`, `postgres://...`, `sqlite:///path` or a path."""
        return cls(url, key, store)

    @property
    def where(self) -> str:
        """The store's location for messages (password removed)."""
        return self._backend.where

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None for a database store."""
        return getattr(self._backend, "path", None)

    @property
    def _db(self):
        """The backend's live connection (tests use it to play the host tampering with rows)."""
        return self._backend.conn

    def write_all(self, records: list[LinkageRecord], store_id: str) -> None:
        """Seal and store `records` (owner/enclave side, holding the key)."""
        if self._key is None:
            raise UserInputError("writing linkage records needs the linkage key")
        self.write_sealed(*seal_records(self._key, records, store_id))

    def write_sealed(self, tokens: list[bytes], meta_token: bytes) -> None:
        """Replace the store's content with already-sealed records (host side: no key needed)."""
        self._backend.replace(list(tokens), meta_token)

    def read_sealed(self) -> tuple[list[bytes], bytes]:
        """The sealed tokens and summary as stored (host side: copy a store to another backend)."""
        meta, rows = self._backend.load()
        if meta is None:
            raise UserInputError(f"{self.where}: not a linkage store (no summary)")
        return [t for _, t in rows], meta

    def read_all(self) -> list[LinkageRecord]:
        """Decrypt every record; TamperedMessage if any was changed, moved, added or removed."""
        if self._key is None:
            raise UserInputError("reading linkage records needs the linkage key")
        meta, rows = self._backend.load()
        return open_records(self._key, meta, rows, self.where, self._store)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "LinkageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LinkageStore({self.where})"
