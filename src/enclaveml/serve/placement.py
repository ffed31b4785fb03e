"""Where a pass's BackNet runs: on the host's executor, or inside the enclave with the rest of it.

Trust side: host (a deployment choice of the operator), and both sides for `SMALL_ROWS`, the
pass size up to which host and enclave run a BackNet with channels-last weights; pure logic, no
I/O, so the enclave may import it. Either way every
guarantee holds: with the BackNet in the enclave the host sees strictly less (no IR, no scores in
the secret order), and the enclave runs only the owner's BackNet (it checks the bytes the host
hands it against the signed manifest, `models.bundle.open_enclave_parts(with_backnet=True)`).

Why: with the BackNet on the host every pass makes two enclave round trips (FrontNet, then the
host's BackNet, then class mapping and sealing in the enclave). On a CPU host the BackNet costs
the enclave what it would cost the host (darknet k=10: ~0.4 ms for one image, ~0.12 ms per image
in passes of 32), so running it there saves a channel round trip, the host's BackNet stage and
the finish call per pass, and keeps both cores on one pool of passes (docs/benchmarks.md,
session 6, one quiet window: 0.75-0.78 -> 0.82-0.84 of plain's best throughput; CPU per image
1.05-1.19x plain against 1.12-1.18x). With a GPU for the
BackNet the host keeps it (the enclave has no GPU): that is the paper's ternary split, and what
`backnet="host"` asks for on a CPU host too.

    backnet_small: "auto" (enclave when the BackNet device is a CPU) | "enclave" | "host"
    backnet:       "auto" (every pass in the enclave when the BackNet device is a CPU and
                   backnet_small is not "host"; else as "host") | "host" (passes over
                   SMALL_ROWS images on the host) | "enclave" (every pass)
"""

from __future__ import annotations

import torch

from ..errors import UserInputError

#: BackNet passes of at most this many rows run their channels-last copy (host: `BackNetExecutor`;
#: enclave: `EnclaveService._whole_pass`), larger ones NCHW; and the enclave answers passes of at
#: most this many images whole under backnet_small "enclave".
SMALL_ROWS = 4

BACKNET_SMALL = ("auto", "enclave", "host")
BACKNET = ("auto", "host", "enclave")
#: `finish_rows` meaning "every pass" (above any call's image count: 4096 requests x 256 images).
ALL_ROWS = 1 << 20
#: The largest BackNet (bytes of parameters and buffers) of which the enclave keeps a second, NCHW
#: copy for its passes over SMALL_ROWS images (twice as fast at 32 rows on darknet k=10's 2x2 map,
#: docs/benchmarks.md). Enclave memory is the scarce kind (SGX1's usable EPC is about 93 MiB, and
#: pages past it are swapped at a cost): past this a BackNet is held once, channels-last, and
#: large passes run on that copy (the same answers). `serve --backnet-copy-mib` sets it; 0: never.
NCHW_COPY_MAX_BYTES = 16 << 20


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
    if backnet == "enclave" or (backnet == "auto" and device.type == "cpu" and backnet_small != "host"):
        return ALL_ROWS
    if backnet_small == "enclave" or (backnet_small == "auto" and device.type == "cpu"):
        return SMALL_ROWS
    return 0


def keeps_nchw_copy(backnet_bytes: int, max_bytes: int = NCHW_COPY_MAX_BYTES) -> bool:
    """Whether the enclave may hold a second, NCHW copy of a BackNet of `backnet_bytes` (above)."""
    return 0 < backnet_bytes <= max_bytes


def describe(finish_rows: int) -> dict[str, str]:
    """Where small and large passes' BackNet runs (for /healthz and logs)."""
    return {"small": "enclave" if finish_rows else "host", "large": "enclave" if finish_rows >= ALL_ROWS else "host"}
