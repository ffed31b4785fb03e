"""The PostgreSQL linkage backend against a real throwaway server (skipped where none is installed).

The fixture runs initdb + pg_ctl from PATH or /usr/lib/postgresql/*/bin on a free 127.0.0.1
port with trust auth, its socket in the temp dir; as root it runs them as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from enclaveml import keyfiles
from enclaveml.errors import TamperedMessage, UserInputError
from enclaveml.train.linkage import LinkageRecord, LinkageStore, records_to_arrays
from enclaveml.train.trace import trace

KEY = bytes(range(32))


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all(os.access(Path(d) / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server():
    """(base URL without database, admin connection factory, socket dir) of a fresh server."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 not installed (pip install 'enclaveml[postgres]')")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb/pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` system user to start PostgreSQL as")
        prefix = ["runuser", "-u", "postgres", "--"]
    tmp = Path(tempfile.mkdtemp(prefix="enclaveml-pg-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    if prefix:
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    data, port = tmp / "data", _free_port()

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=60)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{tmp}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\n")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr.decode(errors='replace')[-500:]}")
    base = f"postgresql://postgres@127.0.0.1:{port}"
    try:
        yield base, lambda db="postgres": psycopg.connect(f"{base}/{db}", autocommit=True), tmp
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"],
                       capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg(pg_server):
    """(URL of a fresh database, a host-side autocommit connection to it)."""
    base, connect, _ = pg_server
    db = "t_" + uuid.uuid4().hex[:12]
    with connect() as admin:
        admin.execute(f"CREATE DATABASE {db}")  # db is ours: hex only
    host = connect(db)
    yield f"{base}/{db}", host
    host.close()


def _records(n: int = 40, dim: int = 8, seed: int = 0) -> list[LinkageRecord]:
    rng = np.random.default_rng(seed)
    fps = rng.normal(size=(n, dim)).astype(np.float32)
    fps /= np.linalg.norm(fps, axis=1, keepdims=True)
    return [LinkageRecord(fps[i], i % 3, i.to_bytes(32, "big"), bytes([65 + i % 4]) * 32, bytes([i % 251]) * 64)
            for i in range(n)]


def _same(a: list[LinkageRecord], b: list[LinkageRecord]) -> bool:
    return len(a) == len(b) and all(
        x.label == y.label and x.instance_hash == y.instance_hash and x.participant == y.participant
        and x.signature == y.signature and np.array_equal(x.fingerprint, y.fingerprint) for x, y in zip(a, b))


def _write(url: str, store: str, recs: list[LinkageRecord], key: bytes = KEY) -> None:
    with LinkageStore.open_url(url, key, store=store) as s:
        s.write_all(recs, store)


def _read(url: str, store: str, key: bytes = KEY) -> list[LinkageRecord]:
    with LinkageStore.open_url(url, key, store=store) as s:
        return s.read_all()


def test_roundtrip_encrypted_at_rest_and_url_forms(pg_server, pg):
    url, host = pg
    recs = _records()
    _write(url, "run-1", recs)
    assert _same(_read(url, "run-1"), recs)
    assert _same(_read(url + "?store=run-1", None), recs)  # store id in the URL
    assert _same(_read(url.replace("postgresql://", "postgres://"), "run-1"), recs)
    port, db, sock = url.rsplit(":", 1)[1].split("/")[0], url.rsplit("/", 1)[1], pg_server[2]
    sock_url = f"postgresql:///{db}?host={sock}&port={port}&user=postgres&store=run-1"  # libpq params pass through
    assert _same(_read(sock_url, None), recs)
    with LinkageStore(url + "?store=run-1", KEY) as s:  # every path-taking caller accepts a URL too
        assert _same(s.read_all(), recs) and s.path is None and "run-1" in s.where
    raw = b"".join(bytes(t) for (t,) in host.execute("SELECT token FROM caltrain_linkage_records"))
    assert len(raw) > 40 * 200 and b"A" * 32 not in raw and recs[5].instance_hash not in raw
    # rewriting a store replaces it whole
    _write(url, "run-1", recs[:7])
    assert _same(_read(url, "run-1"), recs[:7])


def test_tracer_same_on_sqlite_and_postgres(pg, tmp_path):
    url, _ = pg
    recs = _records(200, 16)
    lite = LinkageStore(tmp_path / "l.db", KEY)
    lite.write_all(recs, "run-2")
    with LinkageStore.open_url(url, KEY, store="run-2") as pgs:  # host copy: same sealed tokens, no key
        pgs.write_sealed(*lite.read_sealed())
        from_pg = pgs.read_all()
    from_lite = lite.read_all()
    lite.close()
    assert _same(from_pg, from_lite) and _same(from_pg, recs)
    a, b = records_to_arrays(from_lite), records_to_arrays(from_pg)
    for q in range(5):
        query = torch.from_numpy(recs[q * 7].fingerprint)
        y = recs[q * 7].label
        ra = trace(query, y, *a, [r.instance_hash for r in from_lite], [r.participant for r in from_lite])
        rb = trace(query, y, *b, [r.instance_hash for r in from_pg], [r.participant for r in from_pg])
        assert ra == rb and ra.neighbours


@pytest.mark.parametrize("attack", ["edit", "move", "delete", "add", "truncate", "drop-summary"])
def test_host_tampering_is_caught(pg, attack):
    url, host = pg
    _write(url, "run-3", _records(10))
    r = "caltrain_linkage_records"
    if attack == "edit":
        (tok,) = host.execute(f"SELECT token FROM {r} WHERE store='run-3' AND seq=4").fetchone()
        tok = bytearray(tok)
        tok[40] ^= 1
        host.execute(f"UPDATE {r} SET token=%s WHERE store='run-3' AND seq=4", (bytes(tok),))
    elif attack == "move":
        host.execute(f"UPDATE {r} SET token=(SELECT token FROM {r} WHERE store='run-3' AND seq=0) "
                     "WHERE store='run-3' AND seq=1")
    elif attack == "delete":
        host.execute(f"DELETE FROM {r} WHERE store='run-3' AND seq=9")
    elif attack == "add":
        host.execute(f"INSERT INTO {r} SELECT store, 10, token FROM {r} WHERE store='run-3' AND seq=0")
    elif attack == "truncate":
        host.execute(f"TRUNCATE {r}")
    else:
        host.execute("DELETE FROM caltrain_linkage_meta")
    with pytest.raises(TamperedMessage):
        _read(url, "run-3")


def test_records_from_another_store_in_the_same_database_are_caught(pg):
    url, host = pg
    _write(url, "run-a", _records(10, seed=1))
    _write(url, "run-b", _records(10, seed=2))  # same key: only the store id tells them apart
    r = "caltrain_linkage_records"
    host.execute(f"UPDATE {r} SET token=(SELECT token FROM {r} WHERE store='run-a' AND seq=3) "
                 "WHERE store='run-b' AND seq=3")
    with pytest.raises(TamperedMessage):
        _read(url, "run-b")
    assert len(_read(url, "run-a")) == 10  # the other store is untouched
    # a whole store passed off as another (summary and all records copied over) is caught too
    host.execute(f"DELETE FROM {r} WHERE store='run-b'")
    host.execute(f"INSERT INTO {r} SELECT 'run-b', seq, token FROM {r} WHERE store='run-a'")
    host.execute("UPDATE caltrain_linkage_meta SET token=(SELECT token FROM caltrain_linkage_meta "
                 "WHERE store='run-a') WHERE store='run-b'")
    with pytest.raises(TamperedMessage, match="another store"):
        _read(url, "run-b")


def test_wrong_key_missing_store_and_bad_names(pg):
    url, _ = pg
    _write(url, "run-4", _records(5))
    with pytest.raises(TamperedMessage):
        _read(url, "run-4", key=bytes(32))
    with pytest.raises(UserInputError, match="not a linkage store"):
        _read(url, "no-such-run")
    with pytest.raises(UserInputError, match="store id"):
        LinkageStore.open_url(url, KEY)
    with pytest.raises(UserInputError, match="store id"):
        LinkageStore.open_url(url, KEY, store="x'; DROP TABLE caltrain_linkage_meta; --")
    with pytest.raises(UserInputError, match="once"):
        LinkageStore.open_url(url + "?store=a", KEY, store="b")


def test_password_never_shown(pg_server, pg):
    url, _ = pg
    secret = "s3cret-Pw-91"
    with_pw = url.replace("postgres@", f"postgres:{secret}@")
    with LinkageStore.open_url(with_pw, KEY, store="run-5") as s:  # trust auth ignores the password
        s.write_all(_records(3), "run-5")
        assert secret not in s.where and secret not in repr(s)
    bad = with_pw.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(UserInputError) as e:
        LinkageStore.open_url(bad, KEY, store="run-5")
    assert secret not in str(e.value) and "cannot connect" in str(e.value)
    with pytest.raises(UserInputError) as e:
        LinkageStore.open_url(bad + f"?password={secret}", KEY, store="run-5")
    assert secret not in str(e.value)


def test_clear_error_without_psycopg(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(UserInputError, match=r"enclaveml\[postgres\]"):
        LinkageStore.open_url("postgresql://u@127.0.0.1:1/db", KEY, store="r")


def test_training_server_keeps_linkage_in_postgres(pg, tmp_path, cifar10_dir):
    """`train serve --linkage-url`: a real run's records land in PostgreSQL (none on the host's
    disk), the owner's release still carries a SQLite copy, and `trace --linkage URL` reads the
    database directly with the same answer."""
    from test_train_system import Server, _pin_policy

    from enclaveml.crypto import SigningKey
    from enclaveml.train import demo
    from enclaveml.train.owner import TracedModel, run
    from enclaveml.train.participant import contribute
    from enclaveml.train.partitioned import TrainConfig

    url, host_db = pg
    data = tmp_path / "data"
    demo.split_folder(cifar10_dir / "train", data, 2, 2)
    owner = keyfiles.load_or_create_signing_key(tmp_path / "owner.key").public_key().to_bytes().hex()
    srv = Server(tmp_path / "store", tmp_path / "home", owner, extra=("--linkage-url", url))
    try:
        _pin_policy(srv, tmp_path / "policy.toml")
        for i in (1, 2):
            contribute(data / f"participant{i}", srv.url, tmp_path / "policy.toml", tmp_path / f"p{i}.key")
        cfg = TrainConfig(epochs=1, batch=10, lr=0.05, seed=1)
        res = run(srv.url, tmp_path / "policy.toml", "darknet:width=4", 4, cfg, tmp_path / "owner.key",
                  tmp_path / "model", run_id="pg-run", poll=0.1)
    finally:
        srv.kill()
    assert res["state"] == "done"
    n = res["instances"]
    assert not list((tmp_path / "store").rglob("linkage.db"))  # nothing on the host's disk
    rows = host_db.execute("SELECT count(*) FROM caltrain_linkage_records WHERE store = %s", ("pg-run",)).fetchone()
    assert rows[0] == n
    image = next((data / "participant2").rglob("*.jpg")).read_bytes()
    from_copy = TracedModel(tmp_path / "model").trace(image, "cat", k=3)
    from_db = TracedModel(tmp_path / "model", linkage=url).trace(image, "cat", k=3)
    assert from_copy == from_db and len(from_db["neighbours"]) == 3
    host_db.execute("DELETE FROM caltrain_linkage_records WHERE store = %s AND seq = 3", ("pg-run",))
    with pytest.raises(TamperedMessage):
        TracedModel(tmp_path / "model", linkage=url)
