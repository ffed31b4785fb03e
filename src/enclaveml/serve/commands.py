"""`enclaveml serve`: start the untrusted host server and its enclave worker (host side)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from .placement import NCHW_COPY_MAX_BYTES


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        tee: str = typer.Option("sim", "--tee", help="enclave backend: sim, gramine-sgx, tsm"),
        port: int = typer.Option(8080, "--port", help="TCP port (0 picks a free one; see the 'listening' log line)"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
        store: Path = typer.Option(Path("store"), "--store", help="folder for uploaded bundles (public + sealed parts)"),
        device: str = typer.Option("auto", "--device", help="BackNet device: auto (GPU if any), cpu, cuda, cuda:N"),
        max_batch: int = typer.Option(64, "--max-batch", help="largest BackNet batch"),
        backnet_small: str = typer.Option("auto", "--backnet-small",
                                          help="where passes of at most 4 images run their BackNet: auto (the enclave "
                                               "when the BackNet device is a CPU: one enclave round trip), enclave, "
                                               "host"),
        backnet: str = typer.Option("auto", "--backnet",
                                    help="where larger passes run their BackNet: auto (every pass in the enclave when "
                                         "the BackNet device is a CPU and --backnet-small is not host; else the "
                                         "host), host (the paper's split: the host runs it), enclave (every pass)"),
        backnet_copy_mib: float = typer.Option(NCHW_COPY_MAX_BYTES / (1 << 20), "--backnet-copy-mib",
                                               help="largest BackNet (MiB of weights) of which the enclave keeps a "
                                                    "second, NCHW copy for passes over 4 images (faster there; 0: "
                                                    "never, for a small EPC)"),
        window_ms: float = typer.Option(0.0, "--batch-window-ms", help="how long a BackNet batch waits for more requests (0: take what is queued when the BackNet is free)"),
        enclave_threads: int = typer.Option(2, "--enclave-threads", help="requests the enclave handles at once"),
        torch_threads: int = typer.Option(1, "--torch-threads", help="torch threads of the host process"),
        enclave_torch_threads: int = typer.Option(1, "--enclave-torch-threads",
                                                  help="torch threads per FrontNet pass in the enclave"),
        max_request_bytes: int = typer.Option(8 * 1024 * 1024 + 4096, "--max-request-bytes",
                                              help="largest inference request body (larger: 413)"),
        max_upload_bytes: int = typer.Option(512 * 1024 * 1024, "--max-upload-bytes",
                                             help="largest model upload body (larger: 413, before it is read)"),
        max_uploads: int = typer.Option(2, "--max-uploads",
                                        help="uploads streamed to disk at once (more: 503 with Retry-After)"),
        allow_owner: list[str] = typer.Option([], "--allow-owner",
                                              help="only this owner public key (hex, 32 bytes) may upload "
                                                   "(repeatable; default: any key that signs its upload)"),
        ping_interval: float = typer.Option(2.0, "--ping-interval",
                                            help="seconds between liveness pings of the enclave worker"),
        ping_timeout: float = typer.Option(10.0, "--ping-timeout",
                                           help="a worker that does not answer a ping within this many seconds "
                                                "is reported unresponsive and restarted"),
        worker_socket: str = typer.Option(None, "--worker-socket",
                                          help="talk to the enclave worker over this Unix socket path, tensors inline "
                                               "(for enclaves that cannot inherit fds or map host memory)"),
        allow_factory: list[str] = typer.Option([], "--allow-factory",
                                                help="also serve models built by this 'package.module:function' "
                                                     "(repeatable; part of the enclave's measured configuration)"),
        card: list[Path] = typer.Option([], "--card", help="a model card (model.json) whose 'factory' is allowed "
                                                            "too (repeatable; like --allow-factory)"),
        gramine_dir: Optional[Path] = typer.Option(None, "--gramine-dir",
                                                   help="gramine-sgx: where the manifest, signature and worker "
                                                        "socket go (default STORE/gramine)"),
        cost: Optional[Path] = typer.Option(None, "--cost",
                                            help="gramine-sgx: assessment.json (or a cost report) sizing the "
                                                 "enclave from the recommended point's cost"),
        signing_key: Optional[Path] = typer.Option(None, "--signing-key",
                                                   help="gramine-sgx: RSA-3072 key for gramine-sgx-sign "
                                                        "(default: Gramine's own default key)"),
        dry_run: bool = typer.Option(False, "--dry-run",
                                     help="gramine-sgx: write the manifest, print the Gramine commands, do not launch"),
        replicas: int = typer.Option(0, "--replicas",
                                     help="run N replicas (each a host server + its own enclave) on Ray Serve, "
                                          "with a front on --port listing them (docs/scaling.md)"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                  help="replicas: join this Ray cluster (default: a local Ray)"),
        min_replicas: Optional[int] = typer.Option(None, "--min-replicas",
                                                   help="replicas: autoscale on queue depth from this many"),
        max_replicas: Optional[int] = typer.Option(None, "--max-replicas",
                                                   help="replicas: autoscale up to this many"),
        replica_cpus: float = typer.Option(1.0, "--replica-cpus", help="replicas: CPUs Ray reserves per replica"),
        replica_host: str = typer.Option("127.0.0.1", "--replica-host",
                                         help="replicas: address each replica's server listens on "
                                              "(0.0.0.0: the node's IP is advertised)"),
        ray_proxy_port: Optional[int] = typer.Option(None, "--ray-proxy-port",
                                                     help="replicas: also start Ray Serve's HTTP proxy here "
                                                          "(forwards to any one replica; for 1 replica or measuring)"),
    ) -> None:
        """Serve deployed models: host server (untrusted) + enclave worker process, until Ctrl-C."""
        from ..errors import UserInputError
        from .app import ServerConfig, serve
        from .placement import check_placement
        from .upload import parse_owner_keys

        check_placement(backnet_small, backnet)
        if not math.isfinite(backnet_copy_mib) or backnet_copy_mib < 0:
            raise UserInputError("--backnet-copy-mib must be a finite number >= 0")
        copy_args = ["--backnet-copy-max-bytes", str(int(backnet_copy_mib * (1 << 20)))]
        allow_factory = list(allow_factory or ())
        for c in card or ():
            from ..models.card import read_card

            f = read_card(c).factory
            if f is None:
                raise UserInputError(f"{c}: the model card names no factory")
            allow_factory.append(f)
        if tee != "gramine-sgx" and (gramine_dir or cost or signing_key or dry_run):
            raise UserInputError("--gramine-dir, --cost, --signing-key and --dry-run are for --tee gramine-sgx")
        if replicas or min_replicas is not None or max_replicas is not None:
            return _serve_replicas(locals())
        launch = None
        if tee == "gramine-sgx":
            from ..models.servable import check_factory_names

            gramine_socket, launch = _prepare_gramine(
                gramine_dir or store / "gramine", cost, signing_key, dry_run, enclave_threads,
                check_factory_names(list(allow_factory or ())), copy_args)
            if launch is None:  # --dry-run
                return

        cfg = ServerConfig(tee=tee, store=store, device=device, max_batch=max_batch, window_ms=window_ms,
                           enclave_threads=enclave_threads, max_request_bytes=max_request_bytes,
                           worker_args=["--torch-threads", str(max(1, enclave_torch_threads)), *copy_args],
                           worker_socket=worker_socket if launch is None else gramine_socket, worker_launch=launch,
                           allowed_factories=tuple(allow_factory or ()), max_upload_bytes=max_upload_bytes,
                           max_concurrent_uploads=max_uploads, allowed_owners=parse_owner_keys(allow_owner or []),
                           ping_interval_s=ping_interval, ping_timeout_s=ping_timeout,
                           backnet_small=backnet_small, backnet=backnet)
        serve(cfg, host=host, port=port, torch_threads=torch_threads)


def _serve_replicas(o: dict) -> None:
    """`serve --replicas`: every replica runs `enclaveml serve` with the same flags on one shared store."""
    from ..errors import UserInputError

    if o["tee"] == "gramine-sgx" or o["worker_socket"]:
        raise UserInputError("--replicas runs --tee sim or tsm replicas (gramine-sgx replicas: not yet)")
    try:
        from .replicas.deployment import ReplicaSpec
        from .replicas.run import ReplicaPlan, serve_replicated
    except ImportError as e:
        raise UserInputError(f"--replicas needs Ray Serve: pip install 'enclaveml[replicas]' ({e})") from None
    args = ["--device", o["device"], "--max-batch", str(o["max_batch"]), "--batch-window-ms", str(o["window_ms"]),
            "--enclave-threads", str(o["enclave_threads"]), "--torch-threads", str(o["torch_threads"]),
            "--enclave-torch-threads", str(o["enclave_torch_threads"]),
            "--max-request-bytes", str(o["max_request_bytes"]), "--max-upload-bytes", str(o["max_upload_bytes"]),
            "--max-uploads", str(o["max_uploads"]), "--ping-interval", str(o["ping_interval"]),
            "--ping-timeout", str(o["ping_timeout"]), "--backnet-small", o["backnet_small"], "--backnet", o["backnet"],
            "--backnet-copy-mib", str(o["backnet_copy_mib"])]
    for f in o["allow_factory"] or ():
        args += ["--allow-factory", f]
    for owner in o["allow_owner"] or ():
        args += ["--allow-owner", owner]
    spec = ReplicaSpec(store=str(Path(o["store"]).resolve()), tee=o["tee"], server_args=args,
                       listen_host=o["replica_host"])
    plan = ReplicaPlan(replicas=max(1, o["replicas"] or (o["min_replicas"] or 1)), min_replicas=o["min_replicas"],
                       max_replicas=o["max_replicas"], ray_address=o["ray_address"], replica_cpus=o["replica_cpus"],
                       proxy_port=o["ray_proxy_port"])
    serve_replicated(spec, plan, host=o["host"], port=o["port"])


def _prepare_gramine(workdir: Path, cost_path: Optional[Path], signing_key: Optional[Path], dry_run: bool,
                     threads: int, factories: list[str], extra_args: list[str] = ()):
    """The serving worker under Gramine (`runtime.spawn.gramine_launch`): (socket path, launch),
    launch None after a dry run."""
    from ..runtime.spawn import gramine_launch
    from ..tee import gramine

    g = gramine_launch(workdir, lambda sock: gramine.worker_argv(sock, threads=threads, allowed_factories=factories,
                                                                  extra_args=extra_args),
                       cost_path, signing_key, dry_run, threads)
    return g.socket_path, g.launch
