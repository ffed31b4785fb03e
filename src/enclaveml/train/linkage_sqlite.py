"""SQLite backend of the linkage store: one file per store (the default, and what the host serves).

Trust side: host. Moves sealed tokens only (see `linkage` for the format and its checks).

    records(seq INTEGER PRIMARY KEY, token BLOB)
    meta(name TEXT PRIMARY KEY, token BLOB)     one row, name = 'summary'
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


class SQLiteBackend:
    """Sealed linkage tokens in one SQLite file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path))
        self.conn.execute("CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, token BLOB NOT NULL)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, token BLOB NOT NULL)")
        self.conn.commit()

    def replace(self, tokens: list[bytes], meta_token: bytes) -> None:
        with self.conn:  # one transaction: readers see the old store or the new one
            self.conn.execute("DELETE FROM records")
            self.conn.executemany("INSERT INTO records (seq, token) VALUES (?, ?)", list(enumerate(tokens)))
            self.conn.execute("INSERT OR REPLACE INTO meta (name, token) VALUES ('summary', ?)", (meta_token,))

    def load(self) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        row = self.conn.execute("SELECT token FROM meta WHERE name='summary'").fetchone()
        rows = self.conn.execute("SELECT seq, token FROM records ORDER BY seq").fetchall()
        return (None if row is None else bytes(row[0])), [(int(s), bytes(t)) for s, t in rows]

    def close(self) -> None:
        self.conn.close()
