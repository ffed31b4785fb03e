"""`enclaveml attest ...`: check evidence by hand, pin the sim enclave (client/owner side).

    enclaveml attest verify EVIDENCE [--collateral FILE]... [--policy FILE] [--report-data HEX] [--now ISO8601] [--json]
    enclaveml attest policy --tee sim [--config JSON] [--allow-factory PKG.MOD:FN]... [--card model.json] [--model BUNDLE]... [--min-k K] [--out FILE]
    enclaveml attest pin BUNDLE... --policy FILE [--min-k K] [--any-bundle] [--name NAME] [--replace] [--only]
    enclaveml attest measure --tee sim [--config JSON] [--allow-factory PKG.MOD:FN]... [--card model.json]
    enclaveml attest evidence --tee sim --report-data HEX [--config JSON] [--out FILE]
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..errors import EnclaveMLError, UserInputError

if TYPE_CHECKING:
    from .policy import Policy

attest_app = typer.Typer(help="Verify TEE evidence and write attestation policies.", no_args_is_help=True)


def _config(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        cfg = json.loads(text)
    except (OSError, ValueError) as e:
        raise UserInputError(f"--config is not a JSON object or @file: {e}") from None
    if not isinstance(cfg, dict):
        raise UserInputError("--config must be a JSON object")
    return cfg


def _enclave_config(text: str | None, allow_factory: list[str] | None, card: Path | None) -> dict[str, Any]:
    """--config, plus the allowed factories exactly as `serve --allow-factory` puts them in the
    enclave's measured configuration (so the policy's measurement matches the running server)."""
    cfg = _config(text)
    names = list(allow_factory or ())
    if card is not None:
        from ..models.card import read_card

        c = read_card(card)
        if c.factory is None:
            raise UserInputError(f"{card}: the model card names no factory")
        names.append(c.factory)
    if names:
        if "allowed_factories" in cfg:
            raise UserInputError("give the allowed factories with --allow-factory/--card or in --config, not both")
        from ..models.servable import enclave_config  # the one definition the server's worker uses

        cfg = {**cfg, **enclave_config(names)}
    return cfg


def _now(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserInputError(f"--now {text!r} is not ISO 8601 (e.g. 2025-07-04T00:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


_ALLOW_FACTORY_HELP = "the enclave serves with `serve --allow-factory` this factory (repeatable; measured)"


def _hex(name: str, text: str | None, size: int | None = None) -> bytes | None:
    if text is None:
        return None
    try:
        b = bytes.fromhex(text)
    except ValueError:
        raise UserInputError(f"{name} is not hex") from None
    if size is not None and len(b) != size:
        raise UserInputError(f"{name} must be {size} bytes ({2 * size} hex digits), got {len(b)}")
    return b


def _require_sim(tee: str) -> None:
    if tee != "sim":
        raise UserInputError(f"--tee {tee}: only sim can be measured locally; hardware measurements come from the build (see docs/tee.md)")


def _print_claims(claims, verdict: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"attestation evidence: {verdict}", show_header=False)
    t.add_row("type", claims.backend)
    t.add_row("measurement", claims.measurement)
    t.add_row("report data", claims.report_data.hex())
    t.add_row("TCB status", claims.tcb_status)
    t.add_row("advisories", ", ".join(claims.advisories) or "-")
    t.add_row("timestamp", claims.timestamp.isoformat() if claims.timestamp else "- (freshness comes from the report data)")
    for k in ("mr_signer", "isv_svn", "tee_tcb_svn", "fmspc", "policy", "debug", "reported_tcb", "platform_key", "product"):
        if k in claims.details:
            t.add_row(k, str(claims.details[k]))
    Console(width=200).print(t)


def _with_clock_hint(e: EnclaveMLError, ev, now: str | None) -> EnclaveMLError:
    """Collateral expires: when the wall clock was used, say when the given collateral is valid."""
    from ..errors import EvidenceRejected

    if now is not None or not isinstance(e, EvidenceRejected) or ev is None or ev.backend not in ("sgx", "tdx") or not ev.collateral:
        return e
    from .collateral import collateral_validity

    try:
        start, end = collateral_validity(ev.collateral)
    except UserInputError:
        return e
    t = datetime.now(timezone.utc)
    if start <= t <= end:
        return e
    return EvidenceRejected(f"{e} (the collateral is valid {start.isoformat()} .. {end.isoformat()}; "
                            "fetch fresh collateral or pin the clock with --now)")


@attest_app.command("verify")
def verify_cmd(
    evidence: Path = typer.Argument(..., help="Evidence JSON, or a raw SGX/TDX quote, SEV-SNP report or sim quote."),
    collateral: Optional[list[Path]] = typer.Option(None, "--collateral", help="dcap-qvl collateral JSON (SGX/TDX) or certificates (SEV-SNP VCEK, ASK/ARK chain; repeat)."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Policy TOML; without it only signatures and chain are checked."),
    type_: Optional[str] = typer.Option(None, "--type", help="Evidence type of a raw file: sgx, tdx, sev-snp or sim (default: detected)."),
    report_data: Optional[str] = typer.Option(None, "--report-data", help="Expected 64-byte report data, hex."),
    now: Optional[str] = typer.Option(None, "--now", help="Pin the clock (ISO 8601), e.g. inside the collateral's validity."),
    fetch_collateral: Optional[str] = typer.Option(None, "--fetch-collateral", help="Fetch SGX/TDX collateral from this PCCS URL (or 'intel')."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: the claims, or the reason for refusal."),
) -> None:
    """Verify evidence and print its claims (type, measurement, report data, TCB status) or why it is refused."""
    from . import load_policy, verify_claims_only, verify_evidence
    from .evidence import Evidence
    from .evidence_files import load_evidence

    try:
        ev = load_evidence(evidence, type_, list(collateral or []))
        if fetch_collateral and ev.backend in ("sgx", "tdx"):
            from .collateral import fetch_collateral as fetch

            ev = Evidence(ev.backend, ev.quote, fetch(ev.quote, None if fetch_collateral == "intel" else fetch_collateral))
        when = _now(now)
        expected = _hex("--report-data", report_data, 64)
        if policy is not None:
            claims = verify_evidence(ev, load_policy(policy), expected, when)
            verdict = f"ACCEPTED by policy {policy}"
        else:
            claims = verify_claims_only(ev, when)
            if expected is not None:
                from . import rules

                rules.report_data(claims, expected)
            verdict = "GENUINE (no policy given: measurement and TCB status not judged)"
    except EnclaveMLError as e:
        e = _with_clock_hint(e, locals().get("ev"), now)
        if as_json:
            print(json.dumps({"verified": False, "error": type(e).__name__, "reason": str(e)}))
            raise typer.Exit(2)
        raise e from None
    if as_json:
        print(json.dumps({"verified": True, "policy": str(policy) if policy else None, "claims": claims.to_dict()}, indent=2))
    else:
        _print_claims(claims, verdict)


@attest_app.command("measure")
def measure_cmd(
    tee: str = typer.Option("sim", "--tee", help="Backend (sim)."),
    config: Optional[str] = typer.Option(None, "--config", help="Enclave configuration as JSON or @file."),
    allow_factory: Optional[list[str]] = typer.Option(None, "--allow-factory", help=_ALLOW_FACTORY_HELP),
    card: Optional[Path] = typer.Option(None, "--card", help="Model card whose factory the server allows (as `serve --card`)."),
) -> None:
    """Print the expected measurement of this installed enclaveml for the sim backend."""
    _require_sim(tee)
    from .sim import expected_sim_measurement

    print(expected_sim_measurement(_enclave_config(config, allow_factory, card)))


def _pin_bundles(policy: "Policy", bundles: list[Path], min_k: Optional[int], any_bundle: bool, name: Optional[str],
                 replace: bool = False, only: bool = False) -> "Policy":
    """The policy with a pin per bundle: its owner, its bundle id (added to that owner's pin of the
    same name) and, as the smallest k, the bundle's own k unless `--min-k` loosens it.

    A bundle signed by another key than the one a name is pinned to is refused unless `replace`:
    the signer is whoever made the bundle (a co-tenant's bundle of the same name, say), and a
    silent swap would make every client of this policy accept only that key's deployment (F-28).
    With `only`, each name's pin becomes exactly the bundles given now (older ids and their smaller
    k retired): the host keeps every sealed deployment it ever stored and may restore any (F-29)."""
    from ..models.bundle import load_manifest
    from ..protocol.identity import ModelPin

    if name is not None and len(bundles) != 1:
        raise UserInputError("--name goes with exactly one bundle")
    fresh: set[str] = set()  # names pinned anew in this call (with `only`)
    for b in bundles:
        m = load_manifest(b)
        model = name or m.name
        old = policy.models.get(model)
        if old is not None and old["owner"] != m.owner and not replace:
            raise UserInputError(f"{b}: model {model!r} is pinned to owner {old['owner'][:16]}..., but this bundle "
                                 f"is signed by {m.owner[:16]}...; pass --replace to pin the new owner instead")
        ids: tuple[str, ...] = () if any_bundle else (m.bundle_id,)
        k = m.k if min_k is None else min_k
        if only and model not in fresh:  # the first bundle of this name now: forget the older ones
            old = None
            fresh.add(model)
        if old is not None and old["owner"] == m.owner:  # another bundle of the same owner's model
            ids = () if any_bundle or not old["bundle_ids"] else (*old["bundle_ids"], *ids)
            k = min(k, old["min_k"]) if min_k is None else min_k
        policy = policy.with_pin(model, ModelPin(m.owner, ids, k))
        print(f"pinned {model}: owner {m.owner[:16]}..., bundle {'any' if not ids else ', '.join(ids)}, k >= {k}",
              file=sys.stderr)
    return policy


@attest_app.command("policy")
def policy_cmd(
    tee: str = typer.Option("sim", "--tee", help="Backend (sim)."),
    config: Optional[str] = typer.Option(None, "--config", help="Enclave configuration as JSON or @file."),
    allow_factory: Optional[list[str]] = typer.Option(None, "--allow-factory", help=_ALLOW_FACTORY_HELP),
    max_age_s: int = typer.Option(300, "--max-age-s", help="Oldest evidence accepted, seconds."),
    model: Optional[list[Path]] = typer.Option(None, "--model", help="Pin this bundle's model (owner key, bundle id, "
                                               "smallest k); repeat for several models."),
    min_k: Optional[int] = typer.Option(None, "--min-k", help="Accept splits from K on (default: each bundle's own k)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write here (default: print)."),
    card: Optional[Path] = typer.Option(None, "--card", help="Model card whose factory the server allows (as `serve --card`)."),
    suite: Optional[str] = typer.Option(None, "--suite", help="HPKE suite of requests and key releases: x25519 "
                                        "(default, native), x25519-pyhpke (the original format, for older "
                                        "enclaves), mlkem768-x25519 (post-quantum hybrid); docs/crypto.md."),
) -> None:
    """Write a policy pinning the local sim platform key and this code's sim measurement, and the
    models (`--model BUNDLE`) a client may use."""
    _require_sim(tee)
    from dataclasses import replace

    from .policy import write_policy
    from .sim import sim_policy

    p = _pin_bundles(sim_policy(_enclave_config(config, allow_factory, card), max_age_s=max_age_s), list(model or []),
                     min_k, False, None)
    if suite is not None:
        p = replace(p, crypto={"suite": suite})  # UserInputError for an unknown suite
    if out is None:
        sys.stdout.write(p.to_toml())
    else:
        write_policy(p, out)
        print(f"wrote {out}")


@attest_app.command("pin")
def pin_cmd(
    bundles: list[Path] = typer.Argument(..., help="Bundle directories whose models to pin."),
    policy: Path = typer.Option(..., "--policy", help="The policy file to update (any backend)."),
    min_k: Optional[int] = typer.Option(None, "--min-k", help="Accept splits from K on (default: the bundle's own k)."),
    any_bundle: bool = typer.Option(False, "--any-bundle", help="Accept any bundle of that owner (not just this one)."),
    name: Optional[str] = typer.Option(None, "--name", help="The model name clients use (default: the bundle's name; "
                                       "as given to `deploy --model`)."),
    replace: bool = typer.Option(False, "--replace", help="Let a bundle of another owner replace the existing pin "
                                 "of its name (refused otherwise)."),
    only: bool = typer.Option(False, "--only", help="Accept exactly these bundles from now on: drop the bundle ids "
                              "pinned before (retire a superseded or shallower bundle)."),
) -> None:
    """Pin models in an existing policy: a client then uses a model only when the attested enclave
    reports it deployed by that owner, as one of those bundles, split no shallower than that."""
    from .policy import load_policy, write_policy

    write_policy(_pin_bundles(load_policy(policy), list(bundles), min_k, any_bundle, name, replace, only), policy)
    print(f"wrote {policy}")


@attest_app.command("evidence")
def evidence_cmd(
    report_data: str = typer.Option(..., "--report-data", help="64 bytes of report data, hex."),
    tee: str = typer.Option("sim", "--tee", help="Backend (sim)."),
    config: Optional[str] = typer.Option(None, "--config", help="Enclave configuration as JSON or @file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the Evidence JSON here (default: print)."),
) -> None:
    """Produce sim evidence for given report data (for trying `attest verify`; uses the local platform key)."""
    _require_sim(tee)
    from . import get_backend

    ev = get_backend("sim", config=_config(config)).evidence(_hex("--report-data", report_data, 64))
    text = json.dumps(ev.to_dict(), indent=2)
    if out is None:
        print(text)
    else:
        out.write_text(text + "\n")
        print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(attest_app, name="attest")
