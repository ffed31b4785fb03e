"""`enclaveml serve`: start the untrusted host server and its enclave worker (host side)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        tee: str = typer.Option("sim", "--tee", help="enclave backend: sim, gramine-sgx, tsm"),
        port: int = typer.Option(8080, "--port", help="TCP port (0 picks a free one; see the 'listening' log line)"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
        store: Path = typer.Option(Path("store"), "--store", help="folder for uploaded bundles (public + sealed parts)"),
        device: str = typer.Option("auto", "--device", help="BackNet device: auto (GPU if any), cpu, cuda, cuda:N"),
        max_batch: int = typer.Option(64, "--max-batch", help="largest BackNet batch"),
        window_ms: float = typer.Option(0.0, "--batch-window-ms", help="how long a BackNet batch waits for more requests (0: take what is queued when the BackNet is free)"),
        enclave_threads: int = typer.Option(2, "--enclave-threads", help="requests the enclave handles at once"),
        torch_threads: int = typer.Option(1, "--torch-threads", help="torch threads of the host process"),
        max_request_bytes: int = typer.Option(8 * 1024 * 1024 + 4096, "--max-request-bytes",
                                              help="largest inference request body (larger: 413)"),
        worker_socket: str = typer.Option(None, "--worker-socket",
                                          help="talk to the enclave worker over this Unix socket path, tensors inline "
                                               "(for enclaves that cannot inherit fds or map host memory)"),
        allow_factory: list[str] = typer.Option([], "--allow-factory",
                                                help="also serve models built by this 'package.module:function' "
                                                     "(repeatable; part of the enclave's measured configuration)"),
    ) -> None:
        """Serve deployed models: host server (untrusted) + enclave worker process, until Ctrl-C."""
        from ..errors import UserInputError
        from .app import ServerConfig, serve

        if tee == "gramine-sgx":
            raise UserInputError("serve --tee gramine-sgx is not wired yet: the worker must be launched by "
                                 "gramine-sgx with --channel-path (docs/serving.md); use --tee sim or tsm")

        cfg = ServerConfig(tee=tee, store=store, device=device, max_batch=max_batch, window_ms=window_ms,
                           enclave_threads=enclave_threads, max_request_bytes=max_request_bytes,
                           worker_socket=worker_socket, allowed_factories=tuple(allow_factory or ()))
        serve(cfg, host=host, port=port, torch_threads=torch_threads)
