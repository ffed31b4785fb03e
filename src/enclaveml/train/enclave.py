"""The CalTrain training enclave: every secret of a training run lives in this object.

Trust side: enclave. No I/O: `enclave_worker` moves bytes between this object and the host over
the channel. What it holds: the HPKE key participants and the owner encrypt to, the sealing-key
derived data/tag/state keys, decrypted instances (batch by batch), labels, the FrontNet, the
secret class mapping, the loss, the owner's identity, the linkage key. What it hands out: sealed
instances and checkpoints, IR tensors, dL/dscores (or, with the head sealed here, dL/dfeatures at
the cut; either passed through the run's label-leakage defence, `defences.py`), sealed linkage
records, and the released model HPKE-encrypted to the owner.

Operations, in the order a run uses them:
    evidence(nonce)       attestation binding this enclave's HPKE key
    ingest(uploads)       participant uploads -> sealed instances (or a reason to reject each)
    add_data(items)       sealed instances from the host's store, before `start`
    start(cmd, ckpt)      owner-signed start command (config), optional sealed checkpoint
    forward(step) / loss_grad(scores) / backward(d_ir)     one training step
    checkpoint()          sealed state of the enclave half
    finish(back_state)    fingerprints -> sealed linkage records; sealed final state
    release(cmd)          the model and the linkage key, encrypted to the owner
    audit_records(...)    the finished run's sealed linkage records, handed back in chunks
    audit(cmd)            label audit of those records, signed by this enclave, encrypted to the owner

Who may train (F-2): the owner's Ed25519 public key is part of the enclave configuration
(`enclave_config(owner)`, measured by the sim backend; `train serve --owner`), so the measurement
participants pin in their policy names the one key that may start a run and receive its result;
`start`/`release` from any other key raise `Unauthorized`. An enclave configured without an owner
(`ENCLAVE_CONFIG`) accepts any signer: its measurement differs, `train policy` never pins it, and
it exists only for in-process tests.

The training plan (F-40 to F-44, plan.py): the enclave runs one plan, given at launch (`train
serve --plan`, or the plan its flags describe). Its hash is in the upper half of the evidence's
report data, every key the enclave seals with is derived per plan, uploads bound to another plan
are refused, and a start command must name the plan and ask for nothing it does not fix.

Replay (F-3): every owner command carries a nonce; the enclave accepts each nonce once. Commands
are sealed to this process's fresh HPKE key, so a command cannot outlive the enclave instance and
its record of used nonces.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from typing import Any

import torch

from .. import keyfiles
from ..timing import StageClock
from ..crypto import HpkeKeyPair, VerifyKey, generate_key, open_owner_command, open_sealed, require_owner, seal
from ..crypto import seal_request
from ..errors import (DataError, EnclaveMLError, PolicyViolation, ReplayedMessage, TamperedMessage, Unauthorized,
                      UserInputError)
from .fingerprint import channels_last_copy, fingerprints
from .instances import EnclaveDataset, InstanceIngest
from .linkage import LinkageRecord, seal_records
from .defences import DefenceSpec
from ..models.classmap import ClassMapping
from ..models.split import permute_classifier
from .partitioned import EnclaveTrainer, TrainConfig, host_layers, split_with_head
from .plan import RunChoice, TrainingPlan, plan_key, plan_report_data
from .spec import ModelSpec

#: The base enclave configuration that the sim backend measures (a verifier's policy pins it).
#: Deployed enclaves add the owner's key: `enclave_config(owner)`.
ENCLAVE_CONFIG = {"app": "caltrain", "version": 1}
START = "caltrain-start"
RELEASE = "caltrain-release"
RELEASE_INFO = b"enclaveml/v1 caltrain-release"
AUDIT = "caltrain-audit"
AUDIT_INFO = b"enclaveml/v1 caltrain-audit"


def parse_owner(value: "str | bytes | VerifyKey") -> VerifyKey:
    """An owner's Ed25519 public key from a VerifyKey, 32 raw bytes, 64 hex digits, or a key file
    (public key hex, or a private key PEM as `keyfiles.load_signing_key` reads it)."""
    from pathlib import Path

    if isinstance(value, VerifyKey):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return VerifyKey.from_bytes(bytes(value))
        except Exception:
            raise UserInputError("owner key must be a 32-byte Ed25519 public key") from None
    text = str(value).strip()
    try:
        if len(text) == 64:
            return VerifyKey.from_bytes(bytes.fromhex(text))
    except Exception:
        pass
    path = Path(text)
    if path.is_file():
        raw = path.read_text().strip()
        if len(raw) == 64:
            return parse_owner(raw)
        try:
            return keyfiles.load_signing_key(path).public_key()
        except Exception:
            raise UserInputError(f"{path}: not an Ed25519 key (public key hex or private key PEM)") from None
    raise UserInputError("owner must be an Ed25519 public key (64 hex digits) or a key file")


def enclave_config(owner: "str | bytes | VerifyKey | None", allowed_factories: "tuple[str, ...] | list[str]" = ()) -> dict:
    """The measured configuration of a training enclave whose only owner is `owner`.

    `allowed_factories`: the user architectures ('package.module:function') this enclave may
    build, as a serving enclave's (`serve --allow-factory`); absent when there are none, so the
    zoo-only measurement is unchanged. `train serve` adds the factory its plan fixes.
    """
    from ..models.bundle import check_arch

    names = sorted(set(allowed_factories))
    for name in names:
        check_arch({"factory": name})  # UserInputError unless package.module:function
    cfg = dict(ENCLAVE_CONFIG)
    if owner is not None:
        cfg["owner"] = parse_owner(owner).to_bytes().hex()
    if names:
        cfg["allowed_factories"] = names
    return cfg


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


def pack_files(header: dict, files: dict[str, bytes]) -> bytes:
    """u32 length || JSON header (with file offsets) || file bytes: the release container."""
    index, off = {}, 0
    for name, b in files.items():
        index[name] = [off, len(b)]
        off += len(b)
    head = json.dumps({**header, "files": index}, sort_keys=True).encode()
    return struct.pack(">I", len(head)) + head + b"".join(files.values())


def unpack_files(data: bytes) -> tuple[dict, dict[str, bytes]]:
    try:
        (n,) = struct.unpack_from(">I", data)
        head = json.loads(data[4:4 + n])
        body = data[4 + n:]
        files = {k: body[o:o + ln] for k, (o, ln) in head.pop("files").items()}
    except (struct.error, ValueError, KeyError, TypeError):
        raise TamperedMessage("release container is malformed") from None
    return head, files


class CalTrainEnclave:
    """One training enclave (one run at a time) for one training plan."""

    def __init__(self, backend, owner: "str | bytes | VerifyKey | None" = None,
                 plan: "TrainingPlan | dict | None" = None, allowed_factories: "tuple[str, ...] | None" = None):
        """`owner`: the only key whose start/release commands are accepted. Default: the `owner` of
        the backend's measured configuration (sim); None there too = any signer (tests only).
        `plan`: the training plan (default: the open plan of that owner over the darknet data model,
        what `train serve --owner` runs); its owner must be the enclave's. `allowed_factories`:
        the user architectures it may build (default: those of the backend's measured
        configuration; the plan's own factory must be among them)."""
        self.be = backend
        config = getattr(backend, "config", None) or {}
        if owner is None:
            owner = config.get("owner")
        if allowed_factories is None:
            allowed_factories = tuple(config.get("allowed_factories", ()))
        self.allowed_factories: frozenset[str] = frozenset(allowed_factories)
        self.allowed_owner: VerifyKey | None = None if owner is None else parse_owner(owner)
        if plan is None:
            plan = TrainingPlan.build(self.allowed_owner)
        elif isinstance(plan, dict):
            plan = TrainingPlan.from_dict(plan)
        mine = None if self.allowed_owner is None else self.allowed_owner.to_bytes().hex()
        if plan.owner != mine:
            raise UserInputError("the training plan names another owner than the enclave configuration")
        missing = [f for f in plan.factories() if f not in self.allowed_factories]
        if missing:
            raise UserInputError(f"the training plan fixes model factory {missing[0]!r}, which this enclave's "
                                 "configuration does not allow")
        self.plan: TrainingPlan = plan
        self.plan_hash: bytes = plan.hash()
        self._used_nonces: set[bytes] = set()
        self.hpke = HpkeKeyPair.generate()
        self._data_key = self._key(b"caltrain/data")
        self._state_key = self._key(b"caltrain/state")
        self._mapping_key = self._key(b"caltrain/mapping")
        self._ingest_cfg: tuple | None = None
        self._items: dict[str, bytes] = {}
        self.run: dict[str, Any] | None = None
        self.trainer: EnclaveTrainer | None = None
        self._final: dict | None = None
        self._order_cache: tuple[int, torch.Tensor] | None = None
        #: Per-stage totals of this enclave's work (the worker's `stats` op; timing.py): counts and
        #: times only, nothing about an instance.
        self.clock = StageClock()
        self._prefetch: "tuple[int, Any] | None" = None  # (step, Future of the batch for that step)
        self._pool = None  # one thread that opens, verifies and prepares the next batch
        #: Load the next step's batch while the host works (False: each batch when its step asks).
        self.prefetch = True
        #: The fingerprint pass in channels-last layout (False: the layout `fingerprints` defaults to).
        self.channels_last = True
        #: Threads of the fingerprint pass (each chunk on one; the host waits idle then).
        self.fingerprint_workers = min(2, os.cpu_count() or 1)

    def _key(self, label: bytes) -> bytes:
        """A sealing key of this backend, derived for this plan (what one plan seals, no other opens)."""
        return plan_key(self.be.sealing_key(label), self.plan_hash)

    # -- attestation and ingest -------------------------------------------------------------

    def evidence(self, nonce: bytes) -> dict:
        """Evidence whose report data is SHA-256(HPKE key || nonce) || plan hash (`plan_report_data`)."""
        if not 8 <= len(nonce) <= 64:
            raise UserInputError("nonce must be 8 to 64 bytes")
        ev = self.be.evidence(plan_report_data(self.hpke.public_bytes(), nonce, self.plan_hash))
        return {"evidence": ev.to_dict(), "public_key": self.hpke.public_bytes().hex(), "nonce": nonce.hex(),
                "plan_hash": self.plan_hash.hex()}

    def ingest(self, uploads: list[bytes], spec: ModelSpec | None = None) -> list[dict]:
        """Each upload -> {"status": "accepted", tag, owner, participant} + sealed blob, or a rejection.

        Decoded with the plan's data model; `spec`, if given (older callers), must decode and
        classify the same way: the host no longer chooses how instances are decoded or how many
        classes they have."""
        data = self.plan.data_spec()
        if spec is not None and (spec.preprocessing() != data.preprocessing() or
                                 spec.num_classes != len(self.plan.classes)):
            raise UserInputError(f"this enclave's plan decodes instances for {data.text}, not {spec.text}")
        ing = InstanceIngest(self.hpke, self._data_key, self._key(b"caltrain/tag"), data.preprocessing(),
                             len(self.plan.classes), plan=self.plan_hash)
        out = []
        for u in uploads:
            try:
                a = ing.ingest(u)
                out.append({"status": "accepted", "tag": a.tag, "owner": a.owner, "participant": a.participant,
                            "sealed": a.sealed})
            except EnclaveMLError as e:
                out.append({"status": "rejected", "error": type(e).__name__, "reason": str(e)})
        return out

    # -- training -----------------------------------------------------------------------------

    def add_data(self, items: list[tuple[str, bytes]], reset: bool = False) -> int:
        """Sealed instances for the next run (`reset` starts a new set and ends the current run)."""
        with self.clock.stage("add_data"):
            if reset:
                self._drop_prefetch()
                self._items, self.trainer, self.run, self._order_cache = {}, None, None, None
            for tag, tok in items:
                self._items[tag] = tok
            return len(self._items)

    def _open_command(self, command: bytes, kind: str):
        """Decrypt + verify an owner command of `kind` from the configured owner (nonce: `_consume_nonce`)."""
        cmd = open_owner_command(self.hpke, command)
        if cmd.command != kind:
            raise TamperedMessage(f"expected a {kind!r} command")
        if self.allowed_owner is not None and not hmac.compare_digest(cmd.owner.to_bytes(),
                                                                      self.allowed_owner.to_bytes()):
            raise Unauthorized(f"{kind!r} is not signed by the owner this enclave was configured with")
        return cmd

    def _consume_nonce(self, nonce: bytes) -> None:
        """Once the command is fully checked, just before it takes effect: each nonce works once."""
        if bytes(nonce) in self._used_nonces:
            raise ReplayedMessage("owner command carries a nonce this enclave has already accepted")
        self._used_nonces.add(bytes(nonce))

    def start(self, command: bytes, checkpoint: bytes | None) -> tuple[dict, bytes | None]:
        """Open the owner's start command; set up (or restore) the run. Returns (info, BackNet state)."""
        cmd = self._open_command(command, START)
        args = cmd.args
        if args.get("enclaves") not in (None, 1):  # one enclave must not release a run claiming a group
            raise PolicyViolation(f"the owner's start command asks for {args.get('enclaves')!r} enclaves; "
                                  "this is a single enclave")
        choice = self._choice(args)
        spec, k = ModelSpec.parse(choice.model), choice.split
        cfg = TrainConfig.from_dict(args.get("config", {}))
        head = choice.head  # last layers run here too (`train run --head N`); checked below
        defence = DefenceSpec.from_dict(choice.defence.to_dict())  # the plan's form, normalised
        if not self._items:
            raise DataError("no training instances have been contributed")
        self._drop_prefetch()
        with self.clock.stage("start_open_instances"):
            ds = EnclaveDataset(self._data_key, list(self._items.items()), sort=True, plan=self.plan_hash)
        total = cfg.steps_per_epoch(len(ds)) * cfg.epochs
        run = {"run_id": cmd.model_id, "owner": cmd.owner.to_bytes().hex(), "model": spec.text, "split": k,
               "head": choice.head, "defence": choice.defence.to_dict(), "plan": self.plan_hash.hex(),
               "config": cfg.to_dict(), "dataset": ds.digest(), "n": len(ds), "total_steps": total,
               "classes": list(self.plan.classes)}
        # Initial weights from a keyed seed, not from the config's seed: the host receives the
        # BackNet's initial weights (classifier rows in the secret order). Built from
        # manual_seed(config seed), the host could rebuild the same model, match the rows and
        # recover the secret class order (then name each instance's class from the sign of
        # dL/dscores), and it would know the FrontNet at step 0, making the first IRs a white-box
        # inversion. A small config seed could even be brute-forced from the BackNet weights.
        torch.manual_seed(self._secret_seed(b"init", run))
        model = self.plan.build_model(spec.text, self.allowed_factories, k, head)  # allow-list, classes, split
        defence_seed = self._secret_seed(b"defence", run)  # the host cannot redraw the noise
        ir_shape = tuple(model.partition_points()[k - 1].out_shape)  # for a local FrontNet (`local=1`)
        back_state = None
        if checkpoint:
            meta, tensors, blob = self._open_checkpoint(checkpoint)
            old = {"head": 0, "defence": DefenceSpec().to_dict(), **meta["run"]}
            for key in ("run_id", "owner", "plan", "model", "split", "head", "defence", "config", "dataset"):
                if old.get(key) != run[key]:
                    raise TamperedMessage(f"checkpoint does not belong to this run ({key} differs)")
            mapping = ClassMapping(tensors.pop("mapping.perm"))
            front, _, head_mod = split_with_head(model, k, head, mapping)
            trainer = EnclaveTrainer(front, mapping, self.plan.preprocessing(), cfg, total, head_mod, defence,
                                     defence_seed, ir_shape)
            trainer.load_state_bytes(blob)
        else:
            mapping = self._mapping_for(run, len(self.plan.classes))
            front, back, head_mod = split_with_head(model, k, head, mapping)
            trainer = EnclaveTrainer(front, mapping, self.plan.preprocessing(), cfg, total, head_mod, defence,
                                     defence_seed, ir_shape)
            back_state = _safetensors_bytes(back.state_dict())
        self._consume_nonce(cmd.nonce)
        self._order_cache = None  # the epoch order belongs to this run's seed and data set
        self.model, self.spec, self.k, self.ds, self.run, self.trainer = model, spec, k, ds, run, trainer
        self.head = head
        # what the host's output must look like per instance: scores, or the cut-layer features
        self._host_out = ((len(self.plan.classes),) if head == 0 else
                          tuple(model.partition_points()[len(model) - head - 1].out_shape))
        self.owner = cmd.owner
        self._final = None
        info = {"run_id": run["run_id"], "model": spec.text, "split": k, "head": head,
                "defence": defence.to_dict(), "plan": self.plan_hash.hex(), "config": cfg.to_dict(),
                "n": len(ds), "dropped": ds.dropped, "total_steps": total, "start_step": trainer.step}
        return info, back_state

    def _choice(self, args: dict) -> RunChoice:
        """The run a start command asks for, if it names this enclave's plan and stays inside it."""
        named = args.get("plan")
        if not isinstance(named, str) or not hmac.compare_digest(named.encode(), self.plan_hash.hex().encode()):
            raise PolicyViolation("start command is not bound to this enclave's training plan "
                                  f"{self.plan_hash.hex()[:16]}... (it names {str(named)[:16]}...)")
        choice = self.plan.resolve(args.get("model"), args.get("split"), args.get("head"), args.get("defence"),
                                   args.get("classes"))
        return choice

    def _secret_seed(self, purpose: bytes, run: dict) -> int:
        """A 64-bit seed that is a keyed function of what defines the training.

        HMAC(sealing key "caltrain/mapping", purpose, owner, model, split, config incl. seed,
        data set digest). The host cannot compute it (it never holds the sealing key), and two
        runs of the same configuration on the same data in this enclave (same code, same
        platform) get the same seeds, so they are bit-for-bit the same training. The run id is
        left out on purpose: a rerun under another id is the same training.
        """
        ident = {key: run[key] for key in ("owner", "plan", "model", "split", "head", "defence", "config", "dataset")}
        msg = purpose + b"\x00" + json.dumps(ident, sort_keys=True).encode()
        return int.from_bytes(hmac.new(self._mapping_key, msg, "sha256").digest()[:8], "big")

    def _mapping_for(self, run: dict, num_classes: int) -> ClassMapping:
        """The secret class permutation of a run, from `_secret_seed(b"mapping")`.

        Not a fresh random permutation per run: that made same-seed runs drift (the BackNet's
        classifier rows and the dL/dIR sum over classes come in another order, which changes
        float32 rounding, ~1e-8 at step 0, and training amplifies it; docs/caltrain.md).
        """
        g = torch.Generator().manual_seed(self._secret_seed(b"mapping", run))
        return ClassMapping.random(num_classes, generator=g)

    def _need_run(self) -> EnclaveTrainer:
        if self.trainer is None:
            raise UserInputError("no training run has been started")
        return self.trainer

    def _indices(self, step: int) -> torch.Tensor:
        cfg, n = self.trainer.cfg, len(self.ds)
        per = cfg.steps_per_epoch(n)
        epoch, b = divmod(step, per)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, cfg.epoch_order(n, epoch))
        return self._order_cache[1][b * cfg.batch:(b + 1) * cfg.batch]

    def forward(self, step: int) -> torch.Tensor:
        """The IR of step `step` (which must be the next one). Its batch was opened, re-verified
        and prepared ahead (`_prefetch_next`, while the host ran its BackNet) or is now; a batch
        that fails its checks fails this step, before any of it reaches the FrontNet."""
        tr = self._need_run()
        if step != tr.step or step >= tr.total_steps:
            raise TamperedMessage(f"host asked for step {step}, the enclave is at step {tr.step} of {tr.total_steps}")
        pre = self._take_prefetch(step)
        if pre is None:
            x, y, prepared = self._load_batch(tr, step, self._indices(step))
        else:
            with self.clock.stage("batch_wait"):
                x, y, prepared = pre.result()  # re-raises a refused instance's error
        with self.clock.stage("front_forward"):
            ir = tr.forward(x, y) if prepared is None else tr.forward(x, y, prepared=prepared)
        if self.prefetch and step + 1 < tr.total_steps:
            self._prefetch_next(tr, step + 1)
        return ir

    def _prepares_ahead(self, tr: EnclaveTrainer) -> bool:
        """Whether `tr` uses `EnclaveTrainer.prepare` (a subclass with its own forward does not)."""
        return type(tr).forward is EnclaveTrainer.forward

    def _load_batch(self, tr: EnclaveTrainer, step: int, idx: torch.Tensor):
        """(uint8 batch, labels, prepared input or None) of `step`: decrypt + re-verify every
        instance (raises on the first that fails), then augment + normalise."""
        with self.clock.stage("batch_open_verify"):
            x, y = self.ds.batch(idx)
        if not self._prepares_ahead(tr):
            return x, y, None
        with self.clock.stage("batch_prepare"):
            return x, y, tr.prepare(x, step)

    def _prefetch_next(self, tr: EnclaveTrainer, step: int) -> None:
        """Start loading `step`'s batch on the enclave's own thread (the order is computed here)."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="caltrain-prefetch")
        idx = self._indices(step)
        self._prefetch = (step, self._pool.submit(self._load_batch, tr, step, idx))

    def _take_prefetch(self, step: int):
        """The prefetched batch of `step`, if that is the one loaded (else None; it is dropped)."""
        pre, self._prefetch = self._prefetch, None
        if pre is None:
            return None
        if pre[0] != step:
            pre[1].cancel()
            return None
        return pre[1]

    def _drop_prefetch(self) -> None:
        """Forget a prefetched batch (a new run, a reset): wait for it so nothing runs behind us."""
        pre, self._prefetch = self._prefetch, None
        if pre is not None and not pre[1].cancel():
            try:
                pre[1].result()
            except Exception:
                pass

    def loss_grad(self, scores: torch.Tensor) -> torch.Tensor:
        with self.clock.stage("loss"):
            return self._loss_grad(scores)

    def _loss_grad(self, scores: torch.Tensor) -> torch.Tensor:
        tr = self._need_run()
        rows = None if tr._y is None else tr._y.shape[0]  # None: EnclaveTrainer says "before forward"
        if scores.dtype != torch.float32 or tuple(scores.shape[1:]) != self._host_out \
                or rows not in (None, scores.shape[0]):
            raise TamperedMessage("scores have the wrong shape or type" if self.head == 0 else
                                  "cut-layer features have the wrong shape or type")
        return tr.loss_grad(scores)

    def backward(self, d_ir: torch.Tensor) -> int:
        tr = self._need_run()
        with self.clock.stage("front_backward"):
            tr.backward(d_ir.float())
        return tr.step

    def checkpoint(self) -> bytes:
        tr = self._need_run()
        from safetensors.torch import load

        tensors = load(tr.state_bytes())
        tensors["mapping.perm"] = tr.mapping.perm.clone()
        meta = {"run": self.run, "step": tr.step, "owner": self.owner.to_bytes().hex()}
        blob = _safetensors_bytes(tensors, {"caltrain": json.dumps(meta, sort_keys=True), "step": str(tr.step),
                                            "total_steps": str(tr.total_steps)})
        return seal(self._state_key, blob, b"caltrain/checkpoint")

    def _open_checkpoint(self, token: bytes) -> tuple[dict, dict[str, torch.Tensor], bytes]:
        from safetensors.torch import load

        blob = open_sealed(self._state_key, token, b"caltrain/checkpoint")
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8:8 + n])["__metadata__"]["caltrain"])
        return meta, load(blob), blob

    def finish(self, back_state: bytes) -> dict:
        """After the last step: fingerprints, sealed linkage records, the sealed final state."""
        from safetensors.torch import load

        tr = self._need_run()
        if tr.step != tr.total_steps:
            raise UserInputError(f"training is at step {tr.step} of {tr.total_steps}")
        self._drop_prefetch()
        host_layers(self.model, self.k, self.head).load_state_dict(load(back_state))
        permute_classifier(self.model, tr.mapping, inverse=True)  # the released model is in class order
        fps = self._fingerprints()
        records = [LinkageRecord(fps[i].numpy(), m[3], m[0], m[1], m[2]) for i, m in enumerate(self.ds.meta)]
        return self._seal_final(records)

    def _fingerprints(self, chunk: int = 512) -> torch.Tensor:
        """Every instance's fingerprint under the final model (eval mode, no augmentation), chunk
        by chunk: the same batches of 256 as one `fingerprints` call over `all_pixels`, so the
        same values, without holding every decrypted image at once. Signatures already checked
        in this run's batches are not checked again (`EnclaveDataset.all_pixels`). Channels-last
        (`fingerprints(channels_last=True)`): 1.4x faster, equal up to float rounding. Chunks run
        on `fingerprint_workers` threads of one torch thread each (the host's core is idle
        meanwhile), the same values as one after the other. (Two torch intra-op threads instead
        were 2.1-3.4x slower than one at load 9-15 on 2 cores: their barriers spin on busy cores;
        `benchmarks/bench_fingerprint_pass.py`.)"""
        import copy
        from concurrent.futures import ThreadPoolExecutor

        pre, n = self.plan.preprocessing(), len(self.ds)
        # a copy (the released model is untouched), in eval mode before any thread uses it
        model = (channels_last_copy(self.model) if self.channels_last else copy.deepcopy(self.model)).eval()

        def one(i: int) -> torch.Tensor:
            with self.clock.stage("fingerprints_open"):
                x, _ = self.ds.batch(torch.arange(i, min(i + chunk, n)), reverify=False)
            with self.clock.stage("fingerprints_forward"):
                return fingerprints(model, x, pre, channels_last=self.channels_last)

        starts = range(0, n, chunk)
        if self.fingerprint_workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(self.fingerprint_workers, thread_name_prefix="caltrain-fp") as pool:
                out = list(pool.map(one, starts))  # in order; each chunk computed as it would be alone
        else:
            out = [one(i) for i in starts]
        return torch.cat(out) if out else torch.zeros(0, 0)

    def _seal_final(self, records: list, **extra) -> dict:
        """The end of a run (one enclave or a group's enclave 0): seal the linkage records under a
        fresh key and the released model with its header under the state key."""
        linkage_key = generate_key()
        store_id = self.run["run_id"]
        with self.clock.stage("seal_records"):
            tokens, meta_token = seal_records(linkage_key, records, store_id)
        front, back = self.model.split(self.k)
        files = {"model.safetensors": _safetensors_bytes(self.model.state_dict()),
                 "front.safetensors": _safetensors_bytes(front.state_dict()),
                 "back.safetensors": _safetensors_bytes(back.state_dict())}
        header = {"run_id": store_id, "model": self.spec.text, "arch": self.spec.arch, "split": self.k,
                  "classes": self.run["classes"], "input": list(self.plan.input),
                  "head": self.run["head"], "defence": self.run["defence"],
                  "plan": self.plan.to_dict(), "plan_hash": self.plan_hash.hex(),
                  "preprocessing": self.plan.preprocessing().to_dict(), "config": self.run["config"],
                  "instances": len(records), "linkage_key": linkage_key.hex(), "owner": self.run["owner"], **extra}
        with self.clock.stage("seal_final"):
            final = seal(self._state_key, pack_files(header, files), b"caltrain/final")
        self._records = tokens
        return {"records": len(tokens), "meta_token": meta_token, "final": final}

    def records(self, start: int, count: int) -> list[bytes]:
        """Sealed linkage records [start, start+count) of the finished run (fetched in chunks)."""
        return list(getattr(self, "_records", [])[max(0, start):max(0, start) + max(0, min(count, 5000))])

    def release(self, command: bytes, final: bytes) -> bytes:
        """The owner's signed release command -> the model + linkage key, HPKE-sealed to the owner."""
        cmd = self._open_command(command, RELEASE)
        data = open_sealed(self._state_key, final, b"caltrain/final")
        header, _ = unpack_files(data)
        require_owner(cmd, VerifyKey.from_bytes(bytes.fromhex(header["owner"])))
        if not hmac.compare_digest(cmd.model_id.encode(), str(header["run_id"]).encode()):
            raise Unauthorized("release command names another run")
        try:
            reply_to = bytes.fromhex(str(cmd.args["reply_to"]))
        except (KeyError, ValueError):
            raise TamperedMessage("release command carries no reply key") from None
        msg, _ = seal_request(reply_to, data, b"", info=RELEASE_INFO)
        self._consume_nonce(cmd.nonce)
        return msg


    # -- label audit (after finish; see audit.py) -------------------------------------------------

    def audit_records(self, start: int, tokens: list[bytes]) -> int:
        """The finished run's sealed linkage records, from the host's store, in order and in chunks.

        The enclave opens them in `audit` with the run's linkage key, which checks every AAD and
        the sealed count, so a host that drops, edits or reorders records is caught there.
        """
        if start == 0:
            self._audit_tokens: list[bytes] = []
        have = getattr(self, "_audit_tokens", [])
        if start != len(have):
            raise UserInputError(f"audit records must come in order: expected start {len(have)}, got {start}")
        have.extend(bytes(t) for t in tokens)
        self._audit_tokens = have
        return len(have)

    def audit(self, command: bytes, final: bytes, meta_token: bytes) -> bytes:
        """The owner's signed audit command -> the signed label audit, HPKE-sealed to the owner.

        The report (`audit.audit_report`) is signed with this enclave instance's Ed25519 audit
        key, and the enclave's evidence binds that key and the report's SHA-256
        (report data = SHA-256(audit key || SHA-256(report))), so the owner, and anyone the owner
        shows it to, can check with the participants' policy that this enclave wrote it.
        """
        from .audit import audit_report
        from .linkage import open_records, records_to_arrays

        cmd = self._open_command(command, AUDIT)
        header, _ = unpack_files(open_sealed(self._state_key, final, b"caltrain/final"))
        require_owner(cmd, VerifyKey.from_bytes(bytes.fromhex(header["owner"])))
        if not hmac.compare_digest(cmd.model_id.encode(), str(header["run_id"]).encode()):
            raise Unauthorized("audit command names another run")
        try:
            reply_to = bytes.fromhex(str(cmd.args["reply_to"]))
        except (KeyError, ValueError):
            raise TamperedMessage("audit command carries no reply key") from None
        tokens = list(getattr(self, "_audit_tokens", []))
        records = open_records(bytes.fromhex(header["linkage_key"]), meta_token, list(enumerate(tokens)),
                               expect_store=str(header["run_id"]))
        if len(records) != int(header["instances"]):
            raise TamperedMessage("the linkage records do not cover the run's instances")
        fps, labels = records_to_arrays(records)
        report = audit_report(fps, labels, [r.participant for r in records], [r.instance_hash for r in records],
                              len(header["classes"]), run_id=str(header["run_id"]), seed=int(header["config"]["seed"]))
        msg, _ = seal_request(reply_to, json.dumps(self.sign_audit(report)).encode(), b"", info=AUDIT_INFO)
        self._consume_nonce(cmd.nonce)
        self._audit_tokens = []
        return msg

    def sign_audit(self, report: dict) -> dict:
        """{report, signature, audit_key, evidence}: signed by this instance's audit key, bound by evidence."""
        from ..crypto import SigningKey
        from .audit import report_digest, signed_bytes

        if getattr(self, "_audit_key", None) is None:
            self._audit_key = SigningKey.generate()  # lives and dies with this enclave instance
        vk = self._audit_key.public_key().to_bytes()
        from ..tee import bind_report_data

        ev = self.be.evidence(bind_report_data(vk, report_digest(report)))
        return {"report": report, "signature": self._audit_key.sign(signed_bytes(report)).hex(),
                "audit_key": vk.hex(), "evidence": ev.to_dict()}
