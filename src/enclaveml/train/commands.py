"""`enclaveml train ...`: CalTrain from the command line (host, participant, owner and auditor).

Trust side: each command says whose machine it runs on. Heavy modules are imported inside the
commands so `enclaveml --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import keyfiles
from ..errors import EnclaveMLError

train_app = typer.Typer(help="CalTrain: accountable confidential training with an enclave.", no_args_is_help=True)


def _plan_options(owner: Optional[str], plan_file: Optional[Path], data_model: str, model: Optional[str],
                  split: Optional[int], head: Optional[int], defence: Optional[str]):
    """The training plan that `--plan FILE` or the plan flags describe (one or the other)."""
    from ..errors import UserInputError
    from .enclave import parse_owner
    from .plan import TrainingPlan

    if plan_file is not None:
        if any(v is not None for v in (model, split, head, defence)) or data_model != "darknet":
            raise UserInputError("give either --plan FILE or the plan flags (--data-model --model --split --head "
                                 "--defence), not both")
        try:
            doc = json.loads(plan_file.read_text())
        except (OSError, ValueError) as e:
            raise UserInputError(f"--plan {plan_file}: not a readable JSON file ({e})") from None
        plan = TrainingPlan.from_dict(doc)
        if owner is not None and parse_owner(owner).to_bytes().hex() != plan.owner:
            raise UserInputError(f"--plan {plan_file} names another owner than --owner")
        return plan
    if owner is None:
        raise UserInputError("give the owner (--owner KEY) or a plan file that names it (--plan FILE)")
    return TrainingPlan.build(owner, data_model, None, model, split, head, defence)


_ALLOW_HELP = ("a user architecture package.module:function the enclave may build (repeatable; measured; the "
               "plan's own model factory is always allowed)")
_PLAN_HELP = "training plan JSON (`train plan --out`): fixes owner, data, model, split, head and defence"
_OPEN = " (default: left to the owner's train run)"


@train_app.command("serve")
def serve_cmd(
    store: Path = typer.Option(..., "--store", help="folder for sealed instances, checkpoints, linkage stores"),
    port: int = typer.Option(8600, "--port"),
    tee: str = typer.Option("sim", "--tee", help="enclave backend: sim, gramine-sgx, tsm"),
    data_model: str = typer.Option("darknet", "--data-model", help="zoo model whose input size and classes the data use"),
    device: str = typer.Option("cpu", "--device", help="where the host runs the BackNet (cpu, cuda)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    threads: int = typer.Option(1, "--threads", help="torch threads per process"),
    linkage_url: Optional[str] = typer.Option(None, "--linkage-url", envvar="ENCLAVEML_LINKAGE_URL",
                                              help="keep linkage records in PostgreSQL (postgresql://user@host/db; "
                                              "prefer the environment variable for a password) instead of --store"),
    owner: Optional[str] = typer.Option(None, "--owner", help="the one owner allowed to start runs and receive the "
                                        "model: Ed25519 public key (hex) or key file (measured into the enclave "
                                        "config); may be omitted with --plan"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help=_PLAN_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="the model spec every run must train" + _OPEN),
    split: Optional[int] = typer.Option(None, "--split", help="the partition point k every run must use" + _OPEN),
    head: Optional[int] = typer.Option(None, "--head", help="classifier layers kept in the enclave" + _OPEN),
    defence: Optional[str] = typer.Option(None, "--defence", help="label-leakage defence NAME[:key=value,...]" + _OPEN),
    enclaves: int = typer.Option(1, "--enclaves", help="data-parallel training over N mutually attested enclaves "
                                 "(this server is rank 0; docs/scaling.md)"),
    peer_address: Optional[str] = typer.Option(None, "--peer-address", help="HOST:PORT where the group's peers "
                                               "rendezvous (torch.distributed TCPStore; default a free loopback port)"),
    spawn_peers: bool = typer.Option(True, "--spawn-peers/--no-spawn-peers", help="start the N-1 peers on this "
                                     "machine (default), or wait for `train peer` processes on other machines"),
    allow_factory: list[str] = typer.Option([], "--allow-factory", help=_ALLOW_HELP),
    ping_interval: float = typer.Option(2.0, "--ping-interval",
                                        help="seconds between liveness pings of the enclave worker"),
    ping_timeout: float = typer.Option(10.0, "--ping-timeout",
                                       help="a worker that does not answer a ping within this many seconds is "
                                            "restarted (a running run stops; its next start resumes the checkpoint)"),
    worker_socket: Optional[str] = typer.Option(None, "--worker-socket",
                                                help="talk to the enclave worker over this Unix socket path, tensors "
                                                     "inline (for enclaves that cannot inherit fds or map host memory)"),
    gramine_dir: Optional[Path] = typer.Option(None, "--gramine-dir", help="gramine-sgx: where the manifest, "
                                               "signature and worker socket go (default STORE/gramine)"),
    cost: Optional[Path] = typer.Option(None, "--cost", help="gramine-sgx: assessment.json (or a cost report) "
                                        "sizing the enclave"),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="gramine-sgx: RSA-3072 key for "
                                               "gramine-sgx-sign (default: Gramine's own default key)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="gramine-sgx: write the manifest, print the Gramine "
                                 "commands, do not launch"),
) -> None:
    """(host) Run the training server and its enclave worker, for one owner and one training plan."""
    from ..errors import UserInputError
    from .host import serve

    if tee != "gramine-sgx" and (gramine_dir or cost or signing_key or dry_run):
        raise UserInputError("--gramine-dir, --cost, --signing-key and --dry-run are for --tee gramine-sgx")
    plan = _plan_options(owner, plan_file, data_model, model, split, head, defence)
    if not 1 <= enclaves <= 64:
        raise UserInputError(f"--enclaves {enclaves}: give 1 (one enclave) to 64")
    factories = tuple(sorted({*plan.factories(), *(allow_factory or ())}))
    launch = None
    if tee == "gramine-sgx":  # the same launch as `enclaveml serve --tee gramine-sgx` (runtime.spawn)
        from ..runtime.spawn import gramine_launch
        from ..tee import gramine
        from .host import WORKER_MODULE, worker_args

        g = gramine_launch(gramine_dir or store / "gramine",
                           lambda sock: gramine.worker_argv(sock, threads=1, torch_threads=threads, module=WORKER_MODULE,
                                                            extra_args=worker_args(plan.owner, plan, factories, enclaves > 1)),
                           cost, signing_key, dry_run, threads, echo=typer.echo)
        if g.launch is None:  # --dry-run
            return
        worker_socket, launch = g.socket_path, g.launch
    typer.echo(f"CalTrain host on http://{host}:{port} (tee {tee}, store {store}, owner {plan.owner[:16]}, "
               f"plan {plan.hash().hex()[:16]}{f', {enclaves} enclaves' if enclaves > 1 else ''})", err=True)
    serve(store, port, tee, plan.data_model, device, host, threads, plan.owner, linkage_url, plan, enclaves,
          peer_address, spawn_peers, tuple(allow_factory or ()), worker_socket=worker_socket, worker_launch=launch,
          ping_interval_s=ping_interval, ping_timeout_s=ping_timeout)


@train_app.command("peer")
def peer_cmd(
    rank: int = typer.Option(..., "--rank", help="this peer's rank, 1..N-1 (rank 0 is `train serve`)"),
    enclaves: int = typer.Option(..., "--enclaves", help="the group's size N"),
    peer_address: str = typer.Option(..., "--peer-address", help="HOST:PORT of rank 0's rendezvous store"),
    tee: str = typer.Option("sim", "--tee"),
    owner: Optional[str] = typer.Option(None, "--owner", help="as for train serve (may be omitted with --plan)"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help=_PLAN_HELP),
    plan_json: Optional[str] = typer.Option(None, "--plan-json", hidden=True),
    device: str = typer.Option("cpu", "--device", help="where this host runs its BackNet replica (cpu, cuda)"),
    threads: int = typer.Option(1, "--threads"),
    first_run: Optional[int] = typer.Option(None, "--first-run", hidden=True),
    spawned: bool = typer.Option(False, "--spawned", hidden=True),
    allow_factory: list[str] = typer.Option([], "--allow-factory", help="as rank 0's `train serve --allow-factory` "
                                            "(the group's enclaves must have one measured configuration)"),
) -> None:
    """(host) One peer of a data-parallel training group: a host process and its own enclave worker."""
    from ..tee.sim_evidence import canonical_json
    from .dp_host import peer_main
    from .plan import TrainingPlan

    if plan_json is not None:
        plan = TrainingPlan.from_dict(json.loads(plan_json))
    else:
        plan = _plan_options(owner, plan_file, "darknet", None, None, None, None)
    peer_main(rank, enclaves, peer_address, tee, plan.owner, canonical_json(plan.to_dict()).decode(), device,
              threads, first_run, spawned, tuple(allow_factory or ()))


@train_app.command("plan")
def plan_cmd(
    owner: str = typer.Option(..., "--owner", help="the owner: Ed25519 public key (hex) or key file"),
    data_model: str = typer.Option("darknet", "--data-model", help="zoo model whose input size and classes the data use"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class names, any number from 2 "
                                          "(default: the data model's)"),
    model: Optional[str] = typer.Option(None, "--model", help="model spec: zoo NAME[:key=INT...] or your "
                                        "package.module:function (allowed in the enclave by this plan)" + _OPEN),
    split: Optional[int] = typer.Option(None, "--split", help="partition point k" + _OPEN),
    head: Optional[int] = typer.Option(None, "--head", help="classifier layers kept in the enclave" + _OPEN),
    defence: Optional[str] = typer.Option(None, "--defence", help="defence NAME[:key=value,...]" + _OPEN),
    out: Path = typer.Option(Path("caltrain-plan.json"), "--out"),
) -> None:
    """(owner) Write a training plan to publish to participants; prints its hash."""
    from .plan import TrainingPlan

    names = None if classes is None else [c.strip() for c in classes.split(",")]
    plan = TrainingPlan.build(owner, data_model, names, model, split, head, defence)
    out.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    typer.echo(json.dumps({"plan_hash": plan.hash().hex(), "out": str(out), "open": plan.open_fields()}))


@train_app.command("policy")
def policy_cmd(
    owner: Optional[str] = typer.Option(None, "--owner", help="the owner you agree to train for: Ed25519 public key "
                                        "(hex) or key file; the policy accepts only an enclave configured with "
                                        "this owner (may be omitted with --plan)"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="the plan you agree to (the owner's published "
                                             "plan file); pinned exactly"),
    data_model: str = typer.Option("darknet", "--data-model", help="plan flags, as for train serve: pin that plan"),
    model: Optional[str] = typer.Option(None, "--model"),
    split: Optional[int] = typer.Option(None, "--split"),
    head: Optional[int] = typer.Option(None, "--head"),
    defence: Optional[str] = typer.Option(None, "--defence"),
    min_split: Optional[int] = typer.Option(None, "--min-split", help="accept only plans that fix k >= this"),
    require_head: Optional[int] = typer.Option(None, "--require-head", help="accept only plans that keep at least "
                                               "this many classifier layers in the enclave"),
    require_defence: Optional[list[str]] = typer.Option(None, "--require-defence", help="accept only plans with "
                                                        "this defence (repeat to accept any of several)"),
    any_plan: bool = typer.Option(False, "--any-plan", help="do not pin one plan: accept any plan of the owner "
                                  "that meets the requirements (the default when requirements but no plan are given)"),
    allow_factory: list[str] = typer.Option([], "--allow-factory", help="as for train serve: the enclave's "
                                            "configuration allows this factory too (measured)"),
    out: Path = typer.Option(Path("caltrain-policy.toml"), "--out"),
) -> None:
    """(owner/participant) Write a policy accepting this machine's sim training enclave for OWNER and a plan.

    Pinned: the owner (in the measurement and in [caltrain].owner); the exact plan, given by --plan
    FILE or the plan flags (with neither a plan nor a requirement: the default plan of `train serve
    --owner`); and the least protection accepted (--min-split, --require-head, --require-defence).
    """
    from ..tee import write_policy
    from .plan import participant_policy

    rules: dict = {}
    if min_split is not None:
        rules["min_split"] = min_split
    if require_head is not None:
        rules["min_head"] = require_head
    if require_defence:
        rules["defences"] = list(require_defence)
    described = plan_file is not None or any(v is not None for v in (model, split, head, defence)) or \
        data_model != "darknet"
    plan = _plan_options(owner, plan_file, data_model, model, split, head, defence)
    write_policy(participant_policy(plan, rules, pin_plan=not any_plan and (described or not rules),
                                    allowed_factories=tuple(allow_factory or ())), out)
    typer.echo(str(out))


@train_app.command("contribute")
def contribute_cmd(
    data_dir: Path = typer.Argument(..., help="image folder: DATA_DIR/<class>/*.jpg|png"),
    url: str = typer.Option(..., "--url"),
    policy: Path = typer.Option(..., "--policy", help="attestation policy the enclave must satisfy"),
    key: Path = typer.Option(..., "--key", help="your Ed25519 key (PEM; created if missing)"),
    batch: int = typer.Option(128, "--batch"),
    limit: Optional[int] = typer.Option(None, "--limit", help="upload only the first N images"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """(participant) Verify the enclave, then upload signed, encrypted instances (resumable)."""
    from .participant import contribute

    rep = contribute(data_dir, url, policy, key, batch=batch, limit=limit,
                     progress=None if as_json else lambda d, t: typer.echo(f"  uploaded {d}/{t}", err=True))
    d = rep.to_dict()
    if as_json:
        typer.echo(json.dumps(d))
        return
    typer.echo(f"participant {d['participant'][:16]}: {d['total']} images, {d.get('accepted', 0)} accepted, "
               f"{d.get('exists', 0)} already held, {rep.skipped} skipped (earlier session), "
               f"{d.get('rejected', 0)} rejected")
    for r in rep.rejections[:10]:
        typer.echo(f"  rejected {r['file']}: {r['reason']}")


@train_app.command("run")
def run_cmd(
    url: str = typer.Option(..., "--url"),
    model: Optional[str] = typer.Option(None, "--model", help="model spec: zoo name with options, e.g. "
                                        "darknet:width=16, or your package.module:function (default: the server's "
                                        "plan's, else darknet)"),
    split: Optional[int] = typer.Option(None, "--split", help="partition point k: FrontNet = first k layers "
                                        "(default: the plan's)"),
    head: Optional[int] = typer.Option(None, "--head", help="last N layers run in the enclave too: the host sees "
                                       "cut-layer gradients, never class scores (default: the plan's, else 0; "
                                       "docs/caltrain.md, what the host learns about labels)"),
    defence: Optional[str] = typer.Option(None, "--defence", help="label-leakage defence applied in the enclave to "
                                          "the gradient the host receives: none, noise[:scale=S], mix[:group=M] "
                                          "(default: the plan's, else none)"),
    epochs: int = typer.Option(4, "--epochs"),
    policy: Path = typer.Option(..., "--policy"),
    key: Path = typer.Option(Path("owner.key"), "--key", help="owner's Ed25519 key (created if missing)"),
    out: Path = typer.Option(Path("caltrain-model"), "--out", help="where the released model goes"),
    run_id: str = typer.Option("caltrain", "--run-id", help="same id again = resume from its checkpoint"),
    batch: int = typer.Option(128, "--batch"),
    lr: float = typer.Option(0.1, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="steps between sealed checkpoints"),
    no_wait: bool = typer.Option(False, "--no-wait", help="start and return"),
    enclaves: Optional[int] = typer.Option(None, "--enclaves", help="require data-parallel training over exactly N "
                                           "enclaves (signed into the start command; enclave 0 refuses another "
                                           "group size)"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="where the servable bundle of the release goes "
                                          "(default OUT/bundle; its model key beside it, BUNDLE.modelkey)"),
    name: Optional[str] = typer.Option(None, "--name", help="the bundle's model name (default: the run id)"),
) -> None:
    """(owner) Train with the FrontNet in the enclave and the BackNet on the host; fetch the model."""
    from .owner import run
    from .partitioned import TrainConfig

    cfg = TrainConfig(epochs=epochs, batch=batch, lr=lr, seed=seed)
    last = {"step": -1}

    def progress(st: dict) -> None:
        if st.get("step") != last["step"]:
            last["step"] = st.get("step")
            typer.echo(f"  step {st.get('step')}/{st.get('total')}", err=True)

    res = run(url, policy, model, split, cfg, key, out, run_id, checkpoint_every, progress=progress, wait=not no_wait,
              head=head, defence=defence, enclaves=enclaves, bundle=bundle, name=name)
    typer.echo(json.dumps(res))


@train_app.command("release")
def release_cmd(
    url: Optional[str] = typer.Option(None, "--url", help="fetch a finished run's release from this server again"),
    policy: Optional[Path] = typer.Option(None, "--policy", help="with --url: the policy the enclave must satisfy"),
    key: Path = typer.Option(Path("owner.key"), "--key", help="owner's Ed25519 key (must exist)"),
    run_id: str = typer.Option("caltrain", "--run-id"),
    out: Path = typer.Option(Path("caltrain-model"), "--out", help="the released model folder (written with --url, "
                             "else read)"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="bundle directory to create (default OUT/bundle)"),
    name: Optional[str] = typer.Option(None, "--name", help="the bundle's model name (default: the run id)"),
    enclaves: Optional[int] = typer.Option(None, "--enclaves", help="with --url: require a run trained by exactly "
                                           "this many enclaves"),
) -> None:
    """(owner) Make the servable bundle of a released model (`enclaveml deploy` takes it as it is)."""
    from ..errors import UserInputError
    from .owner import fetch_release, write_bundle

    if url is not None:
        if policy is None:
            raise UserInputError("--url needs --policy (the enclave is attested before it releases anything)")
        res = fetch_release(url, policy, key, out, run_id, bundle=bundle, name=name, enclaves=enclaves)
    else:
        res = write_bundle(out, keyfiles.load_signing_key(key), bundle, name=name)
    typer.echo(json.dumps(res))


@train_app.command("trace")
def trace_cmd(
    images: list[Path] = typer.Argument(..., help="the mispredicted input(s); several with --mode cluster"),
    label: str = typer.Option(..., "--label", help="the (wrong) label the model gave it: name or index"),
    k: int = typer.Option(10, "-k", help="neighbours to return"),
    mode: str = typer.Option("nearest", "--mode", help="nearest: the K nearest same-label instances (backdoors); "
                             "mislabel: same-label instances near the input whose fingerprints sit among "
                             "another class (flipped labels); cluster: the poison cluster all the inputs point "
                             "to, decided as a whole (backdoors, several inputs)"),
    model_dir: Path = typer.Option(Path("caltrain-model"), "--model-dir"),
    linkage: Optional[str] = typer.Option(None, "--linkage", envvar="ENCLAVEML_LINKAGE_URL",
                                          help="read the linkage records from this postgresql:// URL (or "
                                          "SQLite file) instead of MODEL_DIR/linkage.db"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """(owner/auditor) Trace a misprediction to training instances and their contributors."""
    from ..data.preprocess import load_image_bytes
    from ..errors import UserInputError
    from .owner import TracedModel
    from .trace import MODES

    if mode not in (*MODES, "cluster"):
        raise UserInputError(f"unknown trace mode {mode!r}; known: {', '.join((*MODES, 'cluster'))}")
    if mode == "cluster":
        res = TracedModel(model_dir, linkage).trace_cluster([load_image_bytes(i) for i in images], label, k)
        if as_json:
            typer.echo(json.dumps(res))
            return
        c = res["cluster"]
        if c["accepted"]:
            typer.echo(f"{len(images)} traced inputs point to one cluster of {c['members']} training instances "
                       f"labelled {res['label_name']} (of {c['candidates']}; separation D={c['separation']:.1f}, "
                       f"other labels at most {c['bar']:.1f}):")
            for p in c["participants"]:
                typer.echo(f"  participant {p['participant'][:16]}  {p['count']}/{c['members']}")
        else:
            typer.echo(f"no separated cluster among the {c['candidates']} instances labelled {res['label_name']} "
                       f"(D={c['separation']:.1f}; the other labels reach {c['bar']:.1f}): no cluster-level "
                       f"evidence; the nearest instances per input follow")
        for path, inp in zip(images, res["inputs"]):
            top = inp["participants"][0] if inp["participants"] else {"participant": "-", "count": 0}
            typer.echo(f"  {path.name}: predicted {inp['predicted']}; {top['count']}/{len(inp['neighbours'])} "
                       f"nearest from participant {top['participant'][:16]}")
        return
    if len(images) != 1:
        raise UserInputError(f"mode {mode} traces one input; use --mode cluster for several")
    image = images[0]
    res = TracedModel(model_dir, linkage).trace(load_image_bytes(image), label, k, mode)
    if as_json:
        typer.echo(json.dumps(res))
        return
    what = "nearest" if mode == "nearest" else "most suspicious (near and among another class)"
    typer.echo(f"{image}: predicted {res['predicted']}; {len(res['neighbours'])} {what} training instances "
               f"labelled {res['label_name']}:")
    for n in res["neighbours"]:
        extra = f"  margin={n['margin']:+.4f}" if "margin" in n else ""
        typer.echo(f"  d={n['distance']:.4f}{extra}  instance {n['instance_hash'][:16]}  "
                   f"participant {n['participant'][:16]}")
    typer.echo("per participant:")
    for p in res["participants"]:
        typer.echo(f"  {p['participant'][:16]}  {p['count']}/{len(res['neighbours'])}")


def _print_audit(rep: dict) -> None:
    typer.echo(f"label audit of run {rep['run_id']}: {rep['instances']} instances, {rep['disputed']} labels disputed "
               f"by held-out predictions, {rep['suspected']} suspected label errors "
               f"(honest baseline rate {rep['baseline_rate']:.3f})")
    for c in rep["contributors"]:
        typer.echo(f"  participant {c['participant'][:16]}  {c['instances']:>6} instances  disputed "
                   f"{c['disputed_rate']:.3f}  suspected {c['suspected']:>5} ({c['suspected_share']:.3f})"
                   f"{'  <- flagged' if c['flagged'] else ''}")


@train_app.command("audit")
def audit_cmd(
    url: str = typer.Option(..., "--url"),
    policy: Path = typer.Option(..., "--policy"),
    key: Path = typer.Option(Path("owner.key"), "--key", help="owner's Ed25519 key (must exist)"),
    run_id: str = typer.Option("caltrain", "--run-id"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the signed audit (JSON) here"),
    as_json: bool = typer.Option(False, "--json", help="print the signed audit envelope"),
) -> None:
    """(owner) Label audit inside the enclave: per contributor, the labels the model disputes (signed)."""
    from .owner import audit

    env = audit(url, policy, key, run_id, out)
    if as_json:
        typer.echo(json.dumps(env))
        return
    _print_audit(env["report"])


@train_app.command("verify-audit")
def verify_audit_cmd(
    audit_file: Path = typer.Argument(..., help="a signed audit written by `train audit --out`"),
    policy: Path = typer.Option(..., "--policy", help="the policy the enclave must satisfy"),
    at_report_time: bool = typer.Option(True, "--at-report-time/--now",
                                        help="apply the policy's freshness rule at the evidence's time"),
) -> None:
    """(participant/auditor) Check that an attested training enclave signed this label audit."""
    from datetime import datetime

    from ..errors import TamperedMessage
    from .owner import verify_audit

    try:
        env = json.loads(audit_file.read_text())
        ev = env["evidence"]
        ts = ev.get("timestamp") or (ev.get("details") or {}).get("timestamp")  # sim: in the signed details
        when = datetime.fromisoformat(str(ts)) if (ts and at_report_time) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise TamperedMessage(f"{audit_file}: not a signed audit") from None
    rep = verify_audit(env, policy, now=when)
    _print_audit(rep)
    typer.echo("verified: signed by an enclave that satisfies the policy")


@train_app.command("verify-instance")
def verify_instance_cmd(
    image: Path = typer.Argument(..., help="the revealed training image"),
    public_key: str = typer.Option(..., "--public-key", help="the claimed contributor's Ed25519 key (hex)"),
    model_dir: Path = typer.Option(Path("caltrain-model"), "--model-dir"),
) -> None:
    """(auditor) Check a participant's claim: image hash and record signature."""
    from ..data.preprocess import load_image_bytes
    from .owner import TracedModel

    typer.echo(json.dumps(TracedModel(model_dir).verify_instance(load_image_bytes(image), public_key)))


@train_app.command("public-key")
def public_key_cmd(key: Path = typer.Argument(...)) -> None:
    """(participant) Print the public key (hex) and participant id of an Ed25519 key file."""

    vk = keyfiles.load_signing_key(key).public_key()
    typer.echo(json.dumps({"public_key": vk.to_bytes().hex(), "participant": vk.fingerprint()}))


@train_app.command("poison", hidden=True)
def poison_cmd(
    src: Path = typer.Argument(...), dst: Path = typer.Argument(...),
    target: str = typer.Option("airplane", "--target"), fraction: float = typer.Option(0.05, "--fraction"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """(demo attacker) Copy an image folder, stamping a trigger on a fraction relabelled to TARGET."""
    from .demo import make_poisoned_folder

    typer.echo(json.dumps(make_poisoned_folder(src, dst, target, fraction, seed)))


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
