"""The `enclaveml` command: one entry point whose subcommands come from each package.

Each package that offers commands has a `commands.py` with `register(app)`; this file only wires
them together and turns every `EnclaveMLError` into one clear line and a non-zero exit code.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from .errors import EnclaveMLError

app = typer.Typer(
    name="enclaveml",
    help="Confidential deep learning: assess, partition, serve and train models with an enclave.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: Packages whose `commands.register(app)` adds subcommands, in help order.
COMMAND_PACKAGES = ("models", "assess", "serve", "client", "train", "tee")


@app.callback()
def _root() -> None:
    """Confidential deep learning: assess, partition, serve and train models with an enclave."""


def _register_all() -> None:
    for pkg in COMMAND_PACKAGES:
        try:
            mod = importlib.import_module(f"enclaveml.{pkg}.commands")
        except ModuleNotFoundError as e:
            if e.name == f"enclaveml.{pkg}.commands":
                continue
            raise
        mod.register(app)


_register_all()


def main() -> None:
    """Console-script entry: run the app, one line per failure, exit 2 on our errors."""
    try:
        app()
    except EnclaveMLError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the last edge: no traceback for users unless they ask for it
        if os.environ.get("ENCLAVEML_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (set ENCLAVEML_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
