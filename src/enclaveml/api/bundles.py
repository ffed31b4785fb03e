"""`enclaveml.partition`: split a model into a deployable bundle, as `enclaveml partition` does (owner side).

The bundle directory (signed manifest, plain BackNet, sealed FrontNet and class mapping) is written
by `models.bundle.make_bundle`; the model key goes to `BUNDLE.modelkey` beside it (mode 0600), never
inside. k comes from `k=` or the assessment, under the rule in `models.choose` (never shallower
than the assessment recommends unless `force=True`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import UserInputError
from .models import ModelLike

if TYPE_CHECKING:
    from ..crypto import SigningKey, VerifyKey
    from ..models.bundle import BundleManifest
    from .assessment import Assessment


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk and its verified manifest: what the host may know of the model."""

    path: Path
    manifest: "BundleManifest"

    @classmethod
    def open(cls, path: "str | os.PathLike[str]", expected_owner: "VerifyKey | SigningKey | None" = None) -> "Bundle":
        """Read and verify a bundle's manifest signature (and its owner, if given)."""
        from ..crypto import SigningKey
        from ..models.bundle import load_manifest

        vk = expected_owner.public_key() if isinstance(expected_owner, SigningKey) else expected_owner
        return cls(Path(path), load_manifest(path, expected_owner=vk))

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def name(self) -> str:
        """The model id `Client.deploy` uses by default."""
        return self.manifest.name

    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def owner(self) -> str:
        """Fingerprint (hex SHA-256) of the owner key that signed the manifest."""
        return self.manifest.owner_key.fingerprint()

    @property
    def layers(self) -> list[str]:
        return list(self.manifest.layers)

    @property
    def frontnet_layers(self) -> list[str]:
        return self.manifest.frontnet_layers

    @property
    def ir_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.ir_shape)

    @property
    def model_key_path(self) -> Path:
        """`BUNDLE.modelkey`: where `partition` put the model key (owner's machine only)."""
        from ..models.bundle import model_key_path

        return model_key_path(self.path)

    def model_key(self) -> bytes:
        from ..models.bundle import load_model_key

        return load_model_key(self.model_key_path)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, name={self.name!r}, k={self.k}, id={self.bundle_id[:12]})"


def _default_name(model: Any, arch: Mapping[str, Any], out: Path) -> str:
    """The zoo name, or the bundle directory's name made URL-safe (as `enclaveml partition` names it)."""
    if "zoo" in arch:
        return str(arch["zoo"])
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in out.resolve().name)
    return safe.lstrip(".")[:64] or "model"


def _recommended(assessment: "Assessment | Mapping[str, Any] | str | os.PathLike[str] | None",
                 model_name: str | None) -> tuple[int | None, str]:
    from ..models.choose import read_assessment, recommended_point

    if assessment is None:
        return None, "the assessment"
    if isinstance(assessment, (str, os.PathLike)):
        return recommended_point(read_assessment(assessment), model_name, os.fspath(assessment)), os.fspath(assessment)
    record = getattr(assessment, "record", assessment)
    return recommended_point(record, model_name, "the assessment"), "the assessment"


def partition(model: ModelLike, *, out: "str | os.PathLike[str]", k: int | None = None,
              assessment: "Assessment | Mapping[str, Any] | str | os.PathLike[str] | None" = None,
              owner_key: "SigningKey | str | os.PathLike[str] | None" = None, force: bool = False,
              name: str | None = None, classes: Sequence[str] | None = None,
              weights: "str | os.PathLike[str] | None" = None, input_shape: Sequence[int] | None = None,
              preprocessing: Any = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              factory: str | None = None, pretrained: bool = True) -> Bundle:
    """Split `model` at `k` (default: the assessment's recommended point) into a bundle at `out`.

    `owner_key`: an `OwnerKey`, or a key file (created on first use; default
    ENCLAVEML_HOME/owner.key, as the CLI). The model key is written to `out + ".modelkey"` (0600).
    A model object needs `factory="pkg.mod:fn"` naming how the enclave rebuilds its architecture,
    unless it is a zoo model from `enclaveml.load_model`. Nothing is written when a check fails.
    """
    import torch

    from ..models.bundle import make_bundle, model_key_path, save_model_key
    from ..models.choose import partition_point
    from .keys import as_owner_key
    from .models import model_name, resolve_model, spec_arch

    out_dir = Path(out)
    key_path = model_key_path(out_dir)
    if out_dir.exists():
        raise UserInputError(f"{out_dir}: already exists; choose a new bundle directory")
    if key_path.exists():
        raise UserInputError(f"{key_path}: a model key is already there; refusing to overwrite it")
    recommended, source = _recommended(assessment, model_name(model, name))
    k = partition_point(k, recommended, assessed=assessment is not None, force=force, source=source)
    if isinstance(model, (str, os.PathLike)) and spec_arch(os.fspath(model)).get("factory") and weights is None:
        raise UserInputError(f"user model {model!r} needs weights=FILE (.safetensors or a .pt state dict)")
    r = resolve_model(model, name=name, weights=weights, input_shape=input_shape, classes=classes,
                      preprocessing=preprocessing, mean=mean, std=std, resize=True, pretrained=pretrained,
                      factory=factory)
    if r.arch is None:
        raise UserInputError(f"a bundle names how the enclave rebuilds the model, and a {type(model).__name__} "
                             "object does not say: pass factory='package.module:function' (and serve with "
                             "--allow-factory), or a zoo name")
    names = r.classes if r.classes is not None else [str(i) for i in range(r.model.num_classes)]
    if len(names) != r.model.num_classes:
        raise UserInputError(f"{len(names)} class names given for a model with {r.model.num_classes} classes")
    r.model.check_point(k)
    owner = as_owner_key(owner_key, create=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        manifest, model_key = make_bundle(r.model, k, out_dir, r.arch, r.preprocessing, names, owner,
                                          name=name or _default_name(model, r.arch, out_dir))
    finally:
        torch.set_num_threads(threads)
    try:
        save_model_key(key_path, model_key)
    except BaseException:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return Bundle(out_dir, manifest)
