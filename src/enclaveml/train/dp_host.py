"""Data-parallel CalTrain across N training enclaves: the hosts' side, on torch.distributed.

Trust side: host. Rank 0 is the ordinary CalTrain HTTP server (`train serve --enclaves N`; it
ingests uploads and answers the owner); ranks 1..N-1 are peer host processes (`train peer`),
each with its own enclave worker. They rendezvous through a `torch.distributed.TCPStore` that
rank 0 serves; each run is one process group (gloo; the BackNets' group uses NCCL when the hosts
run them on GPUs, the enclaves' ciphertext always goes through a gloo group on the CPU). What the
hosts carry between the enclaves is opaque to them: hellos, evidence, the join tokens enclave 0
seals to each peer, the sealed instances (broadcast by rank 0, so peers need no shared disk),
and per step one AEAD ciphertext of FrontNet gradients per enclave (`all_gather` of uint8
tensors). The BackNets are plain `DistributedDataParallel` replicas.

A run, every rank (`run_rank`):
    broadcast sealed instances from rank 0          -> add_data to the own enclave
    all_gather hellos, evidence                     -> dp_attest / dp_verify (mutual attestation)
    rank 0: dp_lead_start(owner command, checkpoint) -> broadcast join tokens (+ host checkpoint)
    ranks > 0: dp_join(token)
    per step: forward -> DDP BackNet forward -> loss -> DDP backward (all-reduce) -> dp_backward
              -> all_gather gradient ciphertexts -> dp_apply (mean, SGD step); rank 0 checkpoints
    peers: dp_records -> gathered to rank 0 -> dp_finish -> one linkage store

A failure on any rank fails the run on every rank (a peer process exits; the others' collectives
then fail). Rank 0 restarts any peer that has exited before the next run, which resumes from
enclave 0's checkpoint (the replicas hold identical state, so one checkpoint covers the group).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import EnclaveMLError, TamperedMessage, UserInputError
from .partitioned import HostTrainer, TrainConfig, host_layers
from .spec import ModelSpec

#: How long a collective waits for a silent peer before the run fails (a dead peer usually fails
#: it at once: its sockets close).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("ENCLAVEML_DP_TIMEOUT", "300"))


# -- bytes over torch.distributed (host: ciphertext only) ------------------------------------------

class Exchange:
    """Opaque byte strings between the hosts of one process group; counts what this rank sends."""

    def __init__(self, group=None):
        self.group = group
        self.sent = 0

    def all_gather(self, data: bytes) -> list[bytes]:
        world = dist.get_world_size(self.group)
        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, n, group=self.group)
        top = max(int(s) for s in sizes)
        buf = torch.zeros(max(top, 1), dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [torch.empty(max(top, 1), dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(outs, buf, group=self.group)
        self.sent += len(data)
        return [bytes(o[:int(s)].numpy()) for o, s in zip(outs, sizes)]

    def broadcast(self, data: bytes | None, src: int = 0) -> bytes:
        me = dist.get_rank(self.group)
        n = torch.tensor([len(data) if me == src else 0], dtype=torch.int64)
        dist.broadcast(n, src, group=self.group)
        buf = torch.zeros(max(int(n), 1), dtype=torch.uint8)
        if me == src and data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(buf, src, group=self.group)
        if me == src:
            self.sent += len(data or b"")
        return bytes(buf[:int(n)].numpy())


def pack_list(items: list[bytes]) -> bytes:
    return struct.pack(">I", len(items)) + b"".join(struct.pack(">I", len(x)) + bytes(x) for x in items)


def unpack_list(data: bytes) -> list[bytes]:
    try:
        (n,) = struct.unpack_from(">I", data)
        out, off = [], 4
        for _ in range(n):
            (ln,) = struct.unpack_from(">I", data, off)
            if off + 4 + ln > len(data):
                raise struct.error("truncated")
            out.append(bytes(data[off + 4:off + 4 + ln]))
            off += 4 + ln
    except struct.error:
        raise TamperedMessage("a host message between the ranks is truncated") from None
    if off != len(data):
        raise TamperedMessage("a host message between the ranks has trailing bytes")
    return out


# -- the BackNet replica ----------------------------------------------------------------------------

class DDPHostTrainer(HostTrainer):
    """The host's BackNet as one `DistributedDataParallel` replica (gradients all-reduced in backward)."""

    def wrap(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = torch.device(self.device)
        self.ddp = DDP(self.module, device_ids=[dev.index or 0] if dev.type == "cuda" else None)

    def forward(self, ir: torch.Tensor) -> torch.Tensor:
        self.ddp.train()
        self._ir = ir.detach().to(self.device).requires_grad_(True)
        self._scores = self.ddp(self._ir)
        return self._scores.detach().cpu()


# -- one rank's run -----------------------------------------------------------------------------------

Call = Callable[..., tuple]


def _chunks_to_enclave(call: Call, ex: Exchange, rank: int, chunks) -> int:
    """Rank 0 broadcasts its store's sealed instances chunk by chunk (an empty message ends them);
    every rank hands each chunk to its own enclave. Returns how many the enclave holds."""
    it = iter(chunks or []) if rank == 0 else None
    count, ci = 0, 0
    while True:
        data = None
        if rank == 0:
            chunk = next(it, None)
            data = b"" if chunk is None else pack_list([t.encode() for t, _ in chunk] + [tok for _, tok in chunk])
        data = ex.broadcast(data)
        if not data:
            return count
        items = unpack_list(data)
        half = len(items) // 2
        tags = [t.decode() for t in items[:half]]
        h, _, _ = call("add_data", blobs={f"s{i}": tok for i, tok in enumerate(items[half:])}, tags=tags,
                       reset=ci == 0)
        count, ci = int(h["count"]), ci + 1


def run_rank(call: Call, rank: int, world: int, st: dict, device: str = "cpu", chunks=None,
             command: bytes | None = None, checkpoint: tuple | None = None, every: int = 50,
             save_checkpoint: Callable[[int, bytes, bytes], None] | None = None,
             finish: Callable[[dict, dict], None] | None = None, started: Callable[[dict], None] | None = None,
             ex: Exchange | None = None) -> dict:
    """Everything one rank's host does in one run (the process group is already initialised).

    Rank 0 passes its store's `chunks`, the owner's `command`, its `checkpoint` (step, enclave
    token, host state) and the callbacks that write checkpoints and the finished run; `started`
    is called once the run is set up (so the HTTP answer can come before the first step).
    """
    ex = ex or Exchange(dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None)
    _chunks_to_enclave(call, ex, rank, chunks)
    hello = call("dp_hello", rank=rank, world=world)[2]["hello"]
    hellos = ex.all_gather(hello)
    ev, _, _ = call("dp_attest", blobs={f"h{i}": h for i, h in enumerate(hellos)}, n=world)
    evs = ex.all_gather(json.dumps(ev["evidence"]).encode())
    call("dp_verify", evidences=[json.loads(e) for e in evs])
    # enclave 0 opens the owner's command and sends each peer its join token
    if rank == 0:
        try:
            info, _, b = call("dp_lead_start", blobs={"command": command or b"",
                                                      **({"checkpoint": checkpoint[1]} if checkpoint else {})})
            joins = [b[f"j{r}"] for r in range(1, world)]
            ex.broadcast(pack_list([b"ok"] + joins + [checkpoint[2] if checkpoint else b""]))
        except EnclaveMLError as e:
            ex.broadcast(pack_list([b"error", f"{type(e).__name__}: {e}".encode()]))
            raise
        back = b["back"]
        host_state = checkpoint[2] if checkpoint else b""
    else:
        msg = unpack_list(ex.broadcast(None))
        if msg[0] != b"ok":
            raise UserInputError(f"enclave 0 refused the run: {msg[1].decode(errors='replace')}")
        host_state = msg[-1]
        info, _, b = call("dp_join", blobs={"join": msg[rank]})
        back = b["back"]
    info.pop("id", None)
    spec = ModelSpec.parse(info["model"])
    cfg = TrainConfig.from_dict(info["config"])
    layers = host_layers(spec.build(), int(info["split"]), int(info.get("head", 0)))
    if info.get("defence", {}).get("name") == "selfsup":  # its second view would sync twice per step
        raise UserInputError("--defence selfsup is not offered with a data-parallel group (--enclaves 1)")
    host = DDPHostTrainer(layers, cfg, int(info["total_steps"]), device)
    if host_state:
        host.load_state_bytes(host_state)
        if host.step != info["start_step"]:
            raise TamperedMessage("host and enclave checkpoints are at different steps")
    else:
        from safetensors.torch import load

        layers.load_state_dict(load(back))
    host.wrap()
    st.update(state="running", step=info["start_step"], total=info["total_steps"], instances=info["n"],
              shard=info["shard"], enclaves=world, resumed_from=info["start_step"] if host_state else None)
    if started:
        started(dict(st))
    per_step: list[int] = []
    for step in range(host.step, host.total_steps):
        _, t, _ = call("forward", step=step)
        scores = host.forward(t["ir"])
        _, t, _ = call("loss", tensors={"scores": scores})
        d_ir = host.backward(t["grad"])
        tok = call("dp_backward", tensors={"grad": d_ir})[2]["grad"]
        before = ex.sent
        toks = ex.all_gather(tok)
        per_step.append(ex.sent - before)
        call("dp_apply", blobs={f"g{i}": x for i, x in enumerate(toks)}, n=world)
        st["step"] = step + 1
        if rank == 0 and save_checkpoint and ((step + 1) % every == 0 or step + 1 == host.total_steps):
            h, _, b = call("checkpoint")
            save_checkpoint(int(h["step"]), b["checkpoint"], host.state_bytes())
            st["checkpoint"] = int(h["step"])
    from safetensors.torch import save

    back_state = save({k: v.detach().cpu().contiguous() for k, v in host.module.state_dict().items()})
    # DDP broadcasts rank 0's buffers before each forward, so after the last step only rank 0's
    # BatchNorm statistics are the group's: every enclave fingerprints with rank 0's BackNet.
    back_state = ex.broadcast(back_state if rank == 0 else None)
    if rank == 0:
        toks = ex.all_gather(b"")[1:]
        h, _, b = call("dp_finish", blobs={"back": back_state, **{f"p{i}": x for i, x in enumerate(toks)}},
                       n=len(toks))
        if finish:
            finish(h, b)
    else:
        ex.all_gather(call("dp_records", blobs={"back": back_state})[2]["records"])
    st.update(state="done", bytes_per_step=(sum(per_step) / len(per_step)) if per_step else 0.0)
    return st


# -- process groups ----------------------------------------------------------------------------------

def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_group(store, seq: int, rank: int, world: int, device: str) -> None:
    dist.init_process_group(backend_for(device), store=dist.PrefixStore(f"run{seq}/", store), rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise UserInputError(f"--peer-address {text!r}: expected HOST:PORT") from None


def _die_with_parent() -> None:
    """A locally spawned peer stops when rank 0's process does (Linux PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


def peer_main(rank: int, world: int, address: str, tee: str, owner_hex: str, plan_json: str, device: str = "cpu",
              threads: int = 1, first_run: int | None = None, spawned: bool = False,
              allowed_factories: "tuple[str, ...] | list[str]" = ()) -> None:
    """A peer host (rank > 0): its own enclave worker, then every run rank 0 announces, forever.
    `allowed_factories`: as rank 0's (`train serve --allow-factory`; the same measured
    configuration, or the group's mutual attestation refuses this peer)."""
    from ..runtime.rpc import ChannelClient
    from ..runtime.spawn import WorkerSpec, start_worker

    if spawned:
        _die_with_parent()
    if not 0 < rank < world:
        raise UserInputError(f"a peer's rank is 1..{world - 1}, not {rank}")
    torch.set_num_threads(max(1, threads))
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{rank % torch.cuda.device_count()}"  # one GPU per peer where there are several
    host, port = parse_address(address)
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    proc, chan = start_worker(WorkerSpec("enclaveml.train.enclave_worker",
                                         ["--tee", tee, "--torch-threads", str(threads), "--owner", owner_hex,
                                          "--plan", plan_json, "--group",
                                          *[a for f in allowed_factories for a in ("--allow-factory", f)]]))
    client = ChannelClient(chan)

    def call(op, tensors=None, blobs=None, timeout=600.0, **header):
        return client.request({"op": op, **header}, tensors, blobs, timeout=timeout)

    seq = first_run if first_run is not None else int(store.add("runs", 0)) + 1
    try:
        while True:
            key = f"run/{seq}"
            try:
                store.wait([key], timedelta(seconds=60))
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit(f"peer {rank}: its enclave worker exited")
                continue
            order = json.loads(store.get(key))
            outcome = "ok"
            try:
                init_group(store, seq, rank, world, device)
                run_rank(call, rank, world, {}, device, every=int(order.get("every", 50)))
            except Exception as e:  # the run failed on some rank; this peer goes on if its enclave lives
                outcome = "failed"
                print(f"peer {rank}: run {order.get('run_id')!r} failed: {type(e).__name__}: {str(e)[:200]}",
                      file=sys.stderr, flush=True)
            finally:
                close_group()
            alive = proc.poll() is None and not client_closed(client)
            store.set(f"after/{seq}/{rank}", outcome if alive else "exit")
            if not alive:
                raise SystemExit(f"peer {rank}: its enclave worker is gone; restart this peer")
            seq += 1
    finally:
        client.close()
        try:
            proc.wait(timeout=5)
        except Exception:
            proc.kill()


def client_closed(client) -> bool:
    """Whether the channel to the enclave worker has failed (the worker died or hung up)."""
    return bool(getattr(client, "closed", False) or getattr(client, "_closed", False))


class PeerGroup:
    """Rank 0's view of the group: the TCPStore it serves, and the local peer processes it keeps up."""

    def __init__(self, world: int, tee: str, owner_hex: str, plan_json: str, device: str = "cpu",
                 threads: int = 1, address: str | None = None, spawn: bool = True,
                 allowed_factories: "tuple[str, ...] | list[str]" = ()):
        if isinstance(world, bool) or not 2 <= int(world) <= 64:
            raise UserInputError("--enclaves must be 2..64 for a group (1 is the ordinary server)")
        self.world, self.device = int(world), device
        host, port = parse_address(address) if address else ("127.0.0.1", 0)
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        self.address = f"{host}:{self.store.port}"
        self._args = [tee, owner_hex, plan_json, device, str(threads)]
        self._factory_args = [a for f in allowed_factories for a in ("--allow-factory", f)]
        self.spawn = spawn
        self.seq = 0
        self.procs: dict[int, subprocess.Popen] = {}
        if spawn:
            for r in range(1, self.world):
                self._spawn(r)

    def _spawn(self, rank: int) -> None:
        tee, owner_hex, plan_json, device, threads = self._args
        self.procs[rank] = subprocess.Popen(
            [sys.executable, "-m", "enclaveml", "train", "peer", "--rank", str(rank), "--enclaves", str(self.world),
             "--peer-address", self.address, "--tee", tee, "--owner", owner_hex, "--plan-json", plan_json,
             "--device", device, "--threads", threads, "--first-run", str(self.seq + 1), "--spawned",
             *self._factory_args],
            close_fds=True)

    def respawn_dead(self, wait_s: float = 30.0) -> list[int]:
        """Before a run: wait until every local peer has reported how the previous run ended, then
        restart those that have exited (their enclave died). Returns the restarted ranks."""
        if self.seq > 0:
            deadline = time.time() + wait_s
            for r, p in self.procs.items():
                key = f"after/{self.seq}/{r}"
                while p.poll() is None and time.time() < deadline:
                    try:
                        self.store.wait([key], timedelta(seconds=1))
                        break
                    except Exception:
                        continue
                if p.poll() is None and self.store.check([key]) and self.store.get(key) == b"exit":
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(timeout=10)
        dead = [r for r, p in self.procs.items() if p.poll() is not None]
        for r in dead:
            self._spawn(r)
        return dead

    def announce(self, run_id: str, every: int) -> int:
        """Tell the peers a run starts; returns its sequence number (the process group's prefix)."""
        self.seq += 1
        self.store.add("runs", 1)
        self.store.set(f"run/{self.seq}", json.dumps({"run_id": run_id, "every": every}))
        return self.seq

    def peer_pids(self) -> dict[int, int]:
        return {r: p.pid for r, p in self.procs.items() if p.poll() is None}

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except Exception:
                p.kill()


def lead_start(host, group: PeerGroup, run_id: str, command: bytes, every: int, rs) -> dict:
    """Rank 0's `/train/start` for a group: announce, join the process group, set the run up, then
    train in a thread. Returns once the run is set up (or raises what the enclave refused)."""
    group.respawn_dead()
    seq = group.announce(run_id, every)
    ck = rs.load_checkpoint()
    st: dict[str, Any] = {"run_id": run_id, "state": "running", "step": 0, "total": None, "started": time.time()}
    ready = threading.Event()
    err: dict[str, BaseException] = {}

    def save(step: int, token: bytes, state: bytes) -> None:
        rs.save_checkpoint(step, token, state)

    def finish(h: dict, b: dict) -> None:
        tokens: list[bytes] = []
        while len(tokens) < int(h["records"]):
            hr, _, br = host.call("records", start=len(tokens), count=2000)
            if int(hr["n"]) == 0:
                raise TamperedMessage("enclave returned fewer linkage records than it announced")
            tokens += [br[f"r{i}"] for i in range(int(hr["n"]))]
        with host._linkage(rs, run_id) as store:
            store.write_sealed(tokens, b["meta"])
        rs.save_final(b["final"])

    def body() -> None:
        try:
            init_group(group.store, seq, 0, group.world, group.device)
            try:
                run_rank(host.call, 0, group.world, st, group.device, host.instances.iter_chunks(), command, ck,
                         every, save, finish, started=lambda _: ready.set())
                st.update(seconds=round(time.time() - st["started"], 1))
                host.metrics["train_steps"] += int(st.get("total") or 0) - int(st.get("resumed_from") or 0)
            finally:
                close_group()
        except BaseException as e:  # the run stops; the server goes on serving
            err["e"] = e
            host.metrics["train_failed"] += 1
            st.update(state="failed", error=f"{type(e).__name__}: {e}"[:300])
        finally:
            ready.set()

    host.runs[run_id] = st
    threading.Thread(target=body, daemon=True, name=f"train-{run_id}").start()
    ready.wait(timeout=min(COLLECTIVE_TIMEOUT_S + 60, 240))  # the owner's client waits 300 s for this answer
    if st["state"] == "failed" and isinstance(err.get("e"), EnclaveMLError) and st.get("total") is None:
        raise err["e"]  # refused before the first step (owner, plan, checkpoint): say so in the answer
    return dict(st)
