"""`enclaveml.caltrain`: the CalTrain calls of each party, as `enclaveml train ...` makes them.

- participant: `contribute(folder, url, policy, key)` uploads signed, encrypted instances.
- owner: `policy(owner)` pins a training enclave configured for that owner; `train(...)` runs the
  partitioned training and fetches the released model, its linkage store and a servable bundle.
- auditor: `open_model(folder)` / `trace(image, label, model_dir=...)` name the training instances
  and contributors behind a misprediction.
- host, for trying it on one machine: `local_server(store, owner)` starts `enclaveml train serve`.
Each wraps the function the CLI command calls (train/participant.py, owner.py, trace.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .. import keyfiles
from ..errors import UserInputError
from .images import ImageLike, to_image_bytes

if TYPE_CHECKING:
    from typing import Union

    import torch

    from ..crypto import SigningKey, VerifyKey
    from ..tee import Policy
    from ..train.participant import ContributionReport

    PolicyLike = Union[Policy, str, os.PathLike]  # a Policy or its TOML file
    OwnerLike = Union[SigningKey, VerifyKey, str, bytes, os.PathLike]  # a key, its public key (hex) or file


def _owner_public(owner: Any) -> Any:
    from ..crypto import SigningKey
    from ..train.enclave import parse_owner

    if isinstance(owner, SigningKey):
        return owner.public_key()
    return parse_owner(os.fspath(owner) if isinstance(owner, os.PathLike) else owner)


@contextlib.contextmanager
def _policy_file(policy: Any) -> Iterator[Path]:
    """The policy as a file path (the CalTrain client reads policies from files); a `Policy`
    object goes to a temporary file: it is public, pinned values only."""
    from ..tee import Policy, write_policy

    if not isinstance(policy, Policy):
        yield Path(policy)
        return
    with tempfile.TemporaryDirectory(prefix="enclaveml-policy-") as d:
        yield write_policy(policy, Path(d) / "policy.toml")


def policy(owner: OwnerLike, out: "str | os.PathLike[str] | None" = None, *, plan: Any = None,
           allowed_factories: Sequence[str] = ()) -> "Policy":
    """(owner/participant) A policy accepting this machine's sim training enclave configured for `owner`
    and its default training plan (`enclaveml train policy --owner`), or `plan` (a `TrainingPlan`,
    its dict or its JSON file, as `train serve --plan` runs it: a factory it fixes is allowed in the
    measured configuration, as are `allowed_factories`); written to `out` too if given."""
    import json

    from ..tee import write_policy
    from ..train.plan import TrainingPlan, participant_policy

    owner_hex = _owner_public(owner).to_bytes().hex()
    if plan is None:
        plan = TrainingPlan.build(owner_hex, "darknet", None, None, None, None, None)
    elif isinstance(plan, (str, os.PathLike)):
        plan = TrainingPlan.from_dict(json.loads(Path(plan).read_text()))
    elif isinstance(plan, dict):
        plan = TrainingPlan.from_dict(plan)
    if plan.owner != owner_hex:
        raise UserInputError("the training plan names another owner")
    p = participant_policy(plan, allowed_factories=tuple(allowed_factories))
    if out is not None:
        write_policy(p, out)
    return p


def participant_id(key: "SigningKey | str | os.PathLike[str]") -> str:
    """The participant id (hex) that linkage records and traces name for this key."""
    from ..crypto import SigningKey

    k = key if isinstance(key, SigningKey) else keyfiles.load_signing_key(key)
    return k.public_key().fingerprint()


def dataset_folder(dataset: Any, root: "str | os.PathLike[str]") -> Path:
    """Write an indexable dataset of (image, label) as an image folder `root/<class>/<i>.png|jpg`.

    `dataset.classes` names the labels (they must be the training's class names). Encoded JPEG or
    PNG bytes are written as they are; pixels (PIL, tensor, array) as lossless PNG, so the same
    dataset gives the same instance hashes every time (the journal and the server's deduplication
    rely on that).
    """
    classes = getattr(dataset, "classes", None)
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise UserInputError("a dataset to contribute needs .classes: the class names of its labels")
    root = Path(root)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UserInputError("each dataset item must be an (image, label) pair")
        data, label = to_image_bytes(item[0]), int(item[1])
        if not 0 <= label < len(classes):
            raise UserInputError(f"dataset item {i}: label {label} is not an index into its {len(classes)} classes")
        suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg" if data.startswith(b"\xff\xd8") else None
        if suffix is None:
            raise UserInputError(f"dataset item {i}: bytes that are neither PNG nor JPEG")
        (root / classes[label] / f"{i:06d}{suffix}").write_bytes(data)
    return root


def contribute(data: "str | os.PathLike[str] | Any", url: str, policy: PolicyLike, key: "str | os.PathLike[str]", *,
               batch: int = 128, limit: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> "ContributionReport":
    """(participant) Verify the enclave, then upload `data/<class>/*.jpg|png` signed and encrypted.

    `data` is an image folder, or a dataset of (image, label) with `.classes` (staged as a
    temporary image folder on this machine, see `dataset_folder`). `key`: your Ed25519 key file
    (created on first use); a journal beside it makes a second call upload only what the server
    has not acknowledged. Returns the per-status counts and rejections.
    """
    from ..train.participant import contribute as _contribute

    with contextlib.ExitStack() as stack:
        pf = stack.enter_context(_policy_file(policy))
        if not isinstance(data, (str, os.PathLike)):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="enclaveml-contribute-"))
            data = dataset_folder(data, Path(tmp) / "data")
        return _contribute(data, url, pf, key, batch=batch, limit=limit, progress=progress)


@dataclass(frozen=True)
class TracedInstance:
    instance_hash: str  # hex SHA-256 of the training image's bytes
    participant: str  # contributor id (hex)
    distance: float  # fingerprint distance to the traced input
    signature: str  # the contributor's signature over (hash, label, participant), hex
    margin: float | None = None  # mode "mislabel": < 0 means it sits among another class


@dataclass(frozen=True)
class Trace:
    """The training instances behind a prediction, and how many each contributor gave."""

    predicted: str  # what the model says the input is
    label: str  # the label traced
    mode: str
    neighbours: tuple[TracedInstance, ...]
    participants: tuple[tuple[str, int], ...]  # (participant id, count), most first
    record: dict  # the CLI's `train trace --json` output

    @property
    def suspect(self) -> str | None:
        """The contributor of most of the traced instances."""
        return self.participants[0][0] if self.participants else None

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        ns = tuple(TracedInstance(n["instance_hash"], n["participant"], float(n["distance"]), n.get("signature", ""),
                                  n.get("margin")) for n in d["neighbours"])
        return cls(str(d["predicted"]), str(d["label_name"]), str(d["mode"]), ns,
                   tuple((p["participant"], int(p["count"])) for p in d["participants"]), d)


class TrainedModel:
    """A released CalTrain model folder, opened (owner or auditor): the model, its classes, tracing."""

    def __init__(self, folder: "str | os.PathLike[str]", linkage: "str | os.PathLike[str] | None" = None):
        from ..train.owner import TracedModel

        self.path = Path(folder)
        self._traced = TracedModel(folder, linkage)

    @property
    def model(self) -> "torch.nn.Module":
        """The trained network (FrontNet and BackNet together, class order), in eval mode."""
        return self._traced.model

    @property
    def classes(self) -> list[str]:
        return list(self._traced.classes)

    @property
    def bundle(self) -> Path | None:
        """The release's servable bundle (as `partition` writes one; its key at BUNDLE.modelkey), if made."""
        b = getattr(self, "_bundle", None) or self.path / "bundle"
        return b if (b / "manifest.json").is_file() else None

    @property
    def instances(self) -> int:
        return len(self._traced.records)

    def predict(self, image: ImageLike) -> str:
        """The model's label for one image (decoded and preprocessed as in training)."""
        _, pred = self._traced.fingerprint(to_image_bytes(image))
        return self._traced.classes[pred]

    def trace(self, image: ImageLike, label: str, *, k: int = 10, mode: str = "nearest") -> Trace:
        """(auditor) The `k` training instances of `label` behind `image`'s prediction.

        `mode="nearest"` finds backdoors, `"mislabel"` flipped labels (see docs/caltrain.md).
        """
        from ..train.trace import MODES

        if mode not in MODES:
            raise UserInputError(f"unknown trace mode {mode!r}; known: {', '.join(MODES)}")
        return Trace.from_dict(self._traced.trace(to_image_bytes(image), str(label), k, mode))

    def verify_instance(self, image: ImageLike, public_key: str) -> dict:
        """(auditor) Check a participant's claim to an instance: image hash and record signature."""
        return self._traced.verify_instance(to_image_bytes(image), public_key)

    def __repr__(self) -> str:
        return f"TrainedModel({str(self.path)!r}, {self.instances} instances)"


def open_model(folder: "str | os.PathLike[str]", linkage: "str | os.PathLike[str] | None" = None) -> TrainedModel:
    """Open a released model folder (`linkage`: read records from a postgresql:// URL or SQLite file)."""
    return TrainedModel(folder, linkage)


def trace(image: ImageLike, label: str, *, model_dir: "str | os.PathLike[str]", k: int = 10,
          mode: str = "nearest", linkage: "str | os.PathLike[str] | None" = None) -> Trace:
    """(auditor) `enclaveml train trace IMAGE --label LABEL` on a released model folder."""
    return TrainedModel(model_dir, linkage).trace(image, label, k=k, mode=mode)


def train(url: str, policy: PolicyLike, *, split: int | None = None, model: str | None = None, epochs: int = 4,
          owner_key: "SigningKey | str | os.PathLike[str]" = "owner.key", out: "str | os.PathLike[str]" = "caltrain-model",
          run_id: str = "caltrain", batch: int = 128, lr: float = 0.1, seed: int = 0, checkpoint_every: int = 50,
          progress: Callable[[dict], None] | None = None, bundle: "str | os.PathLike[str] | None" = None,
          name: str | None = None) -> TrainedModel:
    """(owner) Train with the FrontNet (first `split` layers), labels and loss in the enclave and the
    BackNet on the host; wait, fetch the release into `out`, and open it.

    `model`: a model spec (`models/spec.py`): a zoo name with options such as "darknet:width=8", or
    your "package.module:function" when the server's plan allows it; None takes the plan's (else
    "darknet"), as does `split`. The same `run_id` again resumes from its sealed checkpoint.
    `owner_key`: the key the server was started for (an `OwnerKey` or key file). The release
    includes a servable bundle (`TrainedModel.bundle`, default OUT/bundle, named `name`, default
    the run id) that `Client.deploy` / `enclaveml deploy` take as it is.
    """
    from ..train.owner import run
    from ..train.partitioned import TrainConfig

    cfg = TrainConfig(epochs=epochs, batch=batch, lr=lr, seed=seed)
    with _policy_file(policy) as pf:
        run(url, pf, model, split, cfg, owner_key, out, run_id, checkpoint_every, progress=progress, wait=True,
            bundle=bundle, name=name)
    found = TrainedModel(out)
    if bundle is not None:
        found._bundle = Path(bundle)
    return found


# ---------------------------------------------------------------------------- a local training server

@dataclass
class TrainingServer:
    url: str
    process: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(store: "str | os.PathLike[str]", owner: OwnerLike, *, port: int | None = None, tee: str = "sim",
                 args: Sequence[str] = (), log: "str | os.PathLike[str] | None" = None,
                 timeout_s: float = 120.0) -> Iterator[TrainingServer]:
    """(host) `enclaveml train serve` for `owner` as a child process; stopped (with its enclave) on exit.

    For trying CalTrain on one machine; `owner` may be an `OwnerKey`: only its public key is passed.
    """
    import httpx

    owner_hex = _owner_public(owner).to_bytes().hex()
    port = port or _free_port()
    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(log) if log is not None else store.with_name(store.name + ".server.log")
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "enclaveml", "train", "serve", "--store", str(store),
                                 "--port", str(port), "--tee", tee, "--owner", owner_hex, *args],
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if httpx.get(url + "/info", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise UserInputError(f"the training server exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise UserInputError(f"the training server did not start in {timeout_s:.0f} s; see {log_path}")
                time.sleep(0.2)
            yield TrainingServer(url, proc, log_path)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: host and enclave worker
                    proc.wait(10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)  # an enclave worker left behind in that group
