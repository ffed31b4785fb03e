"""The CalTrain training host: an HTTP server in front of the training enclave (untrusted side).

Trust side: host. It relays ciphertext between participants/owner and the enclave worker, stores
what the enclave sealed, and runs the BackNet half of training on IRs (CPU or GPU). It never holds
a key that opens an instance, a label, the loss, the class mapping or the linkage records.

HTTP API (JSON; bytes as base64; the messages are `protocol.caltrain`'s and `protocol.attest`'s):
    GET  /info                       the training plan (and its hash), classes and data model
    GET  /evidence?nonce=HEX         enclave evidence binding its HPKE key to the nonce
    POST /contribute  {uploads}      per upload: accepted | exists | rejected (with reason)
    POST /train/start {run_id, command, checkpoint_every}    owner-signed; resumes a checkpoint
    GET  /train/status?run_id=R[&wait=S]   state, step, total steps (`wait`: answer as soon as the
                                     run is no longer running, or after S seconds, at most 30)
    GET  /train/stages               per-stage time totals of the host and of the enclave
                                     (`timing.StageClock`: counts and times only)
    POST /train/release {run_id, command}   the model + linkage key, sealed to the owner
    GET  /train/linkage?run_id=R     the encrypted linkage store (SQLite file)
    POST /train/audit {run_id, command}     owner-signed label audit, signed by the enclave, sealed to the owner
    GET  /metrics                    counters (rejections by kind, steps, requests, enclave restarts)
    GET  /healthz                    the enclave worker: "ok" (200) or why not (503: restarting,
                                     unresponsive, down), as the serving host's
Errors: enclaveml errors -> 400/403/404/409 with {"error": kind, "message": text}; an enclave
worker that is not there (restarting) -> 503 EnclaveUnavailable; the server keeps serving.
`TrainingHost` is the service (no HTTP type); the routes in `create_app` only decode a message,
run one `TrainingHost` call in a worker thread (enclave calls block: never on the event loop)
and encode the answer.

The worker is started, supervised and restarted through the one enclave runtime
(`runtime.handle`), by fd or, with `worker_socket`/`worker_launch`, over a socket path or under
Gramine, exactly as the serving host's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import Request

from ..runtime.errors import ChannelError
from ..timing import StageClock
from ..errors import (DataError, EnclaveMLError, EvidenceRejected, PolicyViolation, TamperedMessage, Unauthorized,
                      UserInputError)
from ..protocol import caltrain as msg
from ..protocol.attest import EvidenceAnswer
from .defences import DefenceSpec
from .partitioned import HostTrainer, TrainConfig, host_layers
from .plan import TrainingPlan
from .spec import ModelSpec
from .store import InstanceStore, RunStore, check_run_id

MAX_UPLOADS_PER_REQUEST = msg.MAX_UPLOADS_PER_REQUEST
WORKER_MODULE = "enclaveml.train.enclave_worker"
#: Enclave worker states (as the serving host's /healthz).
STATUS_OK = "ok"
STATUS_RESTARTING = "enclave restarting"
STATUS_UNRESPONSIVE = "enclave unresponsive"
STATUS_DOWN = "enclave down"
#: Why a run stopped when its enclave worker died or hung.
WORKER_LOST = "the enclave worker stopped; start the run again to resume from its last checkpoint"
_STATUS = {UserInputError: 400, DataError: 400, TamperedMessage: 400, EvidenceRejected: 400,
           PolicyViolation: 403, Unauthorized: 403}


def worker_args(owner_hex: str, plan: TrainingPlan, allowed_factories: "tuple[str, ...]" = (),
                group: bool = False) -> list[str]:
    """The training worker's own flags: its owner, plan and allowed user architectures (measured:
    sim config / the manifest), and `--group` for one enclave of a data-parallel group."""
    from ..tee.sim_evidence import canonical_json

    return ["--owner", owner_hex, "--plan", canonical_json(plan.to_dict()).decode(),
            *[a for f in allowed_factories for a in ("--allow-factory", f)], *(["--group"] if group else [])]


class TrainingHost:
    """Everything the server does, without HTTP (so tests and the CLI share it)."""

    def __init__(self, store: Path, tee: str = "sim", data_model: str = "darknet", device: str = "cpu",
                 threads: int = 1, owner: str | bytes | None = None, linkage_url: str | None = None,
                 plan: "TrainingPlan | None" = None, enclaves: int = 1, peer_address: str | None = None,
                 spawn_peers: bool = True, allowed_factories: "tuple[str, ...] | list[str]" = (),
                 worker_socket: str | None = None, worker_launch=None,
                 ping_interval_s: float = 2.0, ping_timeout_s: float = 10.0, supervise: bool = True):
        """`plan`: what this deployment trains (plan.py); default the owner's open plan over
        `data_model`. Given a plan, `owner` may be omitted and `data_model` must be its data model.
        `enclaves` > 1: this host is rank 0 of a data-parallel group (dp_host.py) whose peers
        rendezvous at `peer_address` (HOST:PORT; default a free loopback port) and are spawned
        here unless `spawn_peers` is False (then start them with `train peer`).
        `allowed_factories`: user architectures the enclave may build (measured, `--allow-factory`);
        the plan's own factory is always added.
        `worker_socket` (and `worker_launch`, e.g. `gramine-sgx worker`): reach the enclave worker
        over that Unix socket path, as the serving host does (`runtime.spawn`). `supervise`: restart
        a dead worker, or one that misses a liveness ping for `ping_timeout_s` (`runtime.handle`)."""
        from ..runtime.handle import EnclaveHandle, Supervisor
        from ..runtime.spawn import WorkerSpec
        from ..tee.sim_evidence import canonical_json
        from .enclave import enclave_config, parse_owner

        if owner is None and plan is not None and plan.owner is not None:
            owner = plan.owner
        if owner is None:
            raise UserInputError("a training enclave needs its owner's public key (train serve --owner)")
        owner_hex = parse_owner(owner).to_bytes().hex()
        if plan is None:
            plan = TrainingPlan.build(owner_hex, data_model)
        if plan.owner != owner_hex:
            raise UserInputError("the training plan names another owner than --owner")
        if data_model not in ("darknet", plan.data_model):
            raise UserInputError(f"--data-model {data_model} differs from the plan's data model {plan.data_model}")
        self.plan = plan
        self.allowed_factories = tuple(enclave_config(owner_hex, plan.factories() + tuple(allowed_factories))
                                       .get("allowed_factories", ()))

        self.root = Path(store)
        #: Where finished runs' linkage records go: None for `runs/<run>/linkage.db` (SQLite), or a
        #: `postgresql://` URL (one store per run id in shared tables; docs/caltrain.md).
        self.linkage_url = linkage_url
        if linkage_url is not None:
            from .linkage import POSTGRES_SCHEMES

            if not linkage_url.startswith(POSTGRES_SCHEMES):
                raise UserInputError("--linkage-url must be a postgresql:// URL (SQLite stores live in --store)")
        self.instances = InstanceStore(self.root)
        self.data_spec = plan.data_spec()
        self.device = device
        self.metrics: Counter = Counter()
        #: Where a run's time goes on the host's side (and, through it, waiting on the enclave).
        self.clock = StageClock()
        self.runs: dict[str, dict] = {}
        self._run_changed = threading.Condition()  # notified when a run leaves "running"
        self._run_lock = threading.Lock()
        self.tee = tee
        self.group = None  # data-parallel peers (dp_host.PeerGroup) when enclaves > 1
        self.worker = WorkerSpec(WORKER_MODULE, ["--tee", tee, "--torch-threads", str(threads),
                                                 *worker_args(owner_hex, plan, self.allowed_factories, enclaves > 1)],
                                 socket_path=worker_socket, launch=worker_launch)
        #: What /healthz reports: "ok", or why the enclave cannot serve now (as the serving host).
        self.enclave_status = STATUS_OK
        self.enclave = EnclaveHandle(self.worker, timeout_s=600.0)
        self.supervisor = Supervisor(lambda: self.enclave, self.restart, ping_interval_s, ping_timeout_s)
        if supervise:
            self.supervisor.start_thread("caltrain-supervisor")
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # torch's lazy imports now, not in a run
        if enclaves > 1:
            from .dp_host import PeerGroup

            self.group = PeerGroup(enclaves, tee, owner_hex, canonical_json(plan.to_dict()).decode(), device,
                                   threads, peer_address, spawn_peers, self.allowed_factories)

    @property
    def proc(self):
        return self.enclave.proc

    def call(self, op: str, tensors=None, blobs=None, timeout: float = 600.0, **header):
        return self.enclave.call({"op": op, **header}, tensors, blobs, timeout=timeout)

    async def restart(self, reason: str) -> bool:
        """Replace a dead or hung worker (`runtime.handle.Supervisor` calls this). A new worker has
        a new HPKE key: participants and the owner attest again. A run in progress stops ("failed");
        the owner's next start command resumes it from its last sealed checkpoint (the per-plan
        sealing keys are the same in the new worker)."""
        from ..runtime.handle import UNRESPONSIVE, replace

        dead = self.enclave
        self.enclave_status = STATUS_UNRESPONSIVE if reason == UNRESPONSIVE else STATUS_RESTARTING
        self.metrics[f"enclave_restarts_{reason}"] += 1
        for st in list(self.runs.values()):  # not under _run_lock: `start` may hold it, waiting on the hung worker
            if st.get("state") == "running":
                self._set_run(st, state="failed", error=WORKER_LOST)
        try:
            self.enclave = await replace(dead, reason)
        except Exception:
            self.enclave_status = STATUS_DOWN
            return False
        self.enclave_status = STATUS_OK
        return True

    def health(self) -> dict:
        """The enclave worker's state: "ok" or why not (restarting, unresponsive, down)."""
        status = self.enclave_status if self.enclave.alive() or self.enclave_status != STATUS_OK else STATUS_DOWN
        return {"status": status, "tee": self.tee, "enclave_pid": self.enclave.pid}

    def close(self) -> None:
        self.supervisor.stop()
        if self.group is not None:
            self.group.close()
        self.enclave.close()

    # -- participants -------------------------------------------------------------------------

    def evidence(self, nonce_hex: str) -> dict:
        try:
            nonce = bytes.fromhex(nonce_hex)
        except ValueError:
            raise UserInputError("nonce must be hex") from None
        h, _, _ = self.call("evidence", nonce=nonce.hex())
        return EvidenceAnswer.from_dict(h).to_dict()

    def contribute(self, uploads: list[bytes]) -> list[dict]:
        if len(uploads) > MAX_UPLOADS_PER_REQUEST:
            raise UserInputError(f"at most {MAX_UPLOADS_PER_REQUEST} uploads per request")
        h, _, blobs = self.call("ingest", blobs={f"u{i}": u for i, u in enumerate(uploads)}, n=len(uploads))
        out = []
        for i, r in enumerate(h["results"]):
            if r["status"] == "accepted":
                status = self.instances.add(r["tag"], r["owner"], blobs[f"s{i}"])
                if status == "duplicate":
                    res = msg.ContributeResult("rejected", error="DataError",
                                               reason="duplicate instance: another participant already contributed it")
                else:
                    res = msg.ContributeResult(status, participant=r["participant"])
            else:
                res = msg.ContributeResult("rejected", error=r["error"], reason=r["reason"])
            r = res.to_json()
            self.metrics[f"contribute_{r['status']}"] += 1
            if r["status"] == "rejected":
                self.metrics[f"rejected_{r['error']}"] += 1
            out.append(r)
        return out

    # -- training -----------------------------------------------------------------------------

    def status(self, run_id: str, wait: float = 0.0) -> dict:
        """The run's state; with `wait` > 0, answer when it stops running or after `wait` seconds
        (a long poll: the owner learns the end at once instead of at its next poll)."""
        check_run_id(run_id)
        wait = min(max(0.0, float(wait)), 30.0)
        if wait > 0:
            deadline = time.monotonic() + wait
            with self._run_changed:
                while self.runs.get(run_id, {}).get("state") == "running" and time.monotonic() < deadline:
                    # woken by `_set_run`; the slice also sees runs that end elsewhere (dp_host)
                    self._run_changed.wait(min(0.25, deadline - time.monotonic()))
        st = self.runs.get(run_id)
        if st is None:
            rs = RunStore(self.root, run_id)
            if rs.load_final() is not None:
                return {"run_id": run_id, "state": "done"}
            ck = rs.load_checkpoint()
            return {"run_id": run_id, "state": "stopped" if ck else "unknown", "step": ck[0] if ck else 0}
        return dict(st)

    def start(self, run_id: str, command: bytes, checkpoint_every: int = 50) -> dict:
        check_run_id(run_id)
        with self._run_lock:
            if self.runs.get(run_id, {}).get("state") == "running":
                return dict(self.runs[run_id])  # the owner's client came back: attach to the run
            if any(s.get("state") == "running" for s in self.runs.values()):
                raise UserInputError("another training run is already running on this server")
            rs = RunStore(self.root, run_id)
            if rs.load_final() is not None:
                self.runs[run_id] = {"run_id": run_id, "state": "done"}
                return self.runs[run_id]
            if self.group is not None:  # data-parallel over the group's enclaves (dp_host.py)
                from .dp_host import lead_start

                return lead_start(self, self.group, run_id, command, max(1, int(checkpoint_every)), rs)
            with self.clock.stage("start_add_data"):
                for ci, chunk in enumerate(self.instances.iter_chunks()):
                    self.call("add_data", blobs={f"s{i}": tok for i, (_, tok) in enumerate(chunk)},
                              tags=[t for t, _ in chunk], reset=ci == 0)
            ck = rs.load_checkpoint()
            blobs = {"command": command}
            if ck:
                blobs["checkpoint"] = ck[1]
            with self.clock.stage("start_enclave"):
                info, _, b = self.call("start", blobs=blobs)
            info.pop("id", None)
            spec = ModelSpec.parse(info["model"])
            cfg = TrainConfig.from_dict(info["config"])
            built = self.plan.build_model(spec.text, self.allowed_factories)  # the operator's allow-list
            back = host_layers(built, int(info["split"]), int(info.get("head", 0)))  # without the head
            objective = DefenceSpec.from_dict(info.get("defence")).host_objective()  # selfsup: its own loss
            host = HostTrainer(back, cfg, int(info["total_steps"]), self.device, objective=objective)
            if ck:
                host.load_state_bytes(ck[2])
                if host.step != info["start_step"]:
                    raise TamperedMessage("host and enclave checkpoints are at different steps")
            else:
                from safetensors.torch import load

                back.load_state_dict(load(b["back"]))  # initial weights, classifier rows in the secret order
            st = {"run_id": run_id, "state": "running", "step": info["start_step"], "total": info["total_steps"],
                  "instances": info["n"], "resumed_from": info["start_step"] if ck else None, "started": time.time()}
            self.runs[run_id] = st
        threading.Thread(target=self._train, args=(rs, host, st, max(1, int(checkpoint_every))), daemon=True,
                         name=f"train-{run_id}").start()
        return dict(st)

    def _train(self, rs: RunStore, host: HostTrainer, st: dict, every: int) -> None:
        """The steps, then the end of the run. Per step two enclave round trips: `loss`, and
        `backward` that also answers the next step's IR (`then_forward`), except before a
        checkpoint (the next forward would move the FrontNet's BatchNorm statistics past the
        checkpointed step). The host's own SGD step runs while the enclave works on its half."""
        clock = self.clock
        try:
            total = st["total"]
            ir = None
            steps_from = time.perf_counter()
            for step in range(host.step, total):
                if ir is None:
                    with clock.stage("step_enclave_forward"):
                        ir = self.call("forward", step=step)[1]["ir"]
                with clock.stage("step_host_forward"):
                    scores = host.forward(ir)
                with clock.stage("step_enclave_loss"):
                    grad = self.call("loss", tensors={"scores": scores})[1]["grad"]
                with clock.stage("step_host_backward"):
                    d_ir = host.backward_input(grad)
                ckpt = (step + 1) % every == 0 or step + 1 == total
                pending = self.enclave.call_async({"op": "backward", "then_forward": not ckpt}, {"grad": d_ir})
                with clock.stage("step_host_sgd"):
                    host.apply_step()  # meanwhile the enclave runs its backward (and next forward)
                with clock.stage("step_enclave_backward_forward"):
                    _, t, _ = pending.result(600.0)
                ir = None if t is None else t.get("ir")
                st["step"] = step + 1
                self.metrics["train_steps"] += 1
                if ckpt:
                    with clock.stage("checkpoint"):
                        h, _, b = self.call("checkpoint")
                        rs.save_checkpoint(int(h["step"]), b["checkpoint"], host.state_bytes())
                    st["checkpoint"] = int(h["step"])
            finish_from = time.perf_counter()
            clock.add("run_steps", int((finish_from - steps_from) * 1e9))  # the whole step loop
            from safetensors.torch import save

            with clock.stage("finish_enclave"):  # fingerprints, sealed linkage records, sealed release
                back_state = save({k: v.detach().cpu().contiguous() for k, v in host.module.state_dict().items()})
                h, _, b = self.call("finish", blobs={"back": back_state})
            with clock.stage("finish_fetch_records"):
                tokens: list[bytes] = []
                while len(tokens) < int(h["records"]):
                    hr, _, br = self.call("records", start=len(tokens), count=5000)
                    if int(hr["n"]) == 0:
                        raise TamperedMessage("enclave returned fewer linkage records than it announced")
                    tokens += [br[f"r{i}"] for i in range(int(hr["n"]))]
            with clock.stage("finish_write_linkage"):
                with self._linkage(rs, st["run_id"]) as store:
                    store.write_sealed(tokens, b["meta"])
            with clock.stage("finish_save_final"):
                rs.save_final(b["final"])
            clock.add("run_finish", int((time.perf_counter() - finish_from) * 1e9))
            self._set_run(st, state="done", seconds=round(time.time() - st["started"], 1))
        except Exception as e:  # the run stops; the server goes on serving
            self.metrics["train_failed"] += 1
            if isinstance(e, ChannelError):  # the worker died or hung: the supervisor replaces it
                self._set_run(st, state="failed", error=WORKER_LOST)
            else:
                self._set_run(st, state="failed", error=f"{type(e).__name__}: {e}"[:300])

    def _set_run(self, st: dict, **fields) -> None:
        """Update a run's status and wake long polls (`status(wait=...)`)."""
        with self._run_changed:
            st.update(**fields)
            self._run_changed.notify_all()

    def stages(self) -> dict:
        """Per-stage totals: the host's own, and the enclave worker's (its `stats` op)."""
        try:
            enclave = self.call("stats", timeout=10.0)[0].get("stages", {})
        except Exception:
            enclave = {}
        return {"host": self.clock.snapshot(), "enclave": enclave}

    def release(self, run_id: str, command: bytes) -> bytes:
        rs = RunStore(self.root, check_run_id(run_id))
        final = rs.load_final()
        if final is None:
            raise UserInputError(f"run {run_id!r} has not finished")
        with self.clock.stage("release_enclave"):
            _, _, b = self.call("release", blobs={"command": command, "final": final})
        return b["release"]

    def audit(self, run_id: str, command: bytes) -> bytes:
        """Hand the enclave the run's sealed linkage records (in chunks), then the owner's audit command."""
        rs = RunStore(self.root, check_run_id(run_id))
        final = rs.load_final()
        if final is None:
            raise UserInputError(f"run {run_id!r} has not finished")
        with self._linkage(rs, run_id) as store:
            tokens, meta = store.read_sealed()
        for start in range(0, max(len(tokens), 1), 2000):
            chunk = tokens[start:start + 2000]
            self.call("audit_records", blobs={f"r{i}": t for i, t in enumerate(chunk)}, start=start, n=len(chunk))
        _, _, b = self.call("audit", blobs={"command": command, "final": final, "meta": meta})
        return b["audit"]

    def _linkage(self, rs: "RunStore", run_id: str):
        from .linkage import LinkageStore

        return LinkageStore(self.linkage_url, store=run_id) if self.linkage_url else LinkageStore(rs.linkage_path)

    def linkage_bytes(self, run_id: str) -> bytes:
        """The run's sealed linkage store as one SQLite file (copied out of PostgreSQL if it lives
        there), so the owner's tools read it the same way whatever the server's backend."""
        rs = RunStore(self.root, check_run_id(run_id))
        if self.linkage_url is None:
            if not rs.linkage_path.exists():
                raise UserInputError(f"run {run_id!r} has no linkage store yet")
            return rs.linkage_path.read_bytes()
        import tempfile

        from .linkage import LinkageStore

        with self._linkage(rs, run_id) as src:
            tokens, meta = src.read_sealed()  # UserInputError if the run has no records yet
        with tempfile.TemporaryDirectory(prefix="linkage-") as tmp:
            with LinkageStore(Path(tmp) / "linkage.db") as copy:
                copy.write_sealed(tokens, meta)
            return (Path(tmp) / "linkage.db").read_bytes()


def create_app(host_factory) -> "Any":
    """The FastAPI app; `host_factory()` builds the TrainingHost at startup (spawns the enclave)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    state: dict[str, TrainingHost] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["host"] = await asyncio.to_thread(host_factory)  # spawns the enclave worker
        try:
            yield
        finally:
            await asyncio.to_thread(state["host"].close)

    app = FastAPI(title="enclaveml CalTrain host", lifespan=lifespan)

    @app.exception_handler(EnclaveMLError)
    async def _err(request: Request, e: EnclaveMLError):
        h = state.get("host")
        if h is not None:
            h.metrics[f"error_{type(e).__name__}"] += 1
        code = next((c for cls, c in _STATUS.items() if isinstance(e, cls)), 400)
        return JSONResponse({"error": type(e).__name__, "message": str(e)}, status_code=code)

    @app.exception_handler(ChannelError)
    async def _unavailable(request: Request, e: ChannelError):
        h = state.get("host")
        if h is not None:
            h.metrics["error_EnclaveUnavailable"] += 1
        return JSONResponse({"error": "EnclaveUnavailable", "message": "the enclave worker is not available"},
                            status_code=503, headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        h = state.get("host")
        if h is not None:
            h.metrics["error_internal"] += 1
        return JSONResponse({"error": "InternalError", "message": "internal error"}, status_code=500)

    def H() -> TrainingHost:
        return state["host"]

    async def run(fn, *args):
        """A `TrainingHost` call (enclave round trips, disk) in a worker thread, off the event loop."""
        return await asyncio.to_thread(fn, *args)

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise UserInputError("body is not JSON") from None

    @app.get("/healthz")
    def healthz():
        body = H().health()
        return JSONResponse(body, status_code=200 if body["status"] == STATUS_OK else 503)

    def _info() -> dict:
        plan = H().plan
        return {"classes": list(plan.classes), "data_model": plan.data_model, "plan": plan.to_dict(),
                "plan_hash": plan.hash().hex(), "instances": H().instances.count()}

    @app.get("/info")
    async def info():
        return await run(_info)

    @app.get("/evidence")
    async def evidence(nonce: str):
        return await run(H().evidence, nonce)

    @app.post("/contribute")
    async def contribute(request: Request):
        req = msg.ContributeRequest.from_json(await json_body(request))
        return {"results": await run(H().contribute, list(req.uploads))}

    @app.post("/train/start")
    async def start(request: Request):
        cmd = msg.RunCommand.from_json(await json_body(request), start=True)
        return await run(H().start, cmd.run_id, cmd.command, cmd.checkpoint_every)

    @app.get("/train/status")
    async def status(run_id: str, wait: float = 0.0):
        return await run(H().status, run_id, wait)

    @app.get("/train/stages")
    async def stages():
        return await run(H().stages)

    @app.post("/train/release")
    async def release(request: Request):
        cmd = msg.RunCommand.from_json(await json_body(request))
        return msg.encode_sealed_answer("release", await run(H().release, cmd.run_id, cmd.command))

    @app.post("/train/audit")
    async def audit(request: Request):
        cmd = msg.RunCommand.from_json(await json_body(request))
        return msg.encode_sealed_answer("audit", await run(H().audit, cmd.run_id, cmd.command))

    @app.get("/train/linkage")
    async def linkage(run_id: str):
        return Response(await run(H().linkage_bytes, run_id), media_type="application/octet-stream")

    @app.get("/metrics")
    async def metrics():
        return dict(H().metrics)

    return app


def serve(store: Path, port: int, tee: str = "sim", data_model: str = "darknet", device: str = "cpu",
          host: str = "127.0.0.1", threads: int = 1, owner: str | bytes | None = None,
          linkage_url: str | None = None, plan: "TrainingPlan | None" = None, enclaves: int = 1,
          peer_address: str | None = None, spawn_peers: bool = True,
          allowed_factories: "tuple[str, ...] | list[str]" = (), worker_socket: str | None = None,
          worker_launch=None, ping_interval_s: float = 2.0, ping_timeout_s: float = 10.0) -> None:
    import uvicorn

    from .enclave import parse_owner

    owner_hex = parse_owner(owner).to_bytes().hex() if owner is not None else None  # fail before spawning
    torch.set_num_threads(max(1, threads))
    app = create_app(lambda: TrainingHost(store, tee, data_model, device, threads, owner_hex, linkage_url, plan,
                                          enclaves, peer_address, spawn_peers, tuple(allowed_factories),
                                          worker_socket=worker_socket, worker_launch=worker_launch,
                                          ping_interval_s=ping_interval_s, ping_timeout_s=ping_timeout_s))
    uvicorn.run(app, host=host, port=port, log_level="warning")
