"""`enclaveml deploy`, `infer`, `undeploy`: the owner's and client's commands (client side).

Each verifies the enclave's evidence against the given policy before sending anything secret.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def _owner_key(path: Optional[Path]):
    from .. import keyfiles, paths

    return keyfiles.load_signing_key(path or paths.home() / "owner.key")


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    def deploy_cmd(
        bundle: Path = typer.Argument(..., help="Bundle directory written by `enclaveml partition`."),
        url: str = typer.Option(..., "--url", help="Server URL, e.g. http://127.0.0.1:8080"),
        policy: Path = typer.Option(..., "--policy", help="Attestation policy (TOML) the enclave must satisfy."),
        model: Optional[str] = typer.Option(None, "--model", help="Model id on the server (default: the bundle's name)."),
        model_key: Optional[Path] = typer.Option(None, "--model-key", help="Model key file (default BUNDLE.modelkey)."),
        owner_key: Optional[Path] = typer.Option(None, "--owner-key", help="Owner's Ed25519 key (default ENCLAVEML_HOME/owner.key)."),
    ) -> None:
        """Verify the enclave, release the model key to it (sealed, signed), upload the bundle."""
        from ..models.bundle import load_model_key, model_key_path
        from .sdk import EnclaveClient

        key = load_model_key(model_key or model_key_path(bundle))
        with EnclaveClient(url, policy) as c:
            res = c.deploy(bundle, key, _owner_key(owner_key), model_id=model)
        verb = "replaced" if res.get("replaced") else "deployed"
        owner = str(res.get("owner", ""))
        head = f", head={res['head']}" if res.get("head") else ""
        typer.echo(f"{verb} {res.get('name', res['model'])} (owner {owner[:16]}..., bundle {res['bundle_id']}, "
                   f"k={res['k']}{head}) on {_where(res, url)}")

    @app.command("infer")
    def infer_cmd(
        images: List[Path] = typer.Argument(..., help="JPEG or PNG files."),
        url: str = typer.Option(..., "--url", help="Server URL."),
        policy: Path = typer.Option(..., "--policy", help="Attestation policy (TOML) the enclave must satisfy."),
        model: str = typer.Option("darknet", "--model", help="Deployed model name; the policy must pin it "
                                  "(owner, bundle ids, smallest k: `enclaveml attest pin`)."),
        top_k: int = typer.Option(5, "--top-k", help="How many labels to return per image."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per image."),
    ) -> None:
        """Encrypt each image to the attested enclave and print its top-k labels."""
        from ..data import load_image_bytes
        from .sdk import EnclaveClient

        data = [load_image_bytes(p) for p in images]
        with EnclaveClient(url, policy) as c:
            results = c.infer(data, model=model, top_k=top_k)
        for path, res in zip(images, results):
            if as_json:
                typer.echo(json.dumps({"image": str(path), "model": res["model"], "top": res["top"]}))
            else:
                tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in res["top"])
                typer.echo(f"{path}: {tops}")

    @app.command("undeploy")
    def undeploy_cmd(
        model: str = typer.Argument(..., help="Deployed model id."),
        url: str = typer.Option(..., "--url", help="Server URL."),
        policy: Path = typer.Option(..., "--policy", help="Attestation policy (TOML) the enclave must satisfy."),
        owner_key: Optional[Path] = typer.Option(None, "--owner-key", help="Owner's Ed25519 key (default ENCLAVEML_HOME/owner.key)."),
    ) -> None:
        """Delete a deployment (only its owner can)."""
        from .sdk import EnclaveClient

        with EnclaveClient(url, policy) as c:
            res = c.delete(model, _owner_key(owner_key))
        typer.echo(f"deleted {model} from {_where(res, url)}")


def _where(res: dict, url: str) -> str:
    """`url`, or how many replicas behind it an operation reached (`serve --replicas`)."""
    reps = res.get("replicas")
    return f"{len(reps)} replicas behind {url}" if isinstance(reps, list) else url
