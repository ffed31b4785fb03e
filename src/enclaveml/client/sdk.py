"""The Infenclave client SDK: attest the enclave, deploy a bundle, run encrypted inference.

Trust side: client (and owner). Trusts nothing the server says until the enclave's evidence
verifies against the caller's policy; then encrypts to the attested key only. The host sees
ciphertext, sizes and timing. Before any image leaves, the client asks the attested enclave which
deployment it holds under the model's name and owner (the answer is sealed to this client, so the
host cannot forge it) and refuses one that does not match the policy's pin of that model (owner
key, bundle ids, smallest split); every request carries the pin for the enclave to check again,
and every answer names the deployment that produced it.

    from enclaveml.client import EnclaveClient
    c = EnclaveClient("http://127.0.0.1:8080", "policy.toml")
    c.deploy("bundles/darknet", model_key, owner_key)          # owner
    c.infer([open("cat.jpg", "rb").read()], model="darknet")  # anyone with the policy
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import httpx

from .. import errors as E
from ..crypto import SigningKey, frame_fresh, loads_untrusted, seal_key_release, seal_owner_command, seal_with
from ..crypto.suites import MLKEM768_X25519, POST_QUANTUM, PQ_PUBLIC_BYTES
from ..crypto.nonces import SUFFIX_BYTES as NONCE_SUFFIX_BYTES
from ..protocol import infer as protocol
from ..protocol.attest import EvidenceAnswer
from ..protocol.deploy import encode_upload
from ..protocol.identity import (ModelIdentity, ModelPin, ModelRef, Target, check_model_id, decode_identity,
                                 frame_target, identity_aad, infer_aad)
from ..timing import StageClock, now, since
from .keepalive import Answer, KeepAlivePost, usable_for

#: Send small requests at once: without TCP_NODELAY, headers and body written separately meet
#: Nagle's algorithm and the server's delayed ACK, adding ~40 ms to every request.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
#: How long an attestation is reused before the client asks for fresh evidence.
REATTEST_S = 300.0
#: How long the first operation's probe answer (evidence) may wait for the attestation that uses it.
PREFETCH_S = 10.0
#: One request carries at most this many images and (padded) bytes, within the server's default
#: `--max-request-bytes` (8 MiB + 4 KiB); a larger image goes alone.
BATCH_CHUNK = 64
BATCH_BYTES = 8 * 1024 * 1024


_UNKNOWN = object()


def _chunks(images: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = [[]]
    size = 0
    if not images:
        return []
    for img in images:
        n = len(img) + 16  # its bytes and its entry in the options
        if out[-1] and (len(out[-1]) >= BATCH_CHUNK or protocol.padded_payload_size(size + n + 256) > BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append(img)
        size += n
    return out


@dataclass(frozen=True)
class AttestedEnclave:
    """An enclave key the client verified evidence for, and what the evidence said."""

    public_key: bytes
    nonce: bytes
    claims: Any
    at: float
    #: Deployments whose identity this enclave reported and the pin accepted (name -> identity).
    identities: dict = field(default_factory=dict, compare=False, repr=False)
    #: The enclave's hybrid (ML-KEM-768 + X25519) key, when the policy asked for it and the
    #: evidence binds it (upper half of the report data).
    pq_public_key: bytes | None = None

    def recipient(self, suite: str) -> bytes:
        """The attested key a request in `suite` is sealed to."""
        if suite == MLKEM768_X25519:
            if self.pq_public_key is None:
                raise E.PolicyViolation("the policy names the hybrid suite, but this enclave's evidence binds no hybrid key")
            return self.pq_public_key
        return self.public_key


def _pin_key(pin: Any) -> "tuple | None":
    """A policy's pin of one model (its `models` entry) as a comparable value, for the target cache."""
    if not isinstance(pin, dict):
        return None
    return pin.get("owner"), tuple(pin.get("bundle_ids") or ()), pin.get("min_k")


def _json_body(r: httpx.Response, what: str = "answer") -> Any:
    """The JSON of a server answer (hostile bytes: bounded depth, finite numbers), or an
    `EnclaveMLError` (never a parser's own exception type)."""
    try:
        return loads_untrusted(r.content)
    except ValueError:
        raise E.EnclaveMLError(f"the server's {what} is not valid JSON") from None


def _error_from_response(r: "httpx.Response | Answer") -> E.EnclaveMLError:
    try:
        body = loads_untrusted(r.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        kind, msg = str(body.get("error", ""))[:100], str(body.get("message", ""))[:500]
    else:  # not JSON, or a JSON list / string / number
        kind, msg = "", r.content[:200].decode("utf-8", "replace")
    return error_from_kind(kind, msg, r.status_code)


def error_from_kind(kind: str, msg: str, status: int) -> E.EnclaveMLError:
    cls = getattr(E, kind, None)
    if isinstance(cls, type) and issubclass(cls, E.EnclaveMLError):
        return cls(f"server: {msg}")
    if kind == "PayloadTooLarge":
        return E.DataError(f"server: {msg}")
    return E.EnclaveMLError(f"server answered {status} {kind}: {msg}".rstrip(": "))


class EnclaveClient:
    """One server URL and one attestation policy. Thread-safe; reuses one HTTP connection pool."""

    def __init__(self, url: str, policy, timeout: float = 60.0, http: httpx.Client | None = None,
                 reattest_s: float = REATTEST_S, pad_requests: bool = True):
        from ..tee import Policy, load_policy

        self.url = url.rstrip("/")
        self.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        self.http = http or httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(socket_options=NODELAY))
        #: Inference POSTs through a kept-alive socket framed by h11 (client/keepalive.py) when this client owns
        #: its HTTP client and the URL is plain HTTP with no proxy; else None (all through httpx).
        self._posts = KeepAlivePost(self.url, timeout) if http is None and usable_for(self.url) else None
        self.reattest_s = reattest_s
        #: Pad each request to a size bucket (protocol.padded_payload_size) so that its length shows
        #: the host only the bucket of the image size; False sends exact sizes (less bandwidth).
        self.pad_requests = bool(pad_requests)
        self._attested: AttestedEnclave | None = None
        self._lock = threading.Lock()
        #: A `ReplicaSet` when `url` is an `enclaveml serve --replicas` front (client/replicas.py);
        #: None for a plain server; _UNKNOWN until the first operation asks.
        self._fanout: Any = _UNKNOWN
        self._prefetched: tuple | None = None  # (nonce, evidence answer, when) from the probe
        #: Per-stage totals of inference on this client: seal, http (the round trip), open.
        self.clock = StageClock()
        #: model name -> (the policy's pin of it, as a tuple, and its Target): built once, not per
        #: request; rebuilt whenever the policy's pin of that name differs.
        self._targets: dict[str, tuple[tuple, Target]] = {}
        #: Target -> answer identity fields its pin allowed (`protocol.decode_results`), bounded.
        self._allowed: dict[Target, dict] = {}

    def close(self) -> None:
        self.http.close()
        if self._posts is not None:
            self._posts.close()

    def __enter__(self) -> "EnclaveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.http.request(method, self.url + path, **kw)
        except httpx.HTTPError as e:
            raise E.UserInputError(f"cannot reach {self.url} ({type(e).__name__})") from None
        if r.status_code >= 400:
            raise _error_from_response(r)
        return r

    def _post_sealed(self, path: str, body: bytes) -> bytes:
        """POST a sealed message; the answer's bytes, or its error raised as `_request` would."""
        if self._posts is None:
            return self._request("POST", path, content=body, headers={"content-type": "application/octet-stream"}).content
        try:
            r = self._posts.post(path, body)
        except (OSError, http.client.HTTPException) as e:
            raise E.UserInputError(f"cannot reach {self.url} ({type(e).__name__})") from None
        if r.status_code >= 400:
            raise _error_from_response(r)
        return r.content

    def _replicas(self):
        """The front's replicas (each attested on its own), or None for a plain server. The first
        operation's evidence request is the probe (client/replicas.py), so a plain server sees
        no extra request."""
        if self._fanout is _UNKNOWN and self._attested is not None:
            self._fanout = None  # it already attested this URL as one enclave
        if self._fanout is _UNKNOWN:
            from .replicas import probe

            found, pre = probe(self)
            if found is False:  # no answer: a plain server's calls then fail as usual
                return None
            with self._lock:
                self._fanout, self._prefetched = found, pre
        return self._fanout

    # -- attestation ------------------------------------------------------------------------

    def attest(self) -> AttestedEnclave:
        """Fetch fresh evidence with a random nonce and verify it against the policy (against a
        replica front: every replica, returning the first one's)."""
        if self._replicas() is not None:
            return self._fanout.attest()
        from ..tee import Evidence, bind_report_data, bind_report_data_pq, verify_evidence

        pq = self._wants_pq()
        with self._lock:
            pre, self._prefetched = self._prefetched, None
        if pre is not None and not pq and time.monotonic() - pre[2] < PREFETCH_S:  # the probe's answer, just fetched
            nonce, r = pre[0], pre[1]
            if r.status_code >= 400:
                raise _error_from_response(r)
        else:
            nonce = os.urandom(32)
            r = self._request("GET", "/v1/evidence", params={"nonce": nonce.hex(), **({"keys": "pq"} if pq else {})})
        try:
            body = loads_untrusted(r.content)
        except ValueError:
            raise E.EvidenceRejected("the server's evidence answer is malformed") from None
        answer = EvidenceAnswer.from_dict(body)
        evidence = Evidence.from_dict(answer.evidence)
        pk, issued = answer.public_key, answer.nonce  # issued: ours, extended by the enclave (crypto/nonces.py)
        pq_pk = answer.pq_public_key if pq else None
        if pq and pq_pk is None:
            raise E.EvidenceRejected("the policy names the hybrid (post-quantum) suite, but the enclave "
                                     "offered no hybrid key; refusing rather than using a weaker suite")
        if not (issued.startswith(nonce) and len(issued) == len(nonce) + NONCE_SUFFIX_BYTES):
            raise E.EvidenceRejected("the enclave's nonce does not extend the one the client sent")
        expected = bind_report_data(pk, issued) if pq_pk is None else bind_report_data_pq(pk, issued, pq_pk)
        claims = verify_evidence(evidence, self.policy, expected)
        att = AttestedEnclave(pk, issued, claims, time.monotonic(), pq_public_key=pq_pk)
        with self._lock:
            self._attested = att
        return att

    def _wants_pq(self) -> bool:
        """Whether the policy names a post-quantum suite anywhere (then every attestation asks for
        the hybrid key and refuses evidence without it)."""
        c = self.policy.crypto
        return bool({c.get("suite"), *c.get("models", {}).values()} & POST_QUANTUM)

    def attested(self) -> AttestedEnclave:
        if self._replicas() is not None:
            return self._fanout.attested()
        with self._lock:
            att = self._attested
        if att is None or time.monotonic() - att.at > self.reattest_s:
            att = self.attest()
        return att

    # -- owner operations -------------------------------------------------------------------

    def deploy(self, bundle_dir: str | os.PathLike[str], model_key: bytes, owner_key: SigningKey,
               model_id: str | None = None) -> dict:
        """Attest, release the model key sealed to the enclave and signed, upload the bundle.

        The deployment is `OWNER/name` for this owner key. The owner trusts what it deployed
        itself, so this client's (in-memory) policy then pins it if it pinned nothing of that
        name (or adds the bundle id to the owner's own pin); clients elsewhere need the pin in
        their policy file (`enclaveml attest pin`).
        """
        if self._replicas() is not None:  # every replica, each attested and sealed to on its own
            return self._fanout.deploy(bundle_dir, model_key, owner_key, model_id)
        from ..models.bundle import bundle_files, load_manifest

        files = bundle_files(bundle_dir)
        manifest = load_manifest(files, expected_owner=owner_key.public_key())
        name = check_model_id(model_id or manifest.name)
        att = self.attest()  # always fresh: the release is bound to this nonce
        suite = self.policy.suite_for(None)
        release = seal_key_release(owner_key, att.public_key, name, model_key, att.nonce, suite, att.recipient(suite))
        # The signed header first: the host checks it before it reads (or stores) the body.
        upload = encode_upload(owner_key, name, release, files, time.time())
        out = _json_body(self._request("POST", f"/v1/models/{name}", content=upload,
                                       headers={"content-type": "application/octet-stream"}))
        owner = owner_key.public_key().to_bytes().hex()
        with self._lock:
            old = self.policy.models.get(name)
            if old is None:
                self.policy = self.policy.with_pin(name, ModelPin(owner, (manifest.bundle_id,), manifest.k))
            elif old["owner"] == owner and old["bundle_ids"]:
                self.policy = self.policy.with_pin(name, ModelPin(owner, (*old["bundle_ids"], manifest.bundle_id),
                                                                  old["min_k"]))
        return out

    def delete(self, model_id: str, owner_key: SigningKey) -> dict:
        """Attest, then send a delete command signed by the owner and sealed to the enclave."""
        if self._replicas() is not None:
            return self._fanout.delete(model_id, owner_key)
        ref = ModelRef(owner_key.public_key().to_bytes().hex(), check_model_id(model_id))
        att = self.attest()
        suite = self.policy.suite_for(None)
        cmd = seal_owner_command(owner_key, att.public_key, "delete", ref.name, att.nonce, None, suite, att.recipient(suite))
        return _json_body(self._request("DELETE", f"/v1/models/{ref}", content=cmd))

    # -- model identity ---------------------------------------------------------------------

    def target(self, model: str) -> Target:
        """The pinned deployment a request for `model` goes to (`PolicyViolation` if unpinned)."""
        policy = self.policy  # one policy for the lookup and the check (deploy may replace it)
        hit = self._targets.get(model) if isinstance(model, str) else None
        if hit is not None and hit[0] == _pin_key(policy.models.get(model)):
            return hit[1]
        pin = policy.pin(check_model_id(model))
        target = Target(ModelRef(pin.owner, model), pin)
        if len(self._targets) >= 256:
            self._targets.clear()
        self._targets[model] = (_pin_key(policy.models.get(model)), target)
        return target

    def identity(self, model: str, att: AttestedEnclave | None = None) -> ModelIdentity:
        """Ask the attested enclave what it has deployed as `model` (by the pinned owner), and
        refuse it (`PolicyViolation`, saying what differs) unless it matches the pin."""
        if att is None and self._replicas() is not None:
            return self._fanout.identity(model)
        att = att or self.attested()
        target = self.target(model)
        raw = target.to_bytes()
        suite = self.policy.suite_for(model)
        msg, ctx = seal_with(suite, att.recipient(suite), frame_fresh(b""), identity_aad(raw))
        r = self._request("POST", f"/v1/models/{target.ref}/identity", content=frame_target(target, msg),
                          headers={"content-type": "application/octet-stream"})
        ident = decode_identity(ctx.open_response(r.content, identity_aad(raw)))
        return target.allows(ident)

    def _verified(self, att: AttestedEnclave, model: str) -> Target:
        """The target of `model`, once this enclave reported an identity its pin accepts."""
        target = self.target(model)
        if target not in att.identities:
            att.identities[target] = self.identity(model, att)
        return target

    # -- inference --------------------------------------------------------------------------

    def _seal(self, att: AttestedEnclave, images: list[bytes], target: Target, top_k: int, logits: bool):
        framed = frame_fresh(protocol.InferRequest(tuple(images), top_k, logits).encode(pad=self.pad_requests))
        suite = self.policy.suite_for(target.ref.name)
        body, ctx, _ = protocol.seal_infer(att.recipient(suite), target, framed, suite)
        return body, ctx

    def infer(self, images: Sequence[bytes], model: str, top_k: int = 5, logits: bool = False) -> list[dict]:
        """Encrypt each image to the attested enclave and return its decrypted result.

        A result is {"model", "top": [{"index", "label", "score"}...], "logits"?}. One failed image
        raises its error (use `infer_each` to get per-image errors instead).
        """
        out = self.infer_each(images, model, top_k, logits)
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out  # type: ignore[return-value]

    def infer_each(self, images: Sequence[bytes], model: str, top_k: int = 5,
                   logits: bool = False) -> list[dict | E.EnclaveMLError]:
        if not (isinstance(model, str) and model in self._targets):  # a cached name passed it before
            check_model_id(model)
        images = [bytes(i) for i in images]
        if self._replicas() is not None:  # one replica per call, round-robin
            return self._fanout.infer_each(images, model, top_k, logits)
        try:
            att = self.attested()
            target = self._verified(att, model)  # before any image leaves this client
            return self._infer_each(att, images, target, top_k, logits)
        except (E.TamperedMessage, E.PolicyViolation, E.UnknownModel):
            # The enclave may have restarted (new key), or the host may only claim so (it can
            # forge that error, or corrupt a response the enclave already produced). Never re-send
            # the images on the host's word: forget the attestation, so that the caller's next
            # call attests afresh, and raise.
            with self._lock:
                self._attested = None
            raise

    def _infer_each(self, att: AttestedEnclave, images: list[bytes], target: Target, top_k: int,
                    logits: bool) -> list:
        """One encrypted request per chunk of images (one HPKE message for the lot)."""
        out: list = []
        aad = infer_aad(target.to_bytes())
        for chunk in _chunks(images):
            t = now()
            msg, ctx = self._seal(att, chunk, target, top_k, logits)
            since(self.clock, "client_seal", t)
            t = now()
            try:
                content = self._post_sealed(f"/v1/models/{target.ref}/infer", msg)
            except (E.TamperedMessage, E.PolicyViolation):
                raise  # maybe a new enclave key or deployment: the caller attests again
            except E.EnclaveMLError as e:  # the request as a whole failed: each of its images did
                out.extend([e] * len(chunk))
                continue
            since(self.clock, "client_http", t)
            t = now()
            allowed = self._allowed.get(target)
            if allowed is None:
                if len(self._allowed) >= 64:
                    self._allowed.clear()
                allowed = self._allowed.setdefault(target, {})
            out.extend(protocol.decode_results(ctx.open_response(content, aad), len(chunk), expected=target,
                                               checked=allowed))
            since(self.clock, "client_open", t)
        return out

    def health(self) -> dict:
        return _json_body(self._request("GET", "/healthz"))

    def metrics(self) -> dict:
        return _json_body(self._request("GET", "/metrics", params={"format": "json"}))
