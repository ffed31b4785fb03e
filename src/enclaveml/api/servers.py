"""A local `enclaveml serve` and the policy that pins it: for trying the system on one machine (host side).

`local_server()` starts the real server (`enclaveml serve`, host process plus enclave worker
process) as a child, waits until it listens, and stops both on exit. A real deployment runs
`enclaveml serve` on the untrusted host and the owner writes the policy on their own machine;
`sim_policy()` is what `enclaveml attest policy --tee sim` writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    from ..serve.launcher import ServerProcess
    from ..tee import Policy


@contextlib.contextmanager
def local_server(store: "str | os.PathLike[str] | None" = None, *, tee: str = "sim",
                 args: Sequence[str] = (), log: "str | os.PathLike[str] | None" = None,
                 env: Mapping[str, str] | None = None, timeout_s: float = 180.0) -> Iterator["ServerProcess"]:
    """`with local_server("store") as server: server.url`; stops the server and its enclave on exit.

    `store`: the folder for uploaded bundles (default: a temporary one, removed afterwards);
    `args`: more `enclaveml serve` flags; `log`: its JSON log (default: STORE.server.log beside it).
    The server inherits this process's environment (ENCLAVEML_HOME: the sim platform key).
    """
    from ..serve.launcher import ServerProcess

    with contextlib.ExitStack() as stack:
        if store is None:
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="enclaveml-store-"))) / "store"
        store = Path(store)
        log_path = Path(log) if log is not None else store.with_name(store.name + ".server.log")
        srv = ServerProcess(store, log_path, tee=tee, extra_args=list(args),
                            env=dict(env) if env is not None else None, timeout_s=timeout_s)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def sim_policy(out: "str | os.PathLike[str] | None" = None, *, config: Mapping[str, Any] | None = None,
               max_age_s: int = 300) -> "Policy":
    """The policy accepting this machine's sim platform running this code (`attest policy --tee sim`).

    With `out`, it is also written there as TOML. Pins the sim platform key under ENCLAVEML_HOME
    and the measurement of the installed enclaveml source with `config`.
    """
    from ..tee import write_policy
    from ..tee.sim import sim_policy as _sim_policy

    p = _sim_policy(dict(config or {}), max_age_s=max_age_s)
    if out is not None:
        write_policy(p, out)
    return p
