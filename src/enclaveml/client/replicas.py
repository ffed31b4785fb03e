"""The SDK against `enclaveml serve --replicas`: one `EnclaveClient` per replica, each attested
on its own (trust side: client and owner).

The front's /healthz (and its 421 answer to /v1/evidence) lists the replicas (URL, status, claimed enclave key); all of it is the
host's word, so it only says where to knock: each replica's client fetches fresh evidence,
verifies it against the same policy, asks the attested enclave for the model's identity and
checks it against the pin, exactly as against a single server. Requests are sealed to one
replica's key, so only that enclave can open them (a host that replays one at another replica
gets a decryption failure; a replay at the same replica meets its replay guard). `deploy` and
`delete` go to every replica that is up, each key release sealed to that replica's key.
Inference spreads calls round-robin over the replicas that are up. As on one server, the client
never resends images on the host's word: a failed call raises, and the next call may pick
another replica.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any, Sequence
from urllib.parse import urlsplit

import httpx

from .. import errors as E
from ..crypto.wirejson import loads_untrusted

#: How long the replica list is reused before the front is asked again.
REFRESH_S = 5.0
MAX_REPLICAS = 256


def parse_replicas(body: Any) -> list[dict] | None:
    """The replicas of a front's /healthz body ([{"id", "url", "status"}...]), or None if the body
    is not a front's. Hostile input: bad rows are dropped; only http(s) URLs are kept."""
    if not isinstance(body, dict) or not isinstance(body.get("replicas"), list):
        return None
    out = []
    for row in body["replicas"][:MAX_REPLICAS]:
        if not isinstance(row, dict) or not isinstance(row.get("url"), str) or not isinstance(row.get("id"), str):
            continue
        parts = urlsplit(row["url"])
        if parts.scheme not in ("http", "https") or not parts.netloc:
            continue
        out.append({"id": row["id"][:64], "url": row["url"].rstrip("/"), "status": str(row.get("status", ""))[:40]})
    return out


def probe(outer) -> tuple["ReplicaSet | None | bool", tuple | None]:
    """The first operation's evidence request, doubling as the probe for a replica front (which
    answers it 421 with its replica list): (ReplicaSet, None) for a front; (None, (nonce, answer,
    when)) for a server, whose evidence answer the attestation that follows uses (no extra
    request); (False, None) if nothing answered."""
    nonce = os.urandom(32)
    try:
        r = outer.http.get(outer.url + "/v1/evidence", params={"nonce": nonce.hex()})
    except httpx.HTTPError:
        return False, None
    if r.status_code == 421:
        try:
            rows = parse_replicas(loads_untrusted(r.content))
        except ValueError:
            rows = None
        if rows is not None:
            return ReplicaSet(outer, rows), None
    return None, (nonce, r, time.monotonic())


class ReplicaSet:
    """The replicas behind one front, as per-replica `EnclaveClient`s sharing the outer client's
    policy and HTTP pool. Thread-safe."""

    def __init__(self, outer, rows: list[dict]):
        self.outer = outer
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}  # url -> EnclaveClient
        self._rows: list[dict] = []
        self._at = 0.0
        self._rr = itertools.count()
        self._set_rows(rows)

    # -- the replica list -------------------------------------------------------------------

    def _set_rows(self, rows: list[dict]) -> None:
        from .sdk import EnclaveClient

        with self._lock:
            self._rows, self._at = rows, time.monotonic()
            for row in rows:
                if row["url"] not in self._clients:
                    c = EnclaveClient(row["url"], self.outer.policy, http=self.outer.http,
                                      reattest_s=self.outer.reattest_s, pad_requests=self.outer.pad_requests)
                    c._fanout = None  # a replica is a plain server: no probe
                    self._clients[row["url"]] = c
            live = {row["url"] for row in rows}
            for url in [u for u in self._clients if u not in live]:
                del self._clients[url]  # the shared HTTP pool stays open

    def refresh(self) -> list[dict]:
        try:
            r = self.outer.http.get(self.outer.url + "/healthz")
            rows = parse_replicas(loads_untrusted(r.content))
        except (httpx.HTTPError, ValueError):
            raise E.UserInputError(f"cannot reach the replica front {self.outer.url}") from None
        if rows is None:
            raise E.EnclaveMLError(f"{self.outer.url} no longer answers as a replica front")
        self._set_rows(rows)
        return rows

    def up(self) -> list:
        """Clients of the replicas that are up (policy synced with the outer client's)."""
        with self._lock:
            stale = time.monotonic() - self._at > REFRESH_S
        if stale:
            self.refresh()
        with self._lock:
            out = [self._clients[r["url"]] for r in self._rows if r["status"] == "ok" and r["url"] in self._clients]
        for c in out:
            c.policy = self.outer.policy
        if not out:
            raise E.EnclaveMLError(f"no replica behind {self.outer.url} is up")
        return out

    def _mark_down(self, client) -> None:
        with self._lock:
            self._rows = [{**r, "status": "unreachable"} if r["url"] == client.url else r for r in self._rows]

    def pick(self):
        clients = self.up()
        return clients[next(self._rr) % len(clients)]

    # -- operations -------------------------------------------------------------------------

    def attest(self):
        """Attest every replica that is up; returns the first one's `AttestedEnclave`."""
        return [c.attest() for c in self.up()][0]

    def attested(self):
        return self.pick().attested()

    def identity(self, model: str):
        return self.pick().identity(model)

    def deploy(self, bundle_dir: str | os.PathLike[str], model_key: bytes, owner_key, model_id: str | None) -> dict:
        """Deploy to every replica that is up, one after the other (each attested, each key
        release sealed to its own enclave key). Raises, naming the replicas that failed, if any did
        (those that succeeded keep the deployment)."""
        results, failed = [], []
        for c in self.up():
            try:
                results.append({"url": c.url, **c.deploy(bundle_dir, model_key, owner_key, model_id)})
            except E.EnclaveMLError as e:
                failed.append(f"{c.url}: {type(e).__name__}: {e}")
        if failed:
            raise E.EnclaveMLError(f"deploy failed on {len(failed)} of {len(failed) + len(results)} replicas: "
                                   + "; ".join(failed))
        self.outer.policy = self._clients_policy(results[0]["url"]) or self.outer.policy  # now pins the model
        return {**{k: v for k, v in results[0].items() if k != "url"}, "replicas": results}

    def _clients_policy(self, url: str):
        with self._lock:
            c = self._clients.get(url)
        return c.policy if c is not None else None

    def delete(self, model_id: str, owner_key) -> dict:
        results = [{"url": c.url, **c.delete(model_id, owner_key)} for c in self.up()]
        return {**{k: v for k, v in results[0].items() if k != "url"}, "replicas": results}

    def infer_each(self, images: Sequence[bytes], model: str, top_k: int, logits: bool) -> list:
        c = self.pick()
        try:
            out = c.infer_each(images, model, top_k, logits)
        except E.UserInputError:  # unreachable: the next call picks another replica
            self._mark_down(c)
            raise
        if out and all(isinstance(r, E.UserInputError) for r in out):
            self._mark_down(c)
        return out
