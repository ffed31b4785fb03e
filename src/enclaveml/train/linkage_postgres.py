"""PostgreSQL backend of the linkage store: many stores (one per trained model) in one database.

Trust side: host (or whoever runs the database). Moves sealed tokens only; the format and every
check live in `linkage`. Layout, keyed by store id so runs share two fixed tables:

    caltrain_linkage_records(store TEXT, seq INTEGER, token BYTEA, PRIMARY KEY (store, seq))
    caltrain_linkage_meta(store TEXT PRIMARY KEY, token BYTEA)

The store id is the run id the enclave sealed into the records' AAD and the summary, so a reader
of store X also refuses a summary sealed for another store. psycopg 3 is imported only here and
only when a `postgresql://` URL is opened. Values go in as query parameters (or COPY rows), never
into SQL text. The password in the URL is used to connect and appears in no message.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ..errors import TamperedMessage, UserInputError

RECORDS = "caltrain_linkage_records"
META = "caltrain_linkage_meta"
_STORE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_DDL_LOCK = 0x6361_6C74  # advisory lock key: one CREATE TABLE at a time across clients


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise UserInputError("PostgreSQL linkage stores need psycopg 3: pip install 'enclaveml[postgres]'") from None
    return psycopg


def parse_url(url: str, store: str | None) -> tuple[str, str, list[str], str]:
    """-> (conninfo URL for libpq, store id, password forms to scrub, the URL as messages show it)."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise UserInputError("linkage URL is malformed (postgresql://user@host:port/db?store=ID)") from None
    query = parse_qsl(u.query, keep_blank_values=True)
    in_url = [v for k, v in query if k == "store"]
    if len(in_url) > 1 or (in_url and store is not None and in_url[0] != store):
        raise UserInputError("linkage URL: name the store once (?store=ID or the store argument)")
    store = store if store is not None else (in_url[0] if in_url else None)
    if store is None:
        raise UserInputError("a PostgreSQL linkage store needs a store id: ?store=RUN_ID in the URL")
    if not isinstance(store, str) or not _STORE.fullmatch(store):
        raise UserInputError("linkage store id: 1-128 letters, digits, '_', '.', '-'")
    rest = [(k, v) for k, v in query if k != "store"]
    scrub = [p for p in (u.password, *(v for k, v in rest if k == "password")) if p]
    scrub += [unquote(p) for p in scrub]
    conninfo = f"{u.scheme}://{u.netloc}{u.path}" + (f"?{urlencode(rest)}" if rest else "")
    host = u.hostname or next((v for k, v in rest if k == "host"), "localhost")
    user = f"{u.username}@" if u.username else ""
    shown = f"{u.scheme}://{user}{host}{f':{port}' if port else ''}{u.path}"
    return conninfo, store, scrub, f"{shown} (store {store})"


class PostgresBackend:
    """Sealed linkage tokens of one store id, in tables shared with the database's other stores."""

    def __init__(self, url: str, store: str | None = None):
        psycopg = _psycopg()
        conninfo, self.store, scrub, self.where = parse_url(url, store)
        try:
            self.conn = psycopg.connect(conninfo, **({} if "connect_timeout" in conninfo else {"connect_timeout": 10}))
        except psycopg.Error as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            for secret in scrub:
                msg = msg.replace(secret, "***")
            raise UserInputError(f"{self.where}: cannot connect: {msg}") from None

    def _ensure_tables(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
        cur.execute(f"CREATE TABLE IF NOT EXISTS {RECORDS} (store TEXT NOT NULL, seq INTEGER NOT NULL, "
                    "token BYTEA NOT NULL, PRIMARY KEY (store, seq))")
        cur.execute(f"CREATE TABLE IF NOT EXISTS {META} (store TEXT PRIMARY KEY, token BYTEA NOT NULL)")

    def replace(self, tokens: list[bytes], meta_token: bytes) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:  # readers see the old store or the new
            self._ensure_tables(cur)
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("caltrain/linkage/" + self.store,))
            cur.execute(f"DELETE FROM {RECORDS} WHERE store = %s", (self.store,))
            with cur.copy(f"COPY {RECORDS} (store, seq, token) FROM STDIN") as cp:
                for i, t in enumerate(tokens):
                    cp.write_row((self.store, i, bytes(t)))
            cur.execute(f"INSERT INTO {META} (store, token) VALUES (%s, %s) "
                        "ON CONFLICT (store) DO UPDATE SET token = EXCLUDED.token", (self.store, bytes(meta_token)))

    def load(self) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        psycopg = _psycopg()
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                # one statement = one snapshot: a concurrent replace is seen whole or not at all
                cur.execute(f"SELECT 0 AS kind, 0 AS seq, token FROM {META} WHERE store = %s UNION ALL "
                            f"SELECT 1, seq, token FROM {RECORDS} WHERE store = %s ORDER BY kind, seq",
                            (self.store, self.store))
                rows = cur.fetchall()
        except psycopg.errors.UndefinedTable:
            return None, []
        metas = [bytes(t) for k, _, t in rows if k == 0]
        if len(metas) > 1:
            raise TamperedMessage("linkage store has more than one summary")
        return (metas[0] if metas else None), [(int(s), bytes(t)) for k, s, t in rows if k == 1]

    def close(self) -> None:
        self.conn.close()
