"""`enclaveml.Client`: deploy bundles and run encrypted inference, as `enclaveml deploy`/`infer` do (client side).

A thin layer over `client.sdk.EnclaveClient`: every call first verifies the enclave's evidence
against the caller's policy, then sends only ciphertext. Results come back as `Prediction`s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, overload

from .images import ImageLike, to_image_bytes

if TYPE_CHECKING:
    import torch

    from ..crypto import SigningKey
    from ..tee import Policy
    from .bundles import Bundle


@dataclass(frozen=True)
class Label:
    index: int  # class index in the model's own order
    label: str
    score: float  # softmax probability


@dataclass(frozen=True)
class Prediction:
    """The enclave's answer for one image: the top-k labels, best first (and logits if asked for)."""

    model: str
    top: tuple[Label, ...]
    logits: "torch.Tensor | None" = None

    @property
    def label(self) -> str:
        return self.top[0].label

    @property
    def index(self) -> int:
        return self.top[0].index

    @property
    def score(self) -> float:
        return self.top[0].score

    @classmethod
    def from_dict(cls, d: dict) -> "Prediction":
        logits = d.get("logits")
        if logits is not None:
            import torch

            logits = torch.tensor(logits, dtype=torch.float32)
        return cls(str(d["model"]), tuple(Label(int(t["index"]), str(t["label"]), float(t["score"])) for t in d["top"]),
                   logits)


@dataclass(frozen=True)
class Deployment:
    """What the enclave confirmed for a deploy."""

    model: str  # the model name to pass to `infer(model=...)` (the policy pins it)
    bundle_id: str
    k: int
    replaced: bool  # an earlier deployment of this name (same owner) was replaced
    ref: str = ""  # where it lives on the server: OWNER/name (names are scoped by owner)


def _is_batch(images: Any) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(images, torch.Tensor) and images.dim() == 4


class Client:
    """One server URL and one attestation policy (a TOML file or a `Policy`); thread-safe.

    `with enclaveml.Client(url, "policy.toml") as c: c.deploy(bundle); c.infer("cat.jpg", model="darknet")`
    """

    def __init__(self, url: str, policy: "Policy | str | os.PathLike[str]", *, timeout: float = 60.0,
                 pad_requests: bool = True):
        from ..client.sdk import EnclaveClient

        self.sdk = EnclaveClient(url, policy, timeout=timeout, pad_requests=pad_requests)

    @property
    def url(self) -> str:
        return self.sdk.url

    def attest(self) -> Any:
        """Fetch fresh evidence and verify it against the policy; returns the verified claims."""
        return self.sdk.attest().claims

    def deploy(self, bundle: "Bundle | str | os.PathLike[str]", *, owner_key: "SigningKey | str | os.PathLike[str] | None" = None,
               model_key: "bytes | str | os.PathLike[str] | None" = None, model: str | None = None) -> Deployment:
        """Verify the enclave, release the model key to it (sealed, signed), upload the bundle.

        Defaults as `enclaveml deploy`: the model key from BUNDLE.modelkey, the owner key from
        ENCLAVEML_HOME/owner.key, the model id from the bundle's name.
        """
        from ..models.bundle import load_model_key, model_key_path
        from .keys import as_owner_key

        path = getattr(bundle, "path", bundle)
        if isinstance(model_key, (bytes, bytearray)):
            key = bytes(model_key)
        else:
            key = load_model_key(model_key if model_key is not None else model_key_path(path))
        res = self.sdk.deploy(path, key, as_owner_key(owner_key, create=False), model_id=model)
        return Deployment(str(res.get("name", res["model"])), str(res["bundle_id"]), int(res["k"]),
                          bool(res.get("replaced")), str(res["model"]))

    def undeploy(self, model: str, *, owner_key: "SigningKey | str | os.PathLike[str] | None" = None) -> None:
        """Delete a deployment (only its owner can)."""
        from .keys import as_owner_key

        self.sdk.delete(model, as_owner_key(owner_key, create=False))

    @overload
    def infer(self, images: Sequence[ImageLike], *, model: str, top_k: int = ..., logits: bool = ...) -> list[Prediction]: ...

    @overload
    def infer(self, images: ImageLike, *, model: str, top_k: int = ..., logits: bool = ...) -> Prediction: ...

    def infer(self, images, *, model: str, top_k: int = 5, logits: bool = False):
        """Encrypt image(s) to the attested enclave; a list (or an N×3×H×W tensor) gives a list back.

        An image is encoded bytes, a file path, a PIL image, a (3, H, W) tensor or an (H, W, 3)
        uint8 array. One failed image raises its error.
        """
        batch = _is_batch(images)
        items = list(images) if batch else [images]
        results = self.sdk.infer([to_image_bytes(i) for i in items], model=model, top_k=top_k, logits=logits)
        preds = [Prediction.from_dict(r) for r in results]
        return preds if batch else preds[0]

    def health(self) -> dict:
        return self.sdk.health()

    def close(self) -> None:
        self.sdk.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"
