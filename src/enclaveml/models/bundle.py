"""A partitioned model as a deployable bundle: a signed manifest, a plain BackNet, sealed secrets.

Trust side: owner (`make_bundle`), host (`read_public_bundle`: all it may load) and enclave
(`open_enclave_parts`: needs the model key, which the owner releases only to an attested enclave;
with `with_backnet` it also loads the public BackNet the host hands over, after the same hash check
against the signed manifest as the host's, so a host cannot make the enclave run other weights).

Layout of a bundle directory (docs/crypto.md):

    manifest.json        plain JSON, signed: format, bundle id, name, arch, k, layer names, input
                         and IR shapes, preprocessing, number of classes, owner public key, and the
                         SHA-256 of every part file
    manifest.sig         {"alg": "Ed25519", "owner": hex, "signature": hex} over
                         "enclaveml/v1 bundle-manifest\\0" || the exact bytes of manifest.json
    backnet.safetensors  layers k..n-1, the last Linear's rows permuted by the secret mapping
    frontnet.sealed      AES-256-GCM token (crypto.seal) of layers 0..k-1 as safetensors
    classmap.sealed      AES-256-GCM token of the ClassMapping JSON (padded: its size shows only
                         the number of classes, never the label names' length)
    head.sealed          only with `head` = N > 0: AES-256-GCM token of the last N layers (the
                         classifier head), which then run in the enclave too; the host never sees
                         class scores and its BackNet holds no class rows

Both sealed parts use AAD = "enclaveml/v1 bundle-part\\0" || SHA-256(canonical manifest core) ||
"\\0" || part name, where the core is the manifest without its "parts" table (which itself holds
the hashes of the sealed files). So a sealed part opens only in its own bundle, under its own
name. Weights are never pickled: safetensors only, loaded from bytes.

Architectures: a manifest is signed only by whoever made it, so it names code, never runs it.
`{"zoo": name}` (optionally with integer `"kwargs"`) is always built; `{"factory": "pkg.mod:fn", "kwargs": {...}}` only when the
CALLER's `allowed_factories` names that exact "pkg.mod:fn" (the owner on their machine, or a
list fixed in the enclave's measured configuration and the server's), with kwargs that are plain
JSON scalars. Anything else raises `UserInputError` before any import.
"""

from __future__ import annotations

import hmac
import importlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AbstractSet, Any, Iterable, Mapping

from torch import nn

from ..crypto import SigningKey, VerifyKey, generate_key, open_sealed, seal, sha256
from ..keyfiles import write_private
from ..crypto.wirejson import loads_untrusted
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
HEAD = "head.sealed"
PARTS = (BACKNET, FRONTNET, CLASSMAP)
MANIFEST_LABEL = b"enclaveml/v1 bundle-manifest\x00"
PART_LABEL = b"enclaveml/v1 bundle-part\x00"
#: A manifest is small; refuse to parse anything bigger (it is read before the model key is known).
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096
#: Nesting of a manifest: {"preprocessing": {"size": [...]}} is 3 deep; the arch's kwargs are scalars.
MAX_MANIFEST_DEPTH = 8
#: Largest dimension or count a manifest may state (shapes, k, number of classes).
MAX_DIM = (1 << 31) - 1
#: Largest zoo model built from a manifest's options (`{"zoo": "darknet", "kwargs": {"width": W}}`):
#: an uploader must not make the host and the enclave allocate without bound. The zoo's default
#: models have 0.1-2.3 M parameters.
MAX_ZOO_PARAMS = 64_000_000
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


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
    #: Layers at the end that run in the enclave after the BackNet (0: the host runs the classifier).
    head: int = 0

    @property
    def part_names(self) -> tuple[str, ...]:
        """The files this bundle has besides its manifest and signature."""
        return PARTS + ((HEAD,) if self.head else ())

    @property
    def back_stop(self) -> int:
        """Index after the BackNet's last layer (the head, if any, starts there)."""
        return len(self.layers) - self.head

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
                "num_classes": self.num_classes, "owner": self.owner, **({"head": self.head} if self.head else {})}

    def core_digest(self) -> bytes:
        return sha256(_canonical(self.core()))

    def part_aad(self, part: str) -> bytes:
        return PART_LABEL + self.core_digest() + b"\x00" + part.encode()

    def to_json(self) -> bytes:
        return json.dumps({**self.core(), "parts": dict(self.parts)}, indent=2, sort_keys=True,
                          allow_nan=False).encode() + b"\n"

    @classmethod
    def _from_dict(cls, d: dict, raw: bytes) -> "BundleManifest":
        """Parse a decoded manifest strictly; `ValueError`/`TypeError`/`KeyError` on any bad field."""
        if not isinstance(d, dict):
            raise ValueError("a manifest is a JSON object")
        if type(d.get("format")) is not int or d["format"] != FORMAT:
            raise UserInputError(f"bundle format {d.get('format')!r} is not supported (expected {FORMAT})")
        owner = _str(d["owner"])
        if len(owner) != 64 or any(c not in "0123456789abcdef" for c in owner):
            raise ValueError("owner must be 64 lower-case hex digits (an Ed25519 public key)")
        parts = d["parts"]
        if not isinstance(parts, dict):
            raise ValueError("parts")
        m = cls(format=FORMAT, bundle_id=_str(d["bundle_id"]), name=_str(d["name"]), arch=check_arch(d["arch"]),
                k=_dim(d["k"]), layers=[_str(s) for s in _list(d["layers"])],
                input_shape=tuple(_dim(i) for i in _list(d["input_shape"])),
                ir_shape=tuple(_dim(i) for i in _list(d["ir_shape"])),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]), num_classes=_dim(d["num_classes"]),
                owner=owner, parts={_str(a): _str(b) for a, b in parts.items()}, raw=raw,
                head=_dim(d.get("head", 0)))
        if "head" in d and m.head == 0:  # one encoding only: a plain bundle has no "head" key
            raise ValueError("head")
        if set(m.parts) != set(m.part_names) or not 1 <= m.k < m.back_stop <= len(m.layers):
            raise ValueError("parts, k or head")
        return m

    @classmethod
    def verify(cls, manifest_bytes: bytes, signature_bytes: bytes,
               expected_owner: VerifyKey | None = None) -> "BundleManifest":
        """Check the owner's signature on the exact manifest bytes, then parse them.

        Without `expected_owner` this proves only that the manifest is self-consistent; pass the
        owner key you trust (the enclave: the key-release signer) to prove who made it.
        """
        if len(manifest_bytes) > MAX_MANIFEST_BYTES or len(signature_bytes) > MAX_SIGNATURE_BYTES:
            raise TamperedMessage("bundle manifest or signature is too large")
        try:
            sig = loads_untrusted(signature_bytes, max_depth=2)  # read before any authentication
            owner = VerifyKey.from_bytes(bytes.fromhex(sig["owner"]))
            signature = bytes.fromhex(sig["signature"])
            if sig.get("alg") != "Ed25519":
                raise ValueError("alg")
        except (ValueError, KeyError, TypeError, AttributeError, UserInputError):
            raise TamperedMessage("bundle signature file is malformed") from None
        if expected_owner is not None and owner != expected_owner:
            raise TamperedMessage("bundle is signed by another owner than expected")
        owner.verify(signature, MANIFEST_LABEL + bytes(manifest_bytes))  # authenticate before parsing
        try:  # signed, but by a key the upload itself names: still hostile input on the host path
            m = cls._from_dict(loads_untrusted(manifest_bytes, max_depth=MAX_MANIFEST_DEPTH), bytes(manifest_bytes))
            named_owner = bytes.fromhex(m.owner)
        except UserInputError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            raise TamperedMessage("bundle manifest is malformed") from None
        if not hmac.compare_digest(named_owner, owner.to_bytes()):
            raise TamperedMessage("bundle manifest names another owner than its signer")
        return m


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _list(v: Any) -> list:
    if not isinstance(v, list):
        raise TypeError("expected a list")
    return v


def _dim(v: Any) -> int:
    """A count or a dimension: a JSON integer (not a bool, not a float) in 0..MAX_DIM."""
    if type(v) is not int or not 0 <= v <= MAX_DIM:
        raise ValueError("expected an integer in range")
    return v


# ---------------------------------------------------------------------------- architectures

def check_arch(arch: Any) -> dict:
    """The shape of a manifest's `arch`, checked without importing anything; returns a copy.

    `{"zoo": name}` with optional integer `"kwargs"` (options of the zoo builder, e.g. a CalTrain
    run's `darknet:width=16`: `models/spec.py`), or `{"factory": "pkg.module:function"}` with optional `"kwargs"`: an object
    whose keys are identifiers and whose values are plain JSON scalars (string, finite number,
    boolean, null). Whether a factory may be *called* is decided by `build_arch`'s allow-list.
    """
    if not isinstance(arch, Mapping):
        raise UserInputError("arch must be an object: {'zoo': name} or {'factory': 'pkg.module:function'}")
    keys = set(arch)
    if "zoo" in keys and keys <= {"zoo", "kwargs"}:
        if not isinstance(arch["zoo"], str):
            raise UserInputError("arch 'zoo' must be a zoo model name")
        kwargs = arch.get("kwargs", {})
        if not isinstance(kwargs, Mapping) or ("kwargs" in keys and not kwargs) or not all(
                isinstance(k, str) and k.isidentifier() and not k.startswith("_") and type(v) is int
                and 0 <= v <= 999_999 for k, v in kwargs.items()):
            raise UserInputError(f"zoo model {str(arch['zoo'])[:40]!r}: kwargs must be a non-empty object of integer "
                                 "options 0..999999 (e.g. {'width': 16}), or left out")
        return {"zoo": arch["zoo"], **({"kwargs": dict(kwargs)} if kwargs else {})}
    if "factory" in keys and keys <= {"factory", "kwargs"}:
        spec = arch["factory"]
        if not isinstance(spec, str) or not _FACTORY.fullmatch(spec):
            raise UserInputError(f"model factory {str(spec)[:80]!r} must look like 'package.module:function'")
        kwargs = arch.get("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise UserInputError(f"model factory {spec!r}: kwargs must be an object")
        for name, value in kwargs.items():
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise UserInputError(f"model factory {spec!r}: kwarg names must be identifiers not starting with '_'")
            if not (value is None or isinstance(value, (str, bool, int))
                    or (isinstance(value, float) and math.isfinite(value))):
                raise UserInputError(f"model factory {spec!r}: kwarg {name!r} is not a plain JSON scalar "
                                     "(string, number, boolean or null)")
        return {"factory": spec, **({"kwargs": dict(kwargs)} if "kwargs" in keys else {})}
    raise UserInputError("arch must be exactly {'zoo': name} or {'factory': 'pkg.module:function', 'kwargs': {...}}")


def _allow_list(allowed_factories: Iterable[str]) -> AbstractSet[str]:
    if isinstance(allowed_factories, (str, bytes)):  # frozenset("a:b") would allow single letters
        raise TypeError("allowed_factories is a set of 'package.module:function' strings, not one string")
    return frozenset(allowed_factories)


def _require_allowed(arch: Mapping[str, Any], allowed: AbstractSet[str]) -> None:
    """Zoo architectures pass; a factory only if the caller's allow-list names it exactly."""
    if "factory" in arch and arch["factory"] not in allowed:
        raise UserInputError(f"model factory {str(arch['factory'])[:80]!r} is not allowed by this enclave's "
                             "configuration (only zoo architectures are, unless the operator allows the factory "
                             "by name)")


def build_arch(arch: Mapping[str, Any], input_shape=None, num_classes: int | None = None,
               allowed_factories: Iterable[str] = frozenset()) -> LayeredModel:
    """Rebuild a model's architecture (random weights) from a manifest's `arch`.

    `{"zoo": name}` builds a zoo model (always allowed). `{"factory": "pkg.module:function",
    "kwargs": {...}}` imports and calls that function only if the exact string is in
    `allowed_factories`, which the CALLER fixes from configuration it trusts (the owner's own
    command line; the enclave's measured configuration), never from the manifest. The function
    returns a `LayeredModel`, an `nn.Sequential` or list of blocks (wrapped with the given shapes),
    or any `nn.Module`, cut into stages from its traced graph exactly as on the owner's machine.
    `UserInputError` for anything else; a factory that is not allowed is refused before any import.
    """
    arch = check_arch(arch)
    allowed = _allow_list(allowed_factories)
    if "zoo" in arch:
        from . import zoo

        build = zoo.entry(arch["zoo"]).build
        try:
            if arch.get("kwargs"):  # options come from whoever signed the manifest: size them first
                import torch

                with torch.device("meta"):  # shapes only, no memory
                    size = sum(p.numel() for p in build(**arch["kwargs"]).parameters())
                if size > MAX_ZOO_PARAMS:
                    raise UserInputError(f"zoo model {arch['zoo']} with {arch['kwargs']} would have {size:,} parameters; "
                                         f"at most {MAX_ZOO_PARAMS:,} are built from a manifest's options")
            model = build(**arch.get("kwargs", {}))
        except TypeError as e:
            raise UserInputError(f"zoo model {arch['zoo']!r} does not take those options ({e})") from None
    else:
        _require_allowed(arch, allowed)
        spec = arch["factory"]
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UserInputError(f"model factory {spec!r} cannot be imported ({type(e).__name__})") from None
        try:
            model = fn(**arch.get("kwargs", {}))
        except Exception as e:  # an allowed factory, but called with kwargs it does not take, or failing
            raise UserInputError(f"model factory {spec!r} failed ({type(e).__name__})") from None
        if not isinstance(model, LayeredModel):
            if input_shape is None or num_classes is None or not (isinstance(model, nn.Module) or (
                    isinstance(model, (list, tuple)) and all(isinstance(b, nn.Module) for b in model))):
                raise UserInputError(f"model factory {spec!r} did not return an nn.Module or a list of blocks")
            from .graph import as_layered  # any nn.Module: the same deterministic graph cut as the owner's

            model = as_layered(model, tuple(input_shape), int(num_classes))
    return model.eval()


# ---------------------------------------------------------------------------- owner side

def make_bundle(model: LayeredModel, k: int, out_dir: "str | os.PathLike[str]", arch: dict,
                preprocessing: Preprocessing, classes: list[str], owner_key: SigningKey,
                name: str | None = None, model_key: bytes | None = None,
                head: int = 0) -> tuple[BundleManifest, bytes]:
    """Split `model` at `k` and write a bundle to `out_dir` (which must not exist yet, or be empty).

    With `head` = N > 0 the last N layers (the classifier head) are sealed too and run in the
    enclave after the BackNet, so the host never sees class scores (worth it when the head was
    trained on private data; a fully public model is matched against its public weights anyway).
    Returns `(manifest, model_key)`. Keep the model key on the owner's machine; it leaves only
    sealed to an attested enclave (`crypto.seal_key_release`). All checks run before anything is
    written, and the directory appears atomically (written beside it, then renamed).
    """
    out = Path(out_dir)
    arch = check_arch(arch)  # a bundle whose arch no reader would accept is refused here, early
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out}: already exists and is not an empty directory")
    from .split import check_split

    class_keys = check_split(model, k, head).keys  # the one rule of bundles and CalTrain
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
        front, back, head_net = _split3(model, k, len(model) - head)  # models/split.py
        mapping = ClassMapping.random(model.num_classes, classes)
        last_state = layer_state_dict(head_net if head else back)  # the part holding the classifier
        for row_key in class_keys:
            last_state[row_key] = mapping.permute_rows(last_state[row_key]).contiguous()
        front_bytes = st_save(layer_state_dict(front), metadata={"part": "frontnet", "k": str(k)})
        back_bytes = st_save(last_state if not head else layer_state_dict(back), metadata={"part": "backnet", "k": str(k)})
        head_bytes = st_save(last_state, metadata={"part": "head", "n": str(head)}) if head else b""
    finally:
        model.train(was_training)

    owner_pub = owner_key.public_key()
    manifest = BundleManifest(
        format=FORMAT, bundle_id=secrets.token_hex(16), name=name or str(arch.get("zoo") or arch.get("factory")),
        arch=dict(arch), k=k, layers=model.names, input_shape=tuple(model.input_shape), ir_shape=tuple(ir_shape),
        preprocessing=preprocessing, num_classes=model.num_classes, owner=owner_pub.to_bytes().hex(), parts={},
        head=head)
    files = {
        BACKNET: back_bytes,
        FRONTNET: seal(key, front_bytes, aad=manifest.part_aad(FRONTNET)),
        CLASSMAP: seal(key, mapping.to_bytes(), aad=manifest.part_aad(CLASSMAP)),
    }
    if head:
        files[HEAD] = seal(key, head_bytes, aad=manifest.part_aad(HEAD))
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
                       expected_owner: VerifyKey | None = None,
                       allowed_factories: Iterable[str] = frozenset()) -> tuple[BundleManifest, BackNet]:
    """Host side: verify the manifest and load the BackNet (scores come out in the secret order).

    Zoo architectures only, unless `allowed_factories` (the server's configuration, never the
    upload) names the manifest's factory; see `build_arch`.
    """
    manifest = load_manifest(bundle, expected_owner)
    data = _read_files(bundle, (BACKNET,))[BACKNET]
    _check_part(manifest, BACKNET, data)
    model = build_arch(manifest.arch, manifest.input_shape, manifest.num_classes, allowed_factories)
    _check_arch(model, manifest)
    _, back, _ = _split3(model, manifest.k, manifest.back_stop)
    _load_state(back, data, BACKNET)
    return manifest, back.eval()


def _split3(model: LayeredModel, k: int, stop: int) -> tuple[FrontNet, BackNet, "nn.Sequential | None"]:
    """FrontNet layers[:k], BackNet layers[k:stop], head layers[stop:] (None when stop is the end)."""
    from .split import split_model

    parts = split_model(model, k, len(model) - stop)
    return parts.front, parts.back, parts.head


@dataclass(frozen=True)
class EnclaveParts:
    """What only the enclave may hold of a bundle: FrontNet, class mapping and, if any, the head."""

    front: FrontNet
    mapping: ClassMapping
    head: "nn.Sequential | None" = None
    #: Shape of one BackNet output (the head's input), without the batch dimension.
    head_in_shape: tuple[int, ...] = ()
    #: The BackNet, when asked for (`with_backnet`): its weights checked against the signed manifest.
    back: "BackNet | None" = None

    def __iter__(self):  # `front, mapping = open_enclave_parts(...)` for a bundle without a head
        return iter((self.front, self.mapping))

    def __getitem__(self, i: int):
        return (self.front, self.mapping)[i]


def _check_arch(model: LayeredModel, manifest: BundleManifest) -> None:
    if model.names != manifest.layers or model.num_classes != manifest.num_classes:
        raise TamperedMessage("the rebuilt architecture does not match the manifest's layers")


def open_enclave_parts(bundle: "str | os.PathLike[str] | Mapping[str, bytes]", model_key: bytes,
                       expected_owner: VerifyKey | None = None,
                       allowed_factories: Iterable[str] = frozenset(), with_backnet: bool = False) -> EnclaveParts:
    """Enclave side: decrypt and load the FrontNet and the class mapping (and with `with_backnet`
    the BackNet, for passes the enclave runs whole: `serve/placement.py`).

    `bundle` is a directory or a mapping of file name -> bytes (what the host hands the enclave).
    Pass `expected_owner` = the key-release signer so that only that owner's bundle is accepted.
    Zoo architectures only, unless `allowed_factories` (fixed in the enclave's measured
    configuration) names the manifest's factory; the allow-list is checked before anything is
    decrypted, and the architecture is built only after every part authenticates (the BackNet's
    weights by their SHA-256 in the owner-signed manifest: TamperedMessage for any other bytes).
    """
    files = _read_files(bundle, (MANIFEST, SIGNATURE))
    manifest = BundleManifest.verify(files[MANIFEST], files[SIGNATURE], expected_owner)
    secret_parts = (FRONTNET, CLASSMAP) + ((HEAD,) if manifest.head else ())
    checked = secret_parts + ((BACKNET,) if with_backnet else ())
    files.update(_read_files(bundle, checked))
    allowed = _allow_list(allowed_factories)
    _require_allowed(manifest.arch, allowed)  # before any decryption or import
    for part in checked:
        _check_part(manifest, part, files[part])
    front_bytes = open_sealed(model_key, files[FRONTNET], aad=manifest.part_aad(FRONTNET))
    mapping = ClassMapping.from_bytes(open_sealed(model_key, files[CLASSMAP], aad=manifest.part_aad(CLASSMAP)))
    if mapping.num_classes != manifest.num_classes:
        raise TamperedMessage("class mapping size does not match the manifest")
    head_bytes = open_sealed(model_key, files[HEAD], aad=manifest.part_aad(HEAD)) if manifest.head else b""
    model = build_arch(manifest.arch, manifest.input_shape, manifest.num_classes, allowed)
    _check_arch(model, manifest)
    front, back, head = _split3(model, manifest.k, manifest.back_stop)
    _load_state(front, front_bytes, FRONTNET)
    if with_backnet:
        _load_state(back, files[BACKNET], BACKNET)
    back = back.eval() if with_backnet else None
    if head is None:
        return EnclaveParts(front.eval(), mapping, back=back)
    _load_state(head, head_bytes, HEAD)
    head_in = model.partition_points()[manifest.back_stop - 1].out_shape
    return EnclaveParts(front.eval(), mapping, head.eval(), tuple(head_in), back=back)


def bundle_files(bundle: "str | os.PathLike[str]") -> dict[str, bytes]:
    """All files of a bundle directory as bytes (what a host forwards to its enclave)."""
    files = _read_files(bundle, (MANIFEST, SIGNATURE))
    manifest = BundleManifest.verify(files[MANIFEST], files[SIGNATURE])
    return {**files, **_read_files(bundle, manifest.part_names)}



# ---------------------------------------------------------------------------- the owner's model key file

def model_key_path(bundle_dir: "str | os.PathLike[str]") -> Path:
    """Where `partition` keeps a bundle's model key: `BUNDLE.modelkey`, beside (not inside) the bundle."""
    p = Path(bundle_dir)
    return p.with_name(p.name + ".modelkey")


def save_model_key(path: "str | os.PathLike[str]", key: bytes) -> None:
    """Write a model key as hex, mode 0600, refusing to overwrite an existing key."""
    if len(key) != 32:
        raise UserInputError("a model key is 32 bytes")
    write_private(path, bytes(key).hex().encode() + b"\n", overwrite=False, what="model key")


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
