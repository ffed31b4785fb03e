"""The enclave's serving logic: attestation, deployments, and the two halves of an inference.

Trust side: enclave (runs in the worker process, `worker.py`, which only moves bytes to it). Holds
the HPKE private key, the model keys, the FrontNets, the class mappings, the replay guard and the
per-request response contexts. What leaves this object towards the host: evidence, the public
key, IR tensors, opaque handles, sealed responses, and error kinds with short messages that
never quote plaintext.

Deployments are addressed by (owner key, name) (`ModelRef`, rendered OWNERHEX/name): another
key's deployment of the same name lives beside the owner's and can never shadow, block or evict
it. Every request carries its target (the ref and the client's pin: accepted bundle ids, smallest
k) in the clear and as its AAD; the enclave refuses a deployment that does not match before it
opens or decodes anything (PolicyViolation), and repeats its identity in every sealed answer.
`identity(ref, request)` reports the deployed identity, sealed to the asking client, so that a
client can refuse a substituted deployment before any image leaves it.

Life of a request (one or several images): `front(model, ciphertext)` checks the target against
the deployment (PolicyViolation), opens it (TamperedMessage), checks freshness (ReplayedMessage),
decodes and preprocesses the images here (DataError for a one-image request; in a larger request
a bad image gets an error item, sealed), runs the FrontNet and returns (handle, IR with one row per
decoded image). The host runs the BackNet and calls
`finish(handle, scores)` with the scores in the secret class order; the enclave maps them back,
picks the top k with label names and seals the answer to that request only. Handles not finished
within `handle_ttl_s` are dropped. `front_batch` runs the images of many requests through one
FrontNet pass.

One round trip: when the host handed over the BackNet at deployment (its bytes checked against the
owner-signed manifest, like the host's own copy) and asks for it (`finish_rows`, `serve/placement.py`),
a `front_batch` whose decoded images number at most `finish_rows` runs the whole model here and
answers each request sealed (`Answered`): decode -> FrontNet -> BackNet -> head -> class mapping ->
seal, the same code as the two-call path, and the host sees neither IR nor scores.
"""

from __future__ import annotations

import copy
import hmac
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..crypto import (SUITES, EnclaveKeys, ReplayGuard, open_any, open_key_release, open_owner_command,
                      open_sealed, require_owner, seal)
from ..crypto.nonces import NonceIssuer
from ..crypto.replay import parse_fresh
from ..crypto.signing import VerifyKey
from ..data.preprocess import Preprocessing, decode_array
from ..errors import DataError, ReplayedMessage, TamperedMessage, UnknownModel
from ..models.bundle import BACKNET, CLASSMAP, FRONTNET, HEAD, MANIFEST, SIGNATURE, load_manifest, open_enclave_parts
from ..models.classmap import ClassMapping
from ..models.layers import FrontNet
from ..models.servable import check_factory_names, check_servable_arch
from ..protocol.identity import (ModelIdentity, ModelRef, encode_identity, identity_aad, infer_aad,
                                 split_target)
from ..tee import bind_report_data, bind_report_data_pq
from ..tee.backend import EnclaveBackend
from ..protocol import infer as protocol
from ..timing import StageClock, now, since
from .flat import runner
from .placement import NCHW_COPY_MAX_BYTES, SMALL_ROWS, keeps_nchw_copy
from .threads import LoneThreads

DELETE = "delete"
UNDECODABLE_IMAGE = protocol.UNDECODABLE_IMAGE
#: Sealing-key label and AAD prefix of a sealed deployment (see `deploy` and `restore`).
DEPLOYMENT_SEAL_LABEL = b"enclaveml/v1 deployments"
DEPLOYMENT_AAD = b"enclaveml/v1 sealed deployment\x00"
NONCE_TTL_S = 600.0
#: Owner commands accepted within one NONCE_TTL_S (consumed nonces are kept that long).
MAX_NONCES = 10_000
#: Images per FrontNet pass. 32, not 64: darknet's FrontNet (k=10, one thread) measured 663 against
#: 755 CPU us per image (a pass of 64 outgrows the 2 MiB L2; docs/benchmarks.md, issue 13).
MAX_PASS = 32


def _inference_layout(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The FrontNet (or the BackNet) with its convolution weights channels-last on a CPU: oneDNN's
    convolutions run without reordering every pass (darknet k=10's FrontNet: 1102 -> 663 CPU us per
    image, outputs equal to 1e-6; its BackNet on one image: 1734 -> 355 us, and fed the FrontNet's
    channels-last IR its outputs equal the host's small-pass copy's bit for bit). Other layers and
    devices are left as they are; the IR leaves contiguous NCHW."""
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    return net


@dataclass(frozen=True)
class Answered:
    """A request `front_batch` answered whole (its pass ran the BackNet here): the sealed answer,
    and how many of its images could not be decoded (the host counts them, as before)."""

    sealed: bytes
    failed: int = 0


@dataclass
class Deployment:
    """A model deployed in this enclave, bound to the owner key that released its model key."""

    ref: ModelRef
    owner: VerifyKey
    front: FrontNet
    mapping: ClassMapping = field(repr=False)
    preprocessing: Preprocessing
    bundle_id: str
    k: int
    #: The classifier head run here after the BackNet (`partition --head N`), and its input shape.
    head: "torch.nn.Module | None" = field(default=None, repr=False)
    head_layers: int = 0
    head_in_shape: tuple[int, ...] = ()
    #: The public BackNet, when the host handed it over (verified against the manifest) for passes
    #: run whole here (`front_batch(finish_rows=...)`); None: the host runs every BackNet pass.
    back: "torch.nn.Module | None" = field(default=None, repr=False)
    #: An NCHW copy of it for passes over SMALL_ROWS (every pass on a CPU host by default), made at
    #: the first one when the BackNet is small enough (`placement.keeps_nchw_copy`).
    back_large: "torch.nn.Module | None" = field(default=None, repr=False)
    #: The BackNet's parameter and buffer bytes (0 without one): what a second copy would cost.
    back_bytes: int = 0
    #: How passes run them: their flat plans (`serve/flat.py`, the same ATen calls without the
    #: module machinery; outputs equal bit for bit), or the modules where there is none.
    run_front: "Callable | None" = field(default=None, repr=False)
    run_back: "Callable | None" = field(default=None, repr=False)
    run_back_large: "Callable | None" = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.run_front is None:
            self.run_front = runner(self.front)
        if self.run_back is None and self.back is not None:
            self.run_back = runner(self.back)
        if self.back is not None and not self.back_bytes:
            self.back_bytes = sum(t.numel() * t.element_size()
                                  for t in (*self.back.parameters(), *self.back.buffers()))

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.ref.owner, self.ref.name, self.bundle_id, self.k, self.head_layers)


@dataclass
class _Pending:
    sealer: object = field(repr=False)
    dep: "Deployment | None" = field(default=None, repr=False)
    top_k: int = 5
    logits: bool = False
    aad: bytes = b""
    created: float = 0.0
    #: Per image of the request: its row in the IR, or -1 for an image that could not be decoded.
    slots: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return sum(1 for r in self.slots if r >= 0)


class EnclaveService:
    """All enclave state for serving. Thread-safe: many `front`/`finish` calls run concurrently."""

    def __init__(self, backend: EnclaveBackend, replay_window_s: float = 120.0, handle_ttl_s: float = 60.0,
                 device: str = "cpu", allowed_factories: "tuple[str, ...] | list[str]" = (), max_pass: int = MAX_PASS,
                 suites: "tuple[str, ...] | list[str]" = SUITES, lone_threads: "LoneThreads | None" = None,
                 nchw_copy_max_bytes: int = NCHW_COPY_MAX_BYTES):
        self.backend = backend
        #: The largest BackNet this enclave holds a second (NCHW) copy of (`placement.keeps_nchw_copy`).
        self.nchw_copy_max_bytes = max(0, int(nchw_copy_max_bytes))
        #: Torch threads of a small FrontNet pass that runs alone (`serve.threads`); 1 otherwise.
        self.lone_threads = lone_threads if lone_threads is not None else LoneThreads()
        self.max_pass = max(1, int(max_pass))
        #: Model factories (besides the zoo) this enclave builds: fixed at launch from its measured
        #: configuration (`models.servable.enclave_config`), never from an upload.
        self.allowed_factories = check_factory_names(list(allowed_factories))
        #: Request keys: the classic X25519 pair (evidence binds it) and the hybrid one (bound on
        #: request, `evidence(pq=True)`); `suites` are the HPKE suites this enclave opens.
        self.keys = EnclaveKeys.generate(suites)
        self.kp = self.keys.classic
        self.guard = ReplayGuard(window_s=replay_window_s)
        self.handle_ttl_s = handle_ttl_s
        self.device = torch.device(device)
        self._deployments: dict[ModelRef, Deployment] = {}
        self._pending: dict[str, _Pending] = {}
        self.nonces = NonceIssuer(os.urandom(32), ttl_s=NONCE_TTL_S, max_used=MAX_NONCES)
        self._lock = threading.Lock()
        #: Per-stage totals (calls, wall ns, CPU ns) of inference: the worker's "stats" op.
        self.clock = StageClock()

    # -- attestation -------------------------------------------------------------------------

    def public_key(self) -> bytes:
        return self.kp.public_bytes()

    def issue_nonce(self, caller_nonce: bytes) -> bytes:
        """The nonce an owner command must carry: the caller's, extended with a time and this
        enclave's MAC (`crypto.nonces`). Nothing is stored, so a flood of anonymous requests
        cannot evict an owner's pending nonce."""
        return self.nonces.issue(caller_nonce, time.monotonic())

    def pq_public_key(self) -> bytes | None:
        return self.keys.pq.public_bytes() if self.keys.pq is not None else None

    def evidence(self, nonce: bytes, pq: bool = False) -> dict:
        """Evidence binding SHA-256(public key || nonce) (normally a nonce from `issue_nonce`), and
        with `pq` the hybrid public key in the upper half of the report data (`bind_report_data_pq`)."""
        if not 8 <= len(nonce) <= 128:
            raise DataError("attestation nonce must be 8 to 128 bytes")
        if pq:
            if self.keys.pq is None:
                raise DataError("this enclave offers no hybrid (post-quantum) key")
            return self.backend.evidence(bind_report_data_pq(self.public_key(), nonce, self.pq_public_key())).to_dict()
        return self.backend.evidence(bind_report_data(self.public_key(), nonce)).to_dict()

    def _consume_nonce(self, nonce: bytes) -> None:
        """An owner command must carry a nonce this enclave issued recently, used once only."""
        self.nonces.consume(nonce, time.monotonic())

    # -- owner commands ----------------------------------------------------------------------

    def deploy(self, name: str, key_release: bytes, files: dict[str, bytes]) -> dict:
        """Open the key release, check the owner, decrypt the FrontNet and class map, install
        under (release signer, name).

        The answer's "sealed" holds the deployment (ref, model key, bundle id) sealed under this
        enclave's sealing key, for the host to keep beside the bundle: after a worker restart,
        `restore` brings the deployment back without the owner.
        """
        protocol.check_model_id(name)
        rel = open_key_release(self.keys, key_release)
        if rel.model_id != name:
            raise TamperedMessage("key release was signed for another model name")
        self._consume_nonce(rel.nonce)
        ref = ModelRef(rel.owner.to_bytes().hex(), name)
        out = self._install(ref, rel.owner, rel.model_key, files)
        record = json.dumps({"model": str(ref), "owner": ref.owner, "model_key": rel.model_key.hex(),
                             "bundle_id": out["bundle_id"]}, separators=(",", ":")).encode()
        key = self.backend.sealing_key(DEPLOYMENT_SEAL_LABEL)
        return {**out, "sealed": seal(key, record, DEPLOYMENT_AAD + str(ref).encode())}

    def restore(self, ref_text: str, sealed: bytes, files: dict[str, bytes]) -> dict:
        """Reinstall a deployment this enclave identity sealed (`deploy`'s "sealed"), from the
        bundle files the host kept. TamperedMessage for anything sealed elsewhere, for another
        ref or bundle, or for a ref already deployed: a restore only fills an empty slot after a
        restart, so the host cannot roll a live deployment back to an older record it kept (F-29;
        which record it restores after a restart is its choice, and only the client's pin refuses
        a retired bundle)."""
        ref = ModelRef.parse(ref_text)
        with self._lock:
            if ref in self._deployments:
                raise TamperedMessage(f"model {ref.short()} is already deployed; a restore only fills an empty slot")
        key = self.backend.sealing_key(DEPLOYMENT_SEAL_LABEL)
        try:
            rec = json.loads(open_sealed(key, sealed, DEPLOYMENT_AAD + str(ref).encode()))
            owner = VerifyKey.from_bytes(bytes.fromhex(rec["owner"]))
            model_key, bundle_id = bytes.fromhex(rec["model_key"]), str(rec["bundle_id"])
            if rec["model"] != str(ref) or rec["owner"] != ref.owner:
                raise ValueError
        except (ValueError, KeyError, TypeError):  # sealed by us, so only a format change gets here
            raise TamperedMessage("sealed deployment is not valid") from None
        if load_manifest(files, expected_owner=owner).bundle_id != bundle_id:
            raise TamperedMessage("the bundle files are not the sealed deployment's bundle")
        return self._install(ref, owner, model_key, files)

    def _install(self, ref: ModelRef, owner: VerifyKey, model_key: bytes, files: dict[str, bytes]) -> dict:
        """Build a deployment from the bundle files and swap it in only once every part checked out
        (so a refused part leaves the current deployment as it was). A BackNet among the files
        (the host's placement: `serve/placement.py`) is loaded only if its bytes are the signed
        manifest's (TamperedMessage otherwise)."""
        parts = {n: files[n] for n in (MANIFEST, SIGNATURE, FRONTNET, CLASSMAP, HEAD, BACKNET) if n in files}
        manifest = load_manifest(parts, expected_owner=owner)
        check_servable_arch(manifest.arch, self.allowed_factories)  # before any import
        ep = open_enclave_parts(parts, model_key, expected_owner=owner, allowed_factories=self.allowed_factories,
                                with_backnet=BACKNET in parts)
        head = ep.head.to(self.device) if ep.head is not None else None
        back = _inference_layout(ep.back.to(self.device), self.device) if ep.back is not None else None
        dep = Deployment(ref, owner, _inference_layout(ep.front.to(self.device), self.device), ep.mapping, manifest.preprocessing,
                         manifest.bundle_id, manifest.k, head, manifest.head, ep.head_in_shape, back)
        with self._lock:
            current = self._deployments.get(ref)
            self._deployments[ref] = dep
        return {"model": str(ref), "bundle_id": manifest.bundle_id, "k": manifest.k, "head": manifest.head,
                "owner": owner.fingerprint(), "replaced": current is not None}

    def delete(self, ref_text: str, command: bytes) -> dict:
        ref = ModelRef.parse(ref_text)
        cmd = open_owner_command(self.keys, command)
        if cmd.command != DELETE or cmd.model_id != ref.name:
            raise TamperedMessage("owner command is not a delete of this model")
        with self._lock:
            current = self._deployments.get(ref)
        if current is None:
            raise UnknownModel(f"no model {ref.short()} is deployed")
        require_owner(cmd, current.owner)
        self._consume_nonce(cmd.nonce)
        with self._lock:
            if self._deployments.get(ref) is current:
                del self._deployments[ref]
        return {"model": str(ref), "deleted": True}

    def models(self) -> list[str]:
        with self._lock:
            return sorted(str(r) for r in self._deployments)

    # -- inference ---------------------------------------------------------------------------

    def _deployment(self, ref: ModelRef) -> Deployment:
        with self._lock:
            dep = self._deployments.get(ref)
        if dep is None:
            raise UnknownModel(f"no model {ref.short()} is deployed")
        return dep

    def _target(self, ref: ModelRef, body: bytes):
        """(deployment, target bytes, HPKE message) of a request the host routed to `ref`; the
        target is checked against the deployment before anything is opened or decoded."""
        target, raw, msg = split_target(body)
        if target.ref != ref:
            raise TamperedMessage("the request is for another deployment than the host routed it to")
        dep = self._deployment(ref)
        target.allows(dep.identity)  # PolicyViolation: not the deployment the client pinned
        return dep, raw, msg

    def identity(self, ref_text: str, body: bytes) -> bytes:
        """The deployed identity under `ref`, sealed to the asking client (it cannot come from the
        host). The request is a fresh HPKE message (empty payload) with the identity AAD."""
        ref = ModelRef.parse(ref_text)
        target, raw, msg = split_target(body)
        if target.ref != ref:
            raise TamperedMessage("the request is for another deployment than the host routed it to")
        framed, sealer = open_any(self.keys, msg, identity_aad(raw))
        rid, ts, _ = parse_fresh(framed)
        self.guard.check(rid, ts)
        return sealer.seal_response(encode_identity(self._deployment(ref).identity), identity_aad(raw))

    def _open(self, dep: Deployment, raw: bytes, msg: bytes) -> tuple[list[np.ndarray], _Pending]:
        """Open and check one request, decode its images here (never on the host) -> (their
        pixels, the pending answer); the tensors are made per FrontNet pass (`front_batch`)."""
        aad = infer_aad(raw)
        t = now()
        framed, sealer = open_any(self.keys, msg, aad)
        since(self.clock, "hpke_open", t)
        t = now()
        rid, ts, payload = parse_fresh(framed)
        self.guard.check(rid, ts)
        opts, images = protocol.decode_payload(payload)
        since(self.clock, "replay_and_payload", t)
        t = now()
        xs: list[np.ndarray] = []
        slots: list[int] = []
        for image in images:
            try:
                xs.append(decode_array(image, dep.preprocessing))
                slots.append(len(xs) - 1)
            except DataError:
                if len(images) == 1:  # no plaintext detail crosses to the host
                    raise DataError(UNDECODABLE_IMAGE) from None
                slots.append(-1)
        since(self.clock, "decode_preprocess", t)
        return xs, _Pending(sealer, dep, opts["top_k"], opts["logits"], aad, time.monotonic(), tuple(slots))

    def _front_pass(self, dep: Deployment, arrays: list[np.ndarray], wire: bool = True) -> torch.Tensor:
        """Pixels of one pass -> the IR (`wire`: NCHW contiguous on the CPU, the wire layout; else
        as the FrontNet left it, for the BackNet here): the batch is built in a few tensor
        operations, channels-last like the FrontNet's weights (`_install`)."""
        t = now()
        x = dep.preprocessing.batch(arrays).to(self.device)
        since(self.clock, "decode_preprocess", t)
        t = now()
        ir = dep.run_front(x)
        if wire:
            ir = ir.cpu().contiguous()
        since(self.clock, "frontnet", t)
        return ir

    def _whole_pass(self, dep: Deployment, arrays: list[np.ndarray]) -> torch.Tensor:
        """Pixels of one pass -> BackNet outputs (scores in the secret order, or the head's input),
        the IR never leaving the enclave; the same FrontNet pass as `_front_pass`. The layouts
        follow the host's `BackNetExecutor`: up to SMALL_ROWS rows the channels-last BackNet on the
        FrontNet's channels-last IR as it comes; larger passes (every pass on a CPU host by default,
        `serve/placement.py`) an NCHW copy on NCHW IR, cheaper there (darknet k=10, 32 rows: 3.7
        against 7.0 ms, `benchmarks/bench_split_single.py --rows 32`), made at the first such pass:
        from then on the enclave holds the BackNet's weights twice, so only for a BackNet of at most
        `nchw_copy_max_bytes` (`placement.keeps_nchw_copy`); a larger one runs every pass on its
        one channels-last copy."""
        large = (len(arrays) > SMALL_ROWS and self.device.type == "cpu"
                 and keeps_nchw_copy(dep.back_bytes, self.nchw_copy_max_bytes))
        # inference mode: nothing of this pass leaves the enclave as a tensor (fewer per-op costs)
        with torch.inference_mode():
            ir = self._front_pass(dep, arrays, wire=large)
            t = now()
            out = (self._large_backnet(dep) if large else dep.run_back)(ir).float().cpu()
            since(self.clock, "backnet", t)
        return out

    def _large_backnet(self, dep: Deployment) -> Callable:
        with self._lock:
            if dep.back_large is None:
                with torch.inference_mode(False):  # ordinary parameters, though called from a pass
                    dep.back_large = copy.deepcopy(dep.back).to(memory_format=torch.contiguous_format)
                dep.run_back_large = runner(dep.back_large)
            return dep.run_back_large

    @torch.no_grad()
    def front(self, model_id: str, ciphertext: bytes) -> tuple[str, torch.Tensor]:
        """One request -> (handle, IR of shape (decoded images, ...); empty if none decoded)."""
        out = self.front_batch(model_id, [ciphertext])[0]
        if isinstance(out, Exception):
            raise out
        return out[0], out[1]

    @torch.no_grad()
    def front_batch(self, model_id: str, ciphertexts: list[bytes],
                    finish_rows: int = 0) -> list[tuple[str, torch.Tensor, int] | Answered | Exception]:
        """Several requests for one deployment (`model_id` = OWNERHEX/name) through shared FrontNet
        passes (`max_pass` images each) -> per request (handle, IR rows, images that failed to
        decode), or its error; failures stay per request.

        With `finish_rows` > 0, a deployment that holds its BackNet and a call whose decoded images
        number at most `finish_rows` is answered here in one go: per request `Answered` (sealed as
        `finish` would seal it) instead of a handle and IR rows."""
        ref = ModelRef.parse(model_id)
        dep = self._deployment(ref)
        opened: list[tuple[list[torch.Tensor], _Pending] | Exception] = []
        for ct in ciphertexts:
            try:
                t = now()
                d, raw, msg = self._target(ref, ct)
                since(self.clock, "target_check", t)
                if d is not dep:  # redeployed between the two look-ups: refuse, the client resends
                    raise UnknownModel(f"model {ref.short()} was redeployed")
                opened.append(self._open(dep, raw, msg))
            except Exception as e:
                opened.append(e)
        xs_all = [x for o in opened if not isinstance(o, Exception) for x in o[0]]
        whole = finish_rows > 0 and dep.back is not None and len(xs_all) <= finish_rows
        run = self._whole_pass if whole else self._front_pass
        # At most `max_pass` images per FrontNet pass: many requests of many images must not
        # outgrow the enclave's memory (the assessment's cost figures assume bounded batches).
        with self.lone_threads.run(len(xs_all) if self.device.type == "cpu" else 0):
            passes = [run(dep, xs_all[k:k + self.max_pass]) for k in range(0, len(xs_all), self.max_pass)]
        # one row per decoded image: its IR, or (whole) its BackNet output
        outs = (passes[0] if len(passes) == 1 else torch.cat(passes)) if passes else torch.empty(0)
        out: list[tuple[str, torch.Tensor, int] | Answered | Exception] = []
        row = 0
        for o in opened:
            if isinstance(o, Exception):
                out.append(o)
                continue
            xs, p = o
            rows, failed = outs[row:row + len(xs)], len(p.slots) - len(xs)
            row += len(xs)
            if not whole:
                out.append((self._remember(p), rows, failed))
                continue
            try:
                out.append(Answered(self._answer(p, rows), failed))
            except Exception as e:
                out.append(e)
        return out

    def _remember(self, pending: _Pending) -> str:
        handle = os.urandom(12).hex()
        now = time.monotonic()
        with self._lock:
            if len(self._pending) > 256:
                for h, p in list(self._pending.items()):
                    if now - p.created > self.handle_ttl_s:
                        del self._pending[h]
            self._pending[handle] = pending
        return handle

    def finish(self, handle: str, scores_host_order: torch.Tensor) -> bytes:
        """Scores in the secret order (one row per decoded image) -> the sealed answer (one item per
        image of the request) for the request behind `handle`."""
        with self._lock:
            pending = self._pending.pop(handle, None)
        if pending is None:
            raise UnknownModel("unknown or expired request handle")
        return self._answer(pending, scores_host_order)

    def _answer(self, pending: _Pending, scores_host_order: torch.Tensor) -> bytes:
        """BackNet outputs of one request (from the host, or from this enclave's own BackNet pass)
        -> its sealed answer: checks, the head if any, class mapping, top k, seal."""
        t = now()
        dep = pending.dep
        assert dep is not None
        labels, n = list(dep.mapping.labels), dep.mapping.num_classes
        scores = scores_host_order.detach().to(torch.float32).cpu()
        width = math.prod(dep.head_in_shape) if dep.head is not None else n
        bad = DataError("BackNet outputs have the wrong size or are not finite")
        if scores.numel() != pending.rows * width:
            raise bad
        if dep.head is not None:  # the classifier head runs here: the host never saw class scores
            if not torch.isfinite(scores).all():
                raise bad
            # inference mode: the outputs of a whole pass here are inference tensors, which a head
            # whose first layer works in place could not modify outside it
            with torch.inference_mode():
                scores = dep.head(scores.reshape(pending.rows, *dep.head_in_shape).to(self.device)).float().cpu()
            if scores.shape != (pending.rows, n):
                raise DataError("the head's output does not have one score per class")
            host_rows = scores.tolist()
        else:
            host_rows = scores.reshape(pending.rows, n).tolist()
            if not all(math.isfinite(v) for r in host_rows for v in r):
                raise bad
        # The gather and the float32 -> float64 widening on Python floats (exact), the softmax
        # in torch as before: the answers are the same bits, with three tensor operations, not ten.
        logits = dep.mapping.rows_to_original(host_rows)
        probs = torch.softmax(torch.tensor(logits, dtype=torch.float64).reshape(len(logits), n), dim=1).tolist()
        since(self.clock, "class_mapping", t)
        t = now()
        items = []
        ident = dep.identity
        for row in pending.slots:
            if row < 0:
                items.append(protocol.encode_error_item(ident, labels, pending.top_k, pending.logits))
            else:
                items.append(protocol.encode_result(ident, probs[row], labels, pending.top_k,
                                                    logits[row] if pending.logits else None))
        since(self.clock, "encode_result", t)
        t = now()
        out = pending.sealer.seal_response(b"".join(items), pending.aad)
        since(self.clock, "hpke_seal", t)
        return out

    def abort(self, handle: str) -> None:
        with self._lock:
            self._pending.pop(handle, None)
