"""One training enclave of a data-parallel CalTrain run over N enclaves (`train serve --enclaves N`).

Trust side: enclave. No I/O: the enclave worker moves bytes, the hosts carry ciphertext between
the enclaves (`dp_host.py`, torch.distributed). What this adds to `CalTrainEnclave`:

- **Mutual attestation** (`peer_keys.PeerSession`): every enclave verifies every other's evidence
  (same measurement, same plan hash, fresh for this session) before any key exists for it.
- **Shards.** Every enclave is handed the same full list of sealed instances; each keeps (and
  decrypts) only those whose tag falls in its shard (`shard_of`: a hash of the tag, which the
  sealed instance's AAD binds), and all of them check that they were handed the same set (its
  digest travels in the attested join message). So each instance is trained on by exactly one
  enclave: a host that hides an instance from one enclave, or adds one, is refused; a forged tag
  does not open in the enclave whose shard it names.
- **The run comes from enclave 0.** The owner's start command is sealed to enclave 0's key;
  enclave 0 checks it as a single enclave does (owner, plan, nonce) and sends each verified peer,
  under their pair key, the run, the secret class mapping and initial-weight seed, the data key
  (so a peer on another machine opens the same sealed instances), a fresh group key for the run's
  step messages, and on resume its checkpointed FrontNet state. Only enclave 0 checkpoints (every
  replica holds the same state), so a resume needs one consistent checkpoint, not N.
- **Each step**: local FrontNet gradients (over this enclave's part of the global batch) leave
  only as AES-256-GCM under the group key, nonce and AAD (GRAD, sender rank, step, session), so
  the host cannot replay an older step, swap senders, drop one and substitute another, or edit a
  byte; every enclave averages the N gradients in rank order, so all FrontNets stay bit-identical.
- **Finish**: peers send enclave 0 their shard's linkage records (fingerprints, labels,
  signatures) encrypted the same way; enclave 0 seals all of them under one linkage key into one
  store, so one `train trace` sees every shard.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import numpy as np
import torch

from ..crypto.peer_channel import BROADCAST, PeerBox, random_key
from ..errors import DataError, PolicyViolation, ReplayedMessage, TamperedMessage, UserInputError
from .defences import DefenceSpec
from .enclave import CalTrainEnclave, _safetensors_bytes
from .fingerprint import fingerprints
from .instances import EnclaveDataset
from .linkage import LinkageRecord
from ..models.classmap import ClassMapping
from ..models.split import permute_classifier
from .partitioned import EnclaveTrainer, TrainConfig, host_layers, split_with_head
from .peer_keys import GRAD, JOIN, RECORDS, PeerSession, check_same_configuration, peer_policy
from .spec import ModelSpec

_SHARD = b"enclaveml/v1 caltrain-dp-shard\x00"
_RUN_KEYS = ("run_id", "owner", "plan", "model", "split", "head", "defence", "config", "dataset", "enclaves")


def shard_of(tag: str, world: int) -> int:
    """Which enclave trains on the instance with this tag (deterministic; every enclave agrees)."""
    return int.from_bytes(hashlib.sha256(_SHARD + str(tag).encode()).digest()[:8], "big") % int(world)


def tags_digest(tags: list[str]) -> str:
    """SHA-256 over the sorted tags: the same digest `EnclaveDataset.digest` gives the whole set."""
    h = hashlib.sha256()
    for t in sorted(tags):
        h.update(t.encode())
    return h.hexdigest()


def pack_records(records: list[LinkageRecord]) -> bytes:
    """count u32 || size u32 || fixed-size records (`LinkageRecord.to_bytes`)."""
    blobs = [r.to_bytes() for r in records]
    size = len(blobs[0]) if blobs else 0
    if any(len(b) != size for b in blobs):
        raise UserInputError("linkage records of one run have one size")
    return struct.pack(">II", len(blobs), size) + b"".join(blobs)


def unpack_records(data: bytes) -> list[LinkageRecord]:
    try:
        n, size = struct.unpack_from(">II", data)
    except struct.error:
        raise TamperedMessage("peer linkage records are truncated") from None
    if len(data) != 8 + n * size:
        raise TamperedMessage("peer linkage records have a bad layout")
    return [LinkageRecord.from_bytes(data[8 + i * size:8 + (i + 1) * size]) for i in range(n)]


class DPTrainer(EnclaveTrainer):
    """The enclave half of one data-parallel replica: local gradients out, the group's mean in.

    Augmentation randomness is per (step, rank), so two replicas do not draw the same crops for
    their rows (rank 0 draws what a single enclave draws)."""

    def __init__(self, *args, rank: int = 0, world: int = 1, **kw):
        super().__init__(*args, **kw)
        self.rank, self.world = int(rank), int(world)

    def forward(self, x_u8: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from .augment import augment

        self.module.train()
        gen = torch.Generator().manual_seed(self.cfg.seed * 7_919 + 1_000_000 + self.step + (self.rank << 40))
        x = augment(x_u8, gen) if self.cfg.augment else x_u8.float()
        x = self.pre.normalise(x.div_(255.0))
        self._ir = self.front(x)
        self._y = y
        return self._ir.detach()

    def _float_buffers(self) -> list[torch.Tensor]:
        return [b for b in self.module.buffers() if b.is_floating_point()]

    def local_grads(self, d_ir: torch.Tensor) -> torch.Tensor:
        """dL/dIR from the host -> this replica's parameter gradients and its floating-point buffers
        (BatchNorm running statistics of its own batches), flat float32 (not applied yet)."""
        if self._ir is None:
            raise UserInputError("backward before forward")
        if d_ir.shape != self._ir.shape:
            raise TamperedMessage(f"IR gradient has shape {tuple(d_ir.shape)}, expected {tuple(self._ir.shape)}")
        self._ir.backward(d_ir.float())
        self._ir, self._y = None, None
        flat = [torch.zeros(p.numel()) if p.grad is None else p.grad.detach().reshape(-1).float()
                for p in self.module.parameters()]
        flat += [b.detach().reshape(-1).float() for b in self._float_buffers()]
        return torch.cat(flat).contiguous()

    def apply_mean(self, grads: list[torch.Tensor]) -> None:
        """The N replicas' vectors in rank order -> their mean: the gradient of one SGD step, and
        the running statistics every replica keeps (so all replicas stay identical)."""
        total = grads[0].clone()
        for g in grads[1:]:
            total += g
        total /= len(grads)
        off = 0
        for p in self.module.parameters():
            n = p.numel()
            p.grad = total[off:off + n].view_as(p).clone()
            off += n
        with torch.no_grad():
            for b in self._float_buffers():
                n = b.numel()
                b.copy_(total[off:off + n].view_as(b))
                off += n
        self._apply_step()

    def grad_size(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) + sum(b.numel() for b in self._float_buffers())


class DistributedEnclave(CalTrainEnclave):
    """A `CalTrainEnclave` that trains one shard as one of `world` mutually attested replicas."""

    def __init__(self, backend, owner=None, plan=None, allowed_factories=None):
        super().__init__(backend, owner, plan, allowed_factories=allowed_factories)
        self._peers: PeerSession | None = None
        self._sealed: set[tuple[int, int]] = set()
        self._group: PeerBox | None = None
        self.rank, self.world = 0, 1

    # -- the single-enclave ops, refused in a group ----------------------------------------------

    def _no_single(self, op: str) -> None:
        """In a group session or a group run, a local `backward` would be a step on one shard only
        (and `finish` would release it) while the header says enclaves=N: dp_backward/dp_apply and
        dp_finish are the only ways forward."""
        if self._peers is not None or (self.run is not None and "enclaves" in self.run):
            raise PolicyViolation(f"{op!r} is a single-enclave op; this enclave is in a group of {self.world} "
                                  "(use the dp_ ops)")

    def start(self, command: bytes, checkpoint: bytes | None) -> tuple[dict, bytes | None]:
        self._no_single("start")
        return super().start(command, checkpoint)

    def backward(self, d_ir: torch.Tensor) -> int:
        self._no_single("backward")
        return super().backward(d_ir)

    def finish(self, back_state: bytes) -> dict:
        self._no_single("finish")
        return super().finish(back_state)

    # -- handshake ---------------------------------------------------------------------------

    def _verify_peer(self, evidence: dict, expected: bytes) -> None:
        from ..tee import Evidence, verify_claims_only, verify_evidence

        own = verify_claims_only(Evidence.from_dict(self._own_evidence))
        peer = verify_evidence(evidence, peer_policy(own), expected)
        check_same_configuration(own, peer)

    def _evidence_for(self, report_data: bytes) -> dict:
        self._own_evidence = self.be.evidence(report_data).to_dict()
        return self._own_evidence

    def dp_hello(self, rank: int, world: int) -> bytes:
        """Round 1 of a new group session (ends any run of an earlier session)."""
        self._peers = PeerSession(rank, world, self.plan_hash, self._evidence_for, self._verify_peer)
        self.rank, self.world = self._peers.rank, self._peers.world
        self._group, self.trainer, self.run = None, None, None
        self._sealed: set[tuple[int, int]] = set()  # (purpose, step) sealed in this session
        return self._peers.hello()

    def dp_attest(self, hellos: list[bytes]) -> dict:
        return self._need_peers().attest(hellos)

    def dp_verify(self, evidences: list[dict]) -> None:
        self._need_peers().verify(evidences)

    def _once(self, purpose: int, step: int, what: str) -> None:
        """Each (purpose, step) is sealed once per session: its nonce is deterministic, and AES-GCM
        under a repeated nonce would leak the XOR of two plaintexts and the authentication key."""
        if (purpose, step) in self._sealed:
            raise ReplayedMessage(f"{what} has already been sealed in this session")
        self._sealed.add((purpose, step))

    def _need_peers(self) -> PeerSession:
        if self._peers is None:
            raise UserInputError("no group session: dp_hello first")
        return self._peers

    # -- start ---------------------------------------------------------------------------------

    def _shard(self) -> tuple[list[tuple[str, bytes]], str, int]:
        tags = sorted(self._items)
        if not tags:
            raise DataError("no training instances have been contributed")
        mine = [(t, self._items[t]) for t in tags if shard_of(t, self.world) == self.rank]
        return mine, tags_digest(tags), len(tags)

    def dp_lead_start(self, command: bytes, checkpoint: bytes | None) -> tuple[dict, bytes | None, list[bytes]]:
        """Enclave 0: the owner's start command -> (info, BackNet initial state, a join token per peer 1..N-1)."""
        peers = self._need_peers()
        if peers.rank != 0:
            raise UserInputError("only enclave 0 opens the owner's start command")
        if not peers.verified():
            raise UserInputError("the group's evidence has not been verified")
        if (JOIN, 0) in self._sealed:
            raise ReplayedMessage("this group session has already started a run (a new run needs a new handshake)")
        cmd = self._open_command(command, "caltrain-start")
        args = cmd.args
        choice = self._choice(args)
        want = args.get("enclaves")
        if want is not None and want != self.world:
            raise PolicyViolation(f"the owner's start command asks for {want} enclaves; the host formed a group "
                                  f"of {self.world}")
        spec, k = ModelSpec.parse(choice.model), choice.split
        cfg = TrainConfig.from_dict(args.get("config", {}))
        mine, digest, n = self._shard()
        total = cfg.steps_per_epoch(n) * cfg.epochs
        run = {"run_id": cmd.model_id, "owner": cmd.owner.to_bytes().hex(), "model": spec.text, "split": k,
               "head": choice.head, "defence": choice.defence.to_dict(), "plan": self.plan_hash.hex(),
               "config": cfg.to_dict(), "dataset": digest, "n": n, "total_steps": total,
               "classes": list(self.plan.classes), "enclaves": self.world}
        self.plan.build_model(spec.text, self.allowed_factories, k, choice.head)  # allow-list, classes, split
        init_seed = self._secret_seed(b"init", run)
        defence_seed = self._secret_seed(b"defence", run)
        state = None
        if checkpoint:
            meta, tensors, blob = self._open_checkpoint(checkpoint)
            old = meta["run"]
            for key in _RUN_KEYS:
                if old.get(key) != run[key]:
                    raise TamperedMessage(f"checkpoint does not belong to this run ({key} differs)")
            perm = tensors.pop("mapping.perm")
            state = blob
        else:
            perm = self._mapping_for(run, len(self.plan.classes)).perm
        self._consume_nonce(cmd.nonce)  # before _setup replaces run/trainer/owner: a refused start changes nothing
        back = self._setup(run, mine, init_seed, defence_seed, perm, state)
        self._once(JOIN, 0, "the join messages")
        group_key = random_key()
        self._group = PeerBox(group_key, peers.session)
        joins = []
        for r in range(1, self.world):
            msg = {"run": run, "init_seed": init_seed, "defence_seed": defence_seed, "perm": perm.tolist(),
                   "group_key": group_key.hex(), "data_key": self._data_key.hex()}
            body = json.dumps(msg, sort_keys=True).encode()
            blob = struct.pack(">I", len(body)) + body + (state or b"")
            joins.append(peers.pair_box(r).seal(JOIN, 0, r, 0, blob))
        return self._info(), back, joins

    def dp_join(self, token: bytes) -> tuple[dict, bytes]:
        """Enclave r > 0: enclave 0's join token -> (info, BackNet initial state)."""
        peers = self._need_peers()
        if peers.rank == 0:
            raise UserInputError("enclave 0 leads; it does not join")
        if (JOIN, 0) in self._sealed:  # a replayed join token would rewind this replica to step 0
            raise ReplayedMessage("this enclave has already joined a run in this group session "
                                  "(a new run needs a new handshake)")
        data = peers.pair_box(0).open(JOIN, 0, peers.rank, 0, token, what="join message")
        (hn,) = struct.unpack_from(">I", data)
        msg = json.loads(data[4:4 + hn])
        state = data[4 + hn:] or None
        run = msg["run"]
        self._data_key = bytes.fromhex(msg["data_key"])
        mine, digest, n = self._shard()
        same = hmac.compare_digest(digest.encode(), str(run["dataset"]).encode())
        if not same or n != run["n"] or run["enclaves"] != self.world:
            raise TamperedMessage(f"the host handed enclave {self.rank} another set of instances than enclave 0 "
                                  f"({n} instances, digest {digest[:16]}...; enclave 0 has {run['n']}, "
                                  f"{str(run['dataset'])[:16]}...)")
        back = self._setup(run, mine, int(msg["init_seed"]), int(msg["defence_seed"]), torch.tensor(msg["perm"]), state)
        self._once(JOIN, 0, "the join message")
        self._group = PeerBox(bytes.fromhex(msg["group_key"]), peers.session)
        return self._info(), back

    def _setup(self, run: dict, mine: list, init_seed: int, defence_seed: int, perm: torch.Tensor,
               state: bytes | None) -> bytes:
        """Build this replica's model and trainer for `run` over its shard; the BackNet's initial state."""
        spec, k, head = ModelSpec.parse(run["model"]), int(run["split"]), int(run["head"])
        cfg = TrainConfig.from_dict(run["config"])
        ds = EnclaveDataset(self._data_key, mine, sort=True, plan=self.plan_hash)
        steps = cfg.steps_per_epoch(run["n"])
        if len(ds) < steps:
            raise DataError(f"enclave {self.rank}'s shard holds {len(ds)} instances, fewer than the {steps} steps "
                            "of an epoch: use fewer enclaves or a smaller --batch")
        torch.manual_seed(init_seed)
        model = self.plan.build_model(spec.text, self.allowed_factories, k, head)  # allow-list, classes, split
        mapping = ClassMapping(perm)
        front, back, head_mod = split_with_head(model, k, head, mapping)
        defence = DefenceSpec.from_dict(run["defence"])
        if defence.local_front:  # its local classifier would need the group's averaging too
            raise PolicyViolation(f"defence {defence.text} (a local FrontNet) is not supported across enclaves yet; "
                                  "train it with one enclave")
        seed = (defence_seed + self.rank * 0x9E3779B97F4A7C15) % (1 << 63)  # each replica its own noise
        trainer = DPTrainer(front, mapping, self.plan.preprocessing(), cfg, run["total_steps"], head_mod, defence, seed,
                            rank=self.rank, world=self.world)
        if state:
            trainer.load_state_bytes(state)
        back_state = _safetensors_bytes(back.state_dict())
        self._order_cache = None
        self.model, self.spec, self.k, self.ds, self.run, self.trainer = model, spec, k, ds, run, trainer
        self.head = head
        self._host_out = ((len(self.plan.classes),) if head == 0 else
                          tuple(model.partition_points()[len(model) - head - 1].out_shape))
        from ..crypto import VerifyKey

        self.owner = VerifyKey.from_bytes(bytes.fromhex(run["owner"]))
        self._final = None
        return back_state

    def _info(self) -> dict:
        r, tr = self.run, self.trainer
        return {"run_id": r["run_id"], "model": r["model"], "split": r["split"], "head": r["head"],
                "defence": r["defence"], "plan": self.plan_hash.hex(), "config": r["config"], "n": r["n"],
                "shard": len(self.ds), "rank": self.rank, "enclaves": self.world, "dropped": self.ds.dropped,
                "total_steps": r["total_steps"], "start_step": tr.step}

    # -- steps ---------------------------------------------------------------------------------

    def _indices(self, step: int) -> torch.Tensor:
        if self.run is None or "enclaves" not in self.run:
            return super()._indices(step)  # a single-enclave run
        cfg = self.trainer.cfg
        per = cfg.steps_per_epoch(self.run["n"])
        epoch, b = divmod(step, per)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, list(torch.tensor_split(cfg.epoch_order(len(self.ds), epoch), per)))
        return self._order_cache[1][b]

    def dp_backward(self, d_ir: torch.Tensor) -> bytes:
        """dL/dIR -> this replica's FrontNet gradients, sealed to the group for this step."""
        tr = self._need_run()
        if self._group is None:
            raise UserInputError("no group key: the run has not started")
        self._once(GRAD, tr.step, f"the FrontNet gradient of step {tr.step}")
        self._pending = tr.local_grads(d_ir)
        return self._group.seal(GRAD, self.rank, BROADCAST, tr.step, self._pending.numpy().tobytes(),
                                self._context())

    def dp_apply(self, tokens: list[bytes]) -> int:
        """Every replica's sealed gradients for this step (rank order) -> the mean -> SGD step."""
        tr = self._need_run()
        mine = getattr(self, "_pending", None)
        if mine is None:
            raise UserInputError("dp_apply before dp_backward")
        if len(tokens) != self.world:
            raise TamperedMessage(f"expected gradients of {self.world} enclaves for step {tr.step}, got {len(tokens)}")
        grads = []
        for r, tok in enumerate(tokens):
            if r == self.rank:
                grads.append(mine)  # our own, never the host's copy
                continue
            raw = self._group.open(GRAD, r, BROADCAST, tr.step, tok, self._context(), what="FrontNet gradient")
            g = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
            if g.numel() != mine.numel():
                raise TamperedMessage(f"enclave {r}'s gradient has {g.numel()} values, expected {mine.numel()}")
            grads.append(g)
        self._pending = None
        tr.apply_mean(grads)
        return tr.step

    def _context(self) -> bytes:
        return json.dumps({"run": self.run["run_id"], "world": self.world, "dataset": self.run["dataset"]},
                          sort_keys=True).encode()

    # -- finish --------------------------------------------------------------------------------

    def _shard_records(self, back_state: bytes) -> list[LinkageRecord]:
        from safetensors.torch import load

        tr = self._need_run()
        if tr.step != tr.total_steps:
            raise UserInputError(f"training is at step {tr.step} of {tr.total_steps}")
        host_layers(self.model, self.k, self.head).load_state_dict(load(back_state))
        permute_classifier(self.model, tr.mapping, inverse=True)  # fingerprints in class order
        fps = fingerprints(self.model, self.ds.all_pixels(), self.plan.preprocessing())
        return [LinkageRecord(fps[i].numpy(), m[3], m[0], m[1], m[2]) for i, m in enumerate(self.ds.meta)]

    def dp_records(self, back_state: bytes) -> bytes:
        """Enclave r > 0 after the last step: its shard's linkage records, sealed to the group."""
        if self.rank == 0:
            raise UserInputError("enclave 0 finishes the run; it does not send records")
        if self._group is None:
            raise UserInputError("no group key: the run has not started")
        self._once(RECORDS, self.trainer.total_steps if self.trainer else -1, "this enclave's linkage records")
        recs = self._shard_records(back_state)
        body = hashlib.sha256(back_state).digest() + pack_records(recs)  # which BackNet fingerprinted them
        return self._group.seal(RECORDS, self.rank, 0, self.trainer.total_steps, body, self._context())

    def dp_finish(self, back_state: bytes, peer_tokens: list[bytes]) -> dict:
        """Enclave 0: its own and every peer's records -> one sealed linkage store; the sealed final state."""
        if self.rank != 0:
            raise UserInputError("only enclave 0 finishes the run")
        if len(peer_tokens) != self.world - 1:
            raise TamperedMessage(f"expected linkage records of {self.world - 1} peers, got {len(peer_tokens)}")
        records = self._shard_records(back_state)
        own = hashlib.sha256(back_state).digest()
        for r, tok in enumerate(peer_tokens, start=1):
            raw = self._group.open(RECORDS, r, 0, self.trainer.total_steps, tok, self._context(),
                                   what="linkage records")
            if not hmac.compare_digest(raw[:32], own):  # else the host gave that peer a garbage BackNet
                raise TamperedMessage(f"enclave {r} fingerprinted its shard with another BackNet than the one "
                                      "enclave 0 releases")
            records += unpack_records(raw[32:])
        hashes = {r.instance_hash for r in records}
        if len(records) != self.run["n"] or len(hashes) != len(records):
            raise TamperedMessage(f"the shards' linkage records cover {len(hashes)} distinct instances in "
                                  f"{len(records)} records, expected {self.run['n']}")
        return self._seal_final(records, enclaves=self.world)
