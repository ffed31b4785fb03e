"""Where a pass's BackNet runs: on the host's executor, or inside the enclave with the rest of it.

Trust side: host (a deployment choice of the operator), and both sides for `SMALL_ROWS`, the
pass size up to which host and enclave run a BackNet with channels-last weights; pure logic, no
I/O, so the enclave may import it. Either way every
guarantee holds: with the BackNet in the enclave the host sees strictly less (no IR, no scores in
the secret order), and the enclave runs only the owner's BackNet (it checks the bytes the host
hands it against the signed manifest, `models.bundle.open_enclave_parts(with_backnet=True)`).

Why: a lone request on a CPU host otherwise makes two enclave round trips (FrontNet, then the
host's BackNet, then class mapping and sealing in the enclave). A pass of at most `SMALL_ROWS`
images costs the enclave about as much to run whole as the host's BackNet would (darknet k=10:
~0.4 ms), and saves a channel round trip, the host's BackNet stage and the finish call. With a GPU
for the BackNet the host keeps it (the enclave has no GPU). Placing every pass in the enclave
(`backnet="enclave"`) is an opt-in for CPU-only hosts: it moves the host's BackNet work into the
enclave process and saves the second call per batch.

    backnet_small: "auto" (enclave when the BackNet device is a CPU) | "enclave" | "host"
    backnet:       "host" (passes over SMALL_ROWS images on the host) | "enclave" (every pass)
"""

from __future__ import annotations

import torch

from ..errors import UserInputError

#: BackNet passes of at most this many rows run their channels-last copy (host: `BackNetExecutor`;
#: enclave: `EnclaveService._whole_pass`), larger ones NCHW; and the enclave answers passes of at
#: most this many images whole under backnet_small "enclave".
SMALL_ROWS = 4

BACKNET_SMALL = ("auto", "enclave", "host")
BACKNET = ("host", "enclave")
#: `finish_rows` meaning "every pass" (above any call's image count: 4096 requests x 256 images).
ALL_ROWS = 1 << 20


def check_placement(backnet_small: str, backnet: str) -> None:
    """UserInputError for an unknown value, or for every pass in the enclave but small ones not."""
    if backnet_small not in BACKNET_SMALL:
        raise UserInputError(f"backnet_small must be one of {', '.join(BACKNET_SMALL)}, not {backnet_small!r}")
    if backnet not in BACKNET:
        raise UserInputError(f"backnet must be one of {', '.join(BACKNET)}, not {backnet!r}")
    if backnet == "enclave" and backnet_small == "host":
        raise UserInputError("backnet 'enclave' runs every pass in the enclave; it cannot keep small ones on the host")


def enclave_finish_rows(backnet_small: str, backnet: str, device: torch.device) -> int:
    """The largest pass (decoded images of one `front_batch` call) the enclave answers whole;
    0: none (the host then never hands the enclave its BackNet)."""
    check_placement(backnet_small, backnet)
    if backnet == "enclave":
        return ALL_ROWS
    if backnet_small == "enclave" or (backnet_small == "auto" and device.type == "cpu"):
        return SMALL_ROWS
    return 0


def describe(finish_rows: int) -> dict[str, str]:
    """Where small and large passes' BackNet runs (for /healthz and logs)."""
    return {"small": "enclave" if finish_rows else "host", "large": "enclave" if finish_rows >= ALL_ROWS else "host"}
