"""A partitioned model as a deployable bundle: a signed manifest, a plain BackNet, sealed secrets.

Trust side: owner (`make_bundle`), host (`read_public_bundle`: all it may load) and enclave
(`open_enclave_parts`: needs the model key, which the owner releases only to an attested enclave).

Layout of a bundle directory (docs/crypto.md):

    manifest.json        plain JSON, signed: format, bundle id, name, arch, k, layer names, input
                         and IR shapes, preprocessing, number of classes, owner public key, and the
                         SHA-256 of every part file
    manifest.sig         {"alg": "Ed25519", "owner": hex, "signature": hex} over
                         "enclaveml/v1 bundle-manifest\\0" || the exact bytes of manifest.json
    backnet.safetensors  layers k..n-1, the last Linear's rows permuted by the secret mapping
    frontnet.sealed      AES-256-GCM token (crypto.seal) of layers 0..k-1 as safetensors
    classmap.sealed      AES-256-GCM token of the ClassMapping JSON

Both sealed parts use AAD = "enclaveml/v1 bundle-part\\0" || SHA-256(canonical manifest core) ||
"\\0" || part name, where the core is the manifest without its "parts" table (which itself holds
the hashes of the sealed files). So a sealed part opens only in its own bundle, under its own
name. Weights are never pickled: safetensors only, loaded from bytes.
"""

from __future__ import annotations

import hmac
import importlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..crypto import SigningKey, VerifyKey, generate_key, open_sealed, seal, sha256
from ..crypto.signing import write_all
from ..data.preprocess import Preprocessing
from ..errors import PartitionError, TamperedMessage, UserInputError
from .classmap import ClassMapping
from .layers import BackNet, FrontNet, LayeredModel, layer_state_dict

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
BACKNET = "backnet.safetensors"
FRONTNET = "frontnet.sealed"
CLASSMAP = "classmap.sealed"
PARTS = (BACKNET, FRONTNET, CLASSMAP)
MANIFEST_LABEL = b"enclaveml/v1 bundle-manifest\x00"
PART_LABEL = b"enclaveml/v1 bundle-part\x00"
#: A manifest is small; refuse to parse anything bigger (it is read before the model key is known).
MAX_MANIFEST_BYTES = 1 << 20


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True)
class BundleManifest:
    """The verified, public description of a bundle (what host, client and enclave agree on)."""

    format: int
    bundle_id: str
    name: str
    arch: dict
    k: int
    layers: list[str]
    input_shape: tuple[int, ...]
    ir_shape: tuple[int, ...]
    preprocessing: Preprocessing
    num_classes: int
    owner: str  # hex of the owner's Ed25519 public key
    parts: dict[str, str]  # file name -> hex SHA-256
    raw: bytes = field(repr=False, compare=False, default=b"")

    @property
    def owner_key(self) -> VerifyKey:
        return VerifyKey.from_bytes(bytes.fromhex(self.owner))

    @property
    def frontnet_layers(self) -> list[str]:
        return self.layers[: self.k]

    def core(self) -> dict:
        """Everything but the part hashes: what the sealed parts are bound to."""
        return {"format": self.format, "bundle_id": self.bundle_id, "name": self.name, "arch": self.arch,
                "k": self.k, "layers": list(self.layers), "input_shape": list(self.input_shape),
                "ir_shape": list(self.ir_shape), "preprocessing": self.preprocessing.to_dict(),
                "num_classes": self.num_classes, "owner": self.owner}

    def core_digest(self) -> bytes:
        return sha256(_canonical(self.core()))

    def part_aad(self, part: str) -> bytes:
        return PART_LABEL + self.core_digest() + b"\x00" + part.encode()

    def to_json(self) -> bytes:
        return json.dumps({**self.core(), "parts": dict(self.parts)}, indent=2, sort_keys=True,
                          allow_nan=False).encode() + b"\n"

    @classmethod
    def _from_dict(cls, d: dict, raw: bytes) -> "BundleManifest":
        if d.get("format") != FORMAT:
            raise UserInputError(f"bundle format {d.get('format')!r} is not supported (expected {FORMAT})")
        m = cls(format=FORMAT, bundle_id=str(d["bundle_id"]), name=str(d["name"]), arch=dict(d["arch"]),
                k=int(d["k"]), layers=[str(s) for s in d["layers"]], input_shape=tuple(int(i) for i in d["input_shape"]),
                ir_shape=tuple(int(i) for i in d["ir_shape"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]), num_classes=int(d["num_classes"]),
                owner=str(d["owner"]), parts={str(a): str(b) for a, b in dict(d["parts"]).items()}, raw=raw)
        if set(m.parts) != set(PARTS) or not 1 <= m.k < len(m.layers):
            raise ValueError("parts or k")
        return m

    @classmethod
    def verify(cls, manifest_bytes: bytes, signature_bytes: bytes,
               expected_owner: VerifyKey | None = None) -> "BundleManifest":
        """Check the owner's signature on the exact manifest bytes, then parse them.

        Without `expected_owner` this proves only that the manifest is self-consistent; pass the
        owner key you trust (the enclave: the key-release signer) to prove who made it.
        """
        if len(manifest_bytes) > MAX_MANIFEST_BYTES or len(signature_bytes) > 4096:
            raise TamperedMessage("bundle manifest or signature is too large")
        try:
            sig = json.loads(signature_bytes)
            owner = VerifyKey.from_bytes(bytes.fromhex(sig["owner"]))
            signature = bytes.fromhex(sig["signature"])
            if sig.get("alg") != "Ed25519":
                raise ValueError("alg")
        except (ValueError, KeyError, TypeError, AttributeError, UserInputError):
            raise TamperedMessage("bundle signature file is malformed") from None
        if expected_owner is not None and owner != expected_owner:
            raise TamperedMessage("bundle is signed by another owner than expected")
        owner.verify(signature, MANIFEST_LABEL + bytes(manifest_bytes))  # authenticate before parsing
        try:
            m = cls._from_dict(json.loads(manifest_bytes), bytes(manifest_bytes))
        except UserInputError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TamperedMessage("bundle manifest is malformed") from None
        if not hmac.compare_digest(bytes.fromhex(m.owner), owner.to_bytes()):
            raise TamperedMessage("bundle manifest names another owner than its signer")
        return m


# ---------------------------------------------------------------------------- architectures

def build_arch(arch: Mapping[str, Any], input_shape=None, num_classes: int | None = None) -> LayeredModel:
    """Rebuild a model's architecture (random weights) from a manifest's `arch`.

    `{"zoo": name}` builds a zoo model; `{"factory": "pkg.module:function", "kwargs": {...}}` calls
    a function that returns a `LayeredModel` or an `nn.Sequential` (wrapped with the given shapes).
    """
    if "zoo" in arch:
        from . import zoo

        model = zoo.entry(str(arch["zoo"])).build()
    elif "factory" in arch:
        spec = str(arch["factory"])
        mod_name, sep, fn_name = spec.partition(":")
        if not sep or not mod_name or not fn_name:
            raise UserInputError(f"model factory {spec!r} must look like 'package.module:function'")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UserInputError(f"model factory {spec!r} cannot be imported ({type(e).__name__})") from None
        model = fn(**dict(arch.get("kwargs", {})))
        if not isinstance(model, LayeredModel):
            if input_shape is None or num_classes is None:
                raise UserInputError(f"model factory {spec!r} did not return a LayeredModel")
            model = LayeredModel.from_sequential(model, tuple(input_shape), int(num_classes))
    else:
        raise UserInputError("arch must name a zoo model {'zoo': ...} or a factory {'factory': 'mod:fn'}")
    return model.eval()


def _last_linear(model: LayeredModel) -> tuple[str, nn.Linear]:
    name, last = list(model.layers.named_children())[-1]
    if not isinstance(last, nn.Linear) or last.out_features != model.num_classes:
        raise PartitionError(f"the last layer ({name}) must be an nn.Linear with {model.num_classes} outputs "
                             "so that its rows can be permuted")
    return name, last


# ---------------------------------------------------------------------------- owner side

def make_bundle(model: LayeredModel, k: int, out_dir: "str | os.PathLike[str]", arch: dict,
                preprocessing: Preprocessing, classes: list[str], owner_key: SigningKey,
                name: str | None = None, model_key: bytes | None = None) -> tuple[BundleManifest, bytes]:
    """Split `model` at `k` and write a bundle to `out_dir` (which must not exist yet, or be empty).

    Returns `(manifest, model_key)`. Keep the model key on the owner's machine; it leaves only
    sealed to an attested enclave (`crypto.seal_key_release`). All checks run before anything is
    written, and the directory appears atomically (written beside it, then renamed).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out}: already exists and is not an empty directory")
    model.check_point(k)
    last_name, _ = _last_linear(model)
    classes = [str(c) for c in classes]
    if len(classes) != model.num_classes:
        raise UserInputError(f"{len(classes)} class names for a model with {model.num_classes} classes")
    key = generate_key() if model_key is None else bytes(model_key)
    if len(key) != 32:
        raise UserInputError("a model key is 32 bytes")

    from safetensors.torch import save as st_save

    was_training = model.training
    model.eval()
    try:
        ir_shape = model.partition_points()[k - 1].out_shape
        front, back = model.split(k)
        mapping = ClassMapping.random(model.num_classes, classes)
        back_state = layer_state_dict(back)
        for suffix in ("weight", "bias"):
            if f"{last_name}.{suffix}" in back_state:
                back_state[f"{last_name}.{suffix}"] = mapping.permute_rows(back_state[f"{last_name}.{suffix}"]).contiguous()
        front_bytes = st_save(layer_state_dict(front), metadata={"part": "frontnet", "k": str(k)})
        back_bytes = st_save(back_state, metadata={"part": "backnet", "k": str(k)})
    finally:
        model.train(was_training)

    owner_pub = owner_key.public_key()
    manifest = BundleManifest(
        format=FORMAT, bundle_id=secrets.token_hex(16), name=name or str(arch.get("zoo") or arch.get("factory")),
        arch=dict(arch), k=k, layers=model.names, input_shape=tuple(model.input_shape), ir_shape=tuple(ir_shape),
        preprocessing=preprocessing, num_classes=model.num_classes, owner=owner_pub.to_bytes().hex(), parts={})
    files = {
        BACKNET: back_bytes,
        FRONTNET: seal(key, front_bytes, aad=manifest.part_aad(FRONTNET)),
        CLASSMAP: seal(key, mapping.to_bytes(), aad=manifest.part_aad(CLASSMAP)),
    }
    manifest = replace(manifest, parts={n: sha256(b).hex() for n, b in files.items()})
    raw = manifest.to_json()
    manifest = replace(manifest, raw=raw)
    files[MANIFEST] = raw
    files[SIGNATURE] = json.dumps({"alg": "Ed25519", "owner": owner_pub.to_bytes().hex(),
                                   "signature": owner_key.sign(MANIFEST_LABEL + raw).hex()}, indent=2).encode() + b"\n"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, key


# ---------------------------------------------------------------------------- reading

def _read_files(bundle: "str | os.PathLike[str] | Mapping[str, bytes]", names) -> dict[str, bytes]:
    if isinstance(bundle, Mapping):
        missing = [n for n in names if n not in bundle]
        if missing:
            raise UserInputError(f"bundle is missing {', '.join(missing)}")
        return {n: bytes(bundle[n]) for n in names}
    d = Path(bundle)
    if not d.is_dir():
        raise UserInputError(f"{d}: not a bundle directory")
    out = {}
    for n in names:
        try:
            out[n] = (d / n).read_bytes()
        except OSError as e:
            raise UserInputError(f"{d / n}: cannot read bundle part ({e.strerror})") from None
    return out


def _check_part(manifest: BundleManifest, part: str, data: bytes) -> None:
    if not hmac.compare_digest(sha256(data).hex(), manifest.parts.get(part, "")):
        raise TamperedMessage(f"bundle part {part} does not match the signed manifest")


def _load_state(module: nn.Module, data: bytes, part: str) -> None:
    from safetensors.torch import load as st_load

    try:
        state = st_load(data)
        module.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors' own errors, shape and key mismatches
        raise TamperedMessage(f"bundle part {part} does not fit the architecture ({type(e).__name__})") from None


def load_manifest(bundle: "str | os.PathLike[str] | Mapping[str, bytes]",
                  expected_owner: VerifyKey | None = None) -> BundleManifest:
    """Read and verify a bundle's manifest (any side)."""
    files = _read_files(bundle, (MANIFEST, SIGNATURE))
    return BundleManifest.verify(files[MANIFEST], files[SIGNATURE], expected_owner)


def read_public_bundle(bundle: "str | os.PathLike[str] | Mapping[str, bytes]",
                       expected_owner: VerifyKey | None = None) -> tuple[BundleManifest, BackNet]:
    """Host side: verify the manifest and load the BackNet (scores come out in the secret order)."""
    manifest = load_manifest(bundle, expected_owner)
    data = _read_files(bundle, (BACKNET,))[BACKNET]
    _check_part(manifest, BACKNET, data)
    model = build_arch(manifest.arch, manifest.input_shape, manifest.num_classes)
    _check_arch(model, manifest)
    _, back = model.split(manifest.k)
    _load_state(back, data, BACKNET)
    return manifest, back.eval()


def _check_arch(model: LayeredModel, manifest: BundleManifest) -> None:
    if model.names != manifest.layers or model.num_classes != manifest.num_classes:
        raise TamperedMessage("the rebuilt architecture does not match the manifest's layers")


def open_enclave_parts(bundle: "str | os.PathLike[str] | Mapping[str, bytes]", model_key: bytes,
                       expected_owner: VerifyKey | None = None) -> tuple[FrontNet, ClassMapping]:
    """Enclave side: decrypt and load the FrontNet and the class mapping.

    `bundle` is a directory or a mapping of file name -> bytes (what the host hands the enclave).
    Pass `expected_owner` = the key-release signer so that only that owner's bundle is accepted.
    The architecture code is imported only after both parts authenticate under the model key.
    """
    files = _read_files(bundle, (MANIFEST, SIGNATURE, FRONTNET, CLASSMAP))
    manifest = BundleManifest.verify(files[MANIFEST], files[SIGNATURE], expected_owner)
    for part in (FRONTNET, CLASSMAP):
        _check_part(manifest, part, files[part])
    front_bytes = open_sealed(model_key, files[FRONTNET], aad=manifest.part_aad(FRONTNET))
    mapping = ClassMapping.from_bytes(open_sealed(model_key, files[CLASSMAP], aad=manifest.part_aad(CLASSMAP)))
    if mapping.num_classes != manifest.num_classes:
        raise TamperedMessage("class mapping size does not match the manifest")
    model = build_arch(manifest.arch, manifest.input_shape, manifest.num_classes)
    _check_arch(model, manifest)
    front, _ = model.split(manifest.k)
    _load_state(front, front_bytes, FRONTNET)
    return front.eval(), mapping


def bundle_files(bundle: "str | os.PathLike[str]") -> dict[str, bytes]:
    """All files of a bundle directory as bytes (what a host forwards to its enclave)."""
    return _read_files(bundle, (MANIFEST, SIGNATURE, *PARTS))



# ---------------------------------------------------------------------------- the owner's model key file

def model_key_path(bundle_dir: "str | os.PathLike[str]") -> Path:
    """Where `partition` keeps a bundle's model key: `BUNDLE.modelkey`, beside (not inside) the bundle."""
    p = Path(bundle_dir)
    return p.with_name(p.name + ".modelkey")


def save_model_key(path: "str | os.PathLike[str]", key: bytes) -> None:
    """Write a model key as hex, mode 0600, refusing to overwrite an existing key."""
    if len(key) != 32:
        raise UserInputError("a model key is 32 bytes")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserInputError(f"{path}: a model key is already there; refusing to overwrite it") from None
    except OSError as e:
        raise UserInputError(f"{path}: cannot write model key ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, bytes(key).hex().encode() + b"\n")
    finally:
        os.close(fd)


def load_model_key(path: "str | os.PathLike[str]") -> bytes:
    """Read a model key written by `save_model_key` (owner side, e.g. for `deploy`)."""
    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
    except OSError as e:
        raise UserInputError(f"{path}: cannot read model key ({e.strerror})") from None
    except ValueError:
        raise UserInputError(f"{path}: not a model key file (expected 64 hex digits)") from None
    if len(key) != 32:
        raise UserInputError(f"{path}: not a model key file (expected 64 hex digits)")
    return key
