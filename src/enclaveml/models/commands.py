"""`enclaveml zoo` and `enclaveml partition`: list models, and split one into a bundle (owner side).

`partition` runs on the model owner's machine. It writes a bundle directory (a signed manifest, the
plain BackNet, the sealed FrontNet and class mapping) and the model key in `BUNDLE.modelkey`
beside it (mode 0600). The model key never leaves the owner's machine except sealed to an
attested enclave (`enclaveml deploy`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import keyfiles
from ..errors import UserInputError


def _partition_point(at: Optional[int], assessment: Optional[Path], model_name: str, force: bool) -> int:
    """K from --at, or the assessment's `recommended` point; never shallower than it unless forced
    (the rule lives in `choose.partition_point`, shared with the Python API)."""
    from .choose import CLI_ARGS, partition_point, read_assessment, recommended_point

    recommended = None
    if assessment is not None:
        recommended = recommended_point(read_assessment(assessment), model_name, str(assessment))
    return partition_point(at, recommended, assessed=assessment is not None, force=force,
                           source=str(assessment), names=CLI_ARGS)


def _model_arg(model: Optional[str], onnx: Optional[Path]) -> str:
    """MODEL, or the --onnx file (the one way to name a model that is not Python)."""
    if onnx is not None:
        if model is not None:
            raise UserInputError("give either MODEL or --onnx FILE, not both")
        return str(onnx)
    if model is None:
        raise UserInputError("name the model: a zoo name, 'package.module:factory', or --onnx FILE")
    return model


def _is_onnx(model: str) -> bool:
    return model.lower().endswith(".onnx")


def _load_model(model: str, weights: Optional[Path], untrained: bool, classes: Optional[str],
                input_size: Optional[str], mean: Optional[str], std: Optional[str], card: Optional[Path] = None):
    """(LayeredModel, arch dict, Preprocessing, class names) for a zoo name, a `module:factory` or an .onnx file.

    For an .onnx file the arch dict is completed by `_onnx_architecture` once the bundle path is known."""
    from .loading import load_model, parse_floats
    from .spec import ModelSpec

    spec = None if _is_onnx(model) else ModelSpec.parse(model)  # the one model specification
    if spec is not None and spec.is_factory and weights is None:
        raise UserInputError(f"user model {model!r} needs --weights FILE (.safetensors or a .pt state dict)")
    m, pre, names = load_model(model, str(weights) if weights else None, input_size, parse_floats(mean, "--mean"),
                               parse_floats(std, "--std"), resize=True, pretrained=not untrained,
                               card=str(card) if card else None)
    arch = {} if spec is None else spec.arch
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
    if names is None:
        names = [str(i) for i in range(m.num_classes)]
    if len(names) != m.num_classes:
        raise UserInputError(f"{len(names)} class names given for a model with {m.num_classes} classes")
    return m, arch, pre, names


def _warn_if_public(m, head: int) -> None:
    """Say so when the classifier's weights are published: the class mapping then hides nothing."""
    from .head import find_classifier
    from .public_weights import classifier_is_public

    classifier = list(m.layers.children())[find_classifier(m).layer]
    if classifier_is_public(classifier):
        where = ("it runs in the enclave (--head), but the FrontNet and BackNet still hold public tensors"
                 if head else "a host holding the BackNet recovers the secret class order by matching its final "
                 "rows against them; use --head N and a head trained on private data")
        typer.echo(f"warning: this model's weights are the zoo's published ones: {where} (docs/tee.md, "
                   "'What the class mapping hides')", err=True)


def _onnx_architecture(onnx_file: str, m, out: Path) -> tuple[dict, Path, bytes]:
    """The stripped architecture file beside the bundle (`BUNDLE.arch.onnx`) and the arch naming it."""
    import hashlib

    from .onnx_in import FACTORY, strip_weights

    stripped = strip_weights(onnx_file, m)
    path = out.with_name(out.name + ".arch.onnx").resolve()
    if path.exists():
        raise UserInputError(f"{path}: already exists; choose a new bundle directory")
    return {"factory": FACTORY, "kwargs": {"path": str(path), "sha256": hashlib.sha256(stripped).hexdigest()}}, path, stripped


def _default_name(model: str, out: Path) -> str:
    """The zoo name, or the bundle directory's name made URL-safe (it is the default model id)."""
    if not _is_onnx(model) and (":" not in model or "=" in model.split(":")[1]):  # a zoo name (with options)
        return model.split(":")[0]
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in out.resolve().name)
    return safe.lstrip(".")[:64] or "model"


def register(app: typer.Typer) -> None:
    @app.command("zoo")
    def zoo_cmd() -> None:
        """List the zoo models, their partition points and measured test accuracy."""
        from rich.console import Console
        from rich.table import Table

        from . import zoo

        t = Table(title="enclaveml model zoo (CIFAR-10)")
        for col in ("name", "layers", "params", "test accuracy", "description"):
            t.add_column(col)
        for name, e in zoo.ZOO.items():
            m = e.build()
            card = e.card()
            acc = f"{card['test_accuracy']:.2%}" if "test_accuracy" in card else "not trained"
            t.add_row(name, str(len(m)), f"{sum(p.numel() for p in m.parameters()):,}", acc, e.description)
        Console().print(t)

    @app.command("partition")
    def partition_cmd(
        model: Optional[str] = typer.Argument(None, help="Zoo model name, or 'package.module:factory' with --weights."),
        onnx: Optional[Path] = typer.Option(None, "--onnx", help="An .onnx model instead of MODEL (weights inside; "
                                                                  "its weight-free architecture goes to BUNDLE.arch.onnx)."),
        card: Optional[Path] = typer.Option(None, "--card", help="Model card JSON (default: model.json beside the weights or .onnx)."),
        out: Path = typer.Option(..., "--out", help="Bundle directory to create (must not exist)."),
        at: Optional[int] = typer.Option(None, "--at", help="Partition point K: layers 0..K-1 run in the enclave."),
        assessment: Optional[Path] = typer.Option(None, "--assessment", help="assessment.json; K defaults to its 'recommended'."),
        owner_key: Optional[Path] = typer.Option(None, "--owner-key", help="Owner's Ed25519 key (default ENCLAVEML_HOME/owner.key, created on first use)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors weights of a user model."),
        classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names (user models)."),
        input_size: Optional[str] = typer.Option(None, "--input-size", help="CxHxW of a user model, e.g. 3x224x224."),
        mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel normalisation mean, e.g. 0.485,0.456,0.406."),
        std: Optional[str] = typer.Option(None, "--std", help="Per-channel normalisation std."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in the manifest (default: the zoo name, else the bundle directory's name)."),
        force: bool = typer.Option(False, "--force", help="Allow a K shallower than the assessment recommends."),
        head: int = typer.Option(0, "--head", help="Also run the last N layers (the classifier head) in the enclave, "
                                 "so the host never sees class scores (for a head trained on private data)."),
        untrained: bool = typer.Option(False, "--untrained", help="Zoo model with random weights (tests and demos only)."),
    ) -> None:
        """Split a model at K into a deployable bundle; the model key is written to BUNDLE.modelkey (0600)."""
        import torch

        from .. import paths
        from .bundle import make_bundle, model_key_path, save_model_key

        torch.set_num_threads(min(2, torch.get_num_threads()))
        key_path = model_key_path(out)
        if out.exists():
            raise UserInputError(f"{out}: already exists; choose a new bundle directory")
        if key_path.exists():
            raise UserInputError(f"{key_path}: a model key is already there; refusing to overwrite it")
        model = _model_arg(model, onnx)
        k = _partition_point(at, assessment, model, force)
        m, arch, pre, names = _load_model(model, weights, untrained, classes, input_size, mean, std, card)
        m.check_point(k)
        arch_file = None
        if _is_onnx(model):
            arch, arch_file, stripped = _onnx_architecture(model, m, out)
        owner = keyfiles.load_or_create_signing_key(owner_key or paths.home() / "owner.key")
        _warn_if_public(m, head)
        manifest, model_key = make_bundle(m, k, out, arch, pre, names, owner, name=name or _default_name(model, out),
                                          head=head)
        try:
            save_model_key(key_path, model_key)
            if arch_file is not None:
                arch_file.write_bytes(stripped)
        except BaseException:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            raise
        front_params = sum(p.numel() for p in m.split(k)[0].parameters())
        typer.echo(f"bundle     {out}")
        typer.echo(f"model      {manifest.name}  ({len(manifest.layers)} layers, {manifest.num_classes} classes)")
        typer.echo(f"split      k={k}: enclave runs {', '.join(manifest.frontnet_layers)} "
                   f"({front_params:,} params); host runs {', '.join(manifest.layers[k:manifest.back_stop])}")
        if head:
            typer.echo(f"head       enclave also runs {', '.join(manifest.layers[manifest.back_stop:])} "
                       "(the host never sees class scores)")
        typer.echo(f"IR shape   {list(manifest.ir_shape)}")
        typer.echo(f"owner      {owner.public_key().fingerprint()}")
        typer.echo(f"model key  {key_path} (0600; keep it here: it leaves this machine only sealed to an attested enclave)")
        if arch_file is not None:
            typer.echo(f"arch       {arch_file} (the graph without its weights; a server needs it at this path "
                       f"and --allow-factory {arch['factory']})")

    @app.command("inspect")
    def inspect_cmd(
        bundle: Path = typer.Argument(..., help="Bundle directory written by `enclaveml partition`."),
        owner: Optional[str] = typer.Option(None, "--owner", help="Expected owner key fingerprint (hex, a prefix of 16+ digits is enough)."),
    ) -> None:
        """Verify a bundle's signature and part hashes and print what the host may know of it."""
        import hmac as _hmac

        from ..crypto import sha256
        from ..errors import TamperedMessage
        from .bundle import load_manifest

        manifest = load_manifest(bundle)
        fp = manifest.owner_key.fingerprint()
        if owner is not None:
            want = owner.strip().lower()
            if len(want) < 16 or not _hmac.compare_digest(fp[: len(want)], want):
                raise TamperedMessage(f"{bundle}: signed by owner {fp[:16]}..., not the expected {want[:16]}...")
        for part in manifest.part_names:
            try:
                data = (bundle / part).read_bytes()
            except OSError as e:
                raise UserInputError(f"{bundle / part}: cannot read ({e.strerror})") from None
            if not _hmac.compare_digest(sha256(data).hex(), manifest.parts[part]):
                raise TamperedMessage(f"{bundle / part} does not match the signed manifest")
        typer.echo(f"bundle     {bundle} (signature and {len(manifest.part_names)} part hashes verified)")
        typer.echo(f"model      {manifest.name}  arch {json.dumps(manifest.arch)}  id {manifest.bundle_id}")
        typer.echo(f"split      k={manifest.k}: enclave {', '.join(manifest.frontnet_layers)}; host {', '.join(manifest.layers[manifest.k:])}")
        typer.echo(f"shapes     input {list(manifest.input_shape)}  IR {list(manifest.ir_shape)}  classes {manifest.num_classes}")
        typer.echo(f"owner      {fp}")
