"""The attestation policy: which verified evidence a client or owner accepts (client/owner side).

A small TOML file (read with `tomllib`, written by `write_policy`) that `infer`, `deploy` and
`train contribute` load before trusting an enclave. Every field fails closed: an evidence type
with no pinned measurement is refused, and the default TCB acceptance is `UpToDate` only. The
field reference with an example is in docs/tee.md.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..protocol.identity import ModelPin, check_name
from .evidence import EVIDENCE_TYPES

_HEX = re.compile(r"^[0-9a-f]*$")
SNP_TCB_FIELDS = ("bootloader", "tee", "snp", "microcode")

# Every TCB status dcap-qvl can report for SGX/TDX (Intel's tcbStatus values).
KNOWN_TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


def _hex_list(name: str, values: Any, length: int | None = None) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise UserInputError(f"policy field {name} must be a list of hex strings")
    out = []
    for v in values:
        if not isinstance(v, str) or not _HEX.match(v.lower()) or len(v) % 2:
            raise UserInputError(f"policy field {name}: {v!r} is not a hex string")
        if length is not None and len(v) != 2 * length:
            raise UserInputError(f"policy field {name}: {v!r} is not {length} bytes of hex")
        out.append(v.lower())
    return out


def _str_list(name: str, values: Any) -> list[str]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise UserInputError(f"policy field {name} must be a list of strings")
    return list(values)


@dataclass
class Policy:
    """What evidence to accept. Defaults accept nothing until measurements are pinned.

    allowed_backends       evidence types accepted ("sim", "sgx", "tdx", "sev-snp"); sim must be
                           named explicitly because it has no hardware protection
    measurements           {evidence type: [accepted measurement hex]} (sim: code+config hash,
                           sgx: MRENCLAVE, tdx: MRTD, sev-snp: MEASUREMENT); required per type
    sim_platform_keys      Ed25519 public keys (hex) of the sim platforms trusted to sign evidence
    accepted_tcb_statuses  SGX/TDX TCB statuses accepted, e.g. add "SWHardeningNeeded"
    rejected_advisories    Intel advisory IDs that refuse a quote even if its status is accepted
    max_age_s              oldest evidence accepted, for evidence with a timestamp (sim)
    allow_debug            accept debug enclaves/TDs/guests (never in production)
    sgx_mrsigners          accepted MRSIGNER values (hex); empty means any signer
    min_isv_svn            lowest SGX ISVSVN accepted
    min_tee_tcb_svn        lowest TDX TEE_TCB_SVN, 16 bytes hex, compared byte by byte
    min_snp_tcb            lowest SNP reported TCB {bootloader, tee, snp, microcode}
    pccs_url               where to fetch SGX/TDX collateral when evidence carries none
                           ("intel" for Intel PCS); unset means collateral must come with it
    models                 {name: {owner, bundle_ids, min_k}}: the models a client may use, each
                           pinned to its owner key, the bundle ids accepted (empty: any bundle of
                           that owner) and the smallest partition point; a model with no pin is
                           refused (`enclaveml attest policy --model BUNDLE` / `attest pin`)
    caltrain               what a CalTrain participant (or owner) accepts of a training plan:
                           {owner, plans, min_split, min_head, defences} (docs/caltrain.md;
                           checked by `train.plan.check_requirements` before any upload)
    crypto                 {suite, models = {name: suite}}: the HPKE suite requests and key
                           releases use (`crypto.suites`; default "x25519", native RFC 9180;
                           "x25519-pyhpke" is the original format, for enclaves older than the
                           suites), e.g. "mlkem768-x25519" for the post-quantum hybrid, which
                           makes the client refuse an enclave whose evidence binds no hybrid key
    """

    allowed_backends: list[str] = field(default_factory=lambda: ["sgx", "tdx", "sev-snp"])
    measurements: dict[str, list[str]] = field(default_factory=dict)
    sim_platform_keys: list[str] = field(default_factory=list)
    accepted_tcb_statuses: list[str] = field(default_factory=lambda: ["UpToDate"])
    rejected_advisories: list[str] = field(default_factory=list)
    max_age_s: int = 300
    allow_debug: bool = False
    sgx_mrsigners: list[str] = field(default_factory=list)
    min_isv_svn: int | None = None
    min_tee_tcb_svn: str | None = None
    min_snp_tcb: dict[str, int] = field(default_factory=dict)
    pccs_url: str | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    caltrain: dict[str, Any] = field(default_factory=dict)
    crypto: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.models, dict):
            raise UserInputError("policy field models must be a table {name: {owner, bundle_ids, min_k}}")
        pins = {}
        for name, pin in self.models.items():
            try:
                check_name(name)
                if isinstance(pin, ModelPin):
                    pin = pin.to_dict()
                # All three keys, always: a left-out bundle_ids or min_k must not mean "any bundle,
                # down to k=1" (fail closed, F-27); `bundle_ids = []` says "any bundle" explicitly.
                if not isinstance(pin, dict) or set(pin) != {"owner", "bundle_ids", "min_k"}:
                    raise UserInputError("a pin must state all of {owner = HEX, bundle_ids = [HEX, ...] "
                                         "([] = any bundle of that owner), min_k = K}")
                pins[name] = ModelPin(pin["owner"], pin["bundle_ids"], pin["min_k"]).to_dict()
            except UserInputError as e:
                raise UserInputError(f"policy field models.{str(name)[:64]}: {e}") from None
        self.models = pins
        self.allowed_backends = _str_list("allowed_backends", self.allowed_backends)
        for b in self.allowed_backends:
            if b not in EVIDENCE_TYPES:
                raise UserInputError(f"policy field allowed_backends: unknown type {b!r} (known: {', '.join(EVIDENCE_TYPES)})")
        if not isinstance(self.measurements, dict):
            raise UserInputError("policy field measurements must be a table {type: [hex, ...]}")
        ms = {}
        for b, vals in self.measurements.items():
            if b not in EVIDENCE_TYPES:
                raise UserInputError(f"policy field measurements: unknown type {b!r}")
            ms[b] = _hex_list(f"measurements.{b}", vals)
        self.measurements = ms
        self.sim_platform_keys = _hex_list("sim_platform_keys", self.sim_platform_keys, 32)
        self.accepted_tcb_statuses = _str_list("accepted_tcb_statuses", self.accepted_tcb_statuses)
        for s in self.accepted_tcb_statuses:
            if s not in KNOWN_TCB_STATUSES:
                raise UserInputError(f"policy field accepted_tcb_statuses: unknown status {s!r} (known: {', '.join(KNOWN_TCB_STATUSES)})")
        self.rejected_advisories = _str_list("rejected_advisories", self.rejected_advisories)
        if isinstance(self.max_age_s, bool) or not isinstance(self.max_age_s, int) or self.max_age_s <= 0:
            raise UserInputError("policy field max_age_s must be a positive integer (seconds)")
        if not isinstance(self.allow_debug, bool):
            raise UserInputError("policy field allow_debug must be true or false")
        self.sgx_mrsigners = _hex_list("sgx_mrsigners", self.sgx_mrsigners, 32)
        if self.min_isv_svn is not None and (isinstance(self.min_isv_svn, bool) or not isinstance(self.min_isv_svn, int) or not 0 <= self.min_isv_svn <= 0xFFFF):
            raise UserInputError("policy field min_isv_svn must be an integer 0..65535")
        if self.min_tee_tcb_svn is not None:
            self.min_tee_tcb_svn = _hex_list("min_tee_tcb_svn", [self.min_tee_tcb_svn], 16)[0]
        if not isinstance(self.min_snp_tcb, dict):
            raise UserInputError("policy field min_snp_tcb must be a table")
        if self.pccs_url is not None and (not isinstance(self.pccs_url, str) or not (
                self.pccs_url == "intel" or self.pccs_url.startswith("https://"))):
            raise UserInputError("policy field pccs_url must be \"intel\" or an https:// URL")
        for k, v in self.min_snp_tcb.items():
            if k not in SNP_TCB_FIELDS or isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
                raise UserInputError(f"policy field min_snp_tcb: {k} = {v!r} (fields {', '.join(SNP_TCB_FIELDS)}, values 0..255)")
        self.caltrain = _caltrain_table(self.caltrain)
        self.crypto = _crypto_table(self.crypto)

    def suite_for(self, name: str | None = None) -> str:
        """The HPKE suite for requests to model `name` (or for owner commands, `None`)."""
        from ..crypto.suites import DEFAULT

        return self.crypto.get("models", {}).get(name, self.crypto.get("suite", DEFAULT))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def pin(self, name: str) -> ModelPin:
        """The pin of model `name`; `PolicyViolation` (fail closed) when the policy has none."""
        from ..errors import PolicyViolation

        p = self.models.get(name)
        if p is None:
            raise PolicyViolation(f"the policy pins no model named {name[:64]!r} (pinned: "
                                  f"{', '.join(sorted(self.models)) or 'none'}); the owner adds it with "
                                  "`enclaveml attest pin BUNDLE --policy FILE`")
        return ModelPin(p["owner"], tuple(p["bundle_ids"]), p["min_k"])

    def with_pin(self, name: str, pin: ModelPin) -> "Policy":
        """A copy of this policy with `name` pinned (replacing any pin of that name)."""
        from dataclasses import replace

        return replace(self, models={**self.models, check_name(name): pin.to_dict()})

    def to_toml(self) -> str:
        """The policy as a commented TOML document that `load_policy` reads back to an equal Policy."""
        s = json.dumps  # JSON strings and arrays of strings are valid TOML basic strings/arrays
        lines = [
            "# enclaveml attestation policy (see docs/tee.md for every field)",
            f"allowed_backends = {s(self.allowed_backends)}",
            f"sim_platform_keys = {s(self.sim_platform_keys)}",
            f"accepted_tcb_statuses = {s(self.accepted_tcb_statuses)}",
            f"rejected_advisories = {s(self.rejected_advisories)}",
            f"max_age_s = {self.max_age_s}",
            f"allow_debug = {'true' if self.allow_debug else 'false'}",
            f"sgx_mrsigners = {s(self.sgx_mrsigners)}",
        ]
        if self.min_isv_svn is not None:
            lines.append(f"min_isv_svn = {self.min_isv_svn}")
        if self.min_tee_tcb_svn is not None:
            lines.append(f"min_tee_tcb_svn = {s(self.min_tee_tcb_svn)}")
        if self.pccs_url is not None:
            lines.append(f"pccs_url = {s(self.pccs_url)}")
        lines += ["", "# accepted measurements per evidence type", "[measurements]"]
        lines += [f"{s(b)} = {s(v)}" for b, v in sorted(self.measurements.items())]
        if self.min_snp_tcb:
            lines += ["", "[min_snp_tcb]"] + [f"{k} = {v}" for k, v in sorted(self.min_snp_tcb.items())]
        if self.models:
            lines += ["", "# the models a client may use: owner key, accepted bundle ids, smallest split"]
        for name, pin in sorted(self.models.items()):
            lines += ["", f"[models.{s(name)}]", f"owner = {s(pin['owner'])}", f"bundle_ids = {s(pin['bundle_ids'])}",
                      f"min_k = {pin['min_k']}"]
        if self.caltrain:
            lines += ["", "# what this policy accepts of a CalTrain training plan (docs/caltrain.md)", "[caltrain]"]
            lines += [f"{k} = {s(v)}" for k, v in self.caltrain.items()]
        if self.crypto:
            lines += ["", "# the HPKE suite of requests and key releases (docs/crypto.md, Suites)", "[crypto]"]
            if "suite" in self.crypto:
                lines.append(f"suite = {s(self.crypto['suite'])}")
            if self.crypto.get("models"):
                lines += ["", "[crypto.models]"] + [f"{s(k)} = {s(v)}" for k, v in sorted(self.crypto["models"].items())]
        return "\n".join(lines) + "\n"


#: Keys of the `[caltrain]` table: what a participant accepts of a training plan.
CALTRAIN_FIELDS = ("owner", "plans", "min_split", "min_head", "defences")
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")


def _caltrain_table(table: Any) -> dict[str, Any]:
    """The `[caltrain]` table, checked field by field (the rules are applied by CalTrain's clients)."""
    if not isinstance(table, dict):
        raise UserInputError("policy field caltrain must be a table")
    unknown = sorted(set(table) - set(CALTRAIN_FIELDS))
    if unknown:
        raise UserInputError(f"policy field caltrain: unknown key(s) {', '.join(unknown)} (known: {', '.join(CALTRAIN_FIELDS)})")
    out: dict[str, Any] = {}
    if "owner" in table:
        out["owner"] = _hex_list("caltrain.owner", [table["owner"]], 32)[0]
    if "plans" in table:
        out["plans"] = _hex_list("caltrain.plans", table["plans"], 32)
    for name in ("min_split", "min_head"):
        if name in table:
            v = table[name]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1000:
                raise UserInputError(f"policy field caltrain.{name} must be an integer 0..1000")
            out[name] = v
    if "defences" in table:
        d = _str_list("caltrain.defences", table["defences"])
        if not all(_NAME.fullmatch(x) for x in d):
            raise UserInputError("policy field caltrain.defences must be defence names (a-z, 0-9, '_', '-')")
        out["defences"] = d
    return out


def _crypto_table(table: Any) -> dict[str, Any]:
    """The `[crypto]` table: `suite` and per-model `models.NAME`, each a known suite name."""
    from ..crypto.suites import check_suite

    if not isinstance(table, dict):
        raise UserInputError("policy field crypto must be a table")
    unknown = sorted(set(table) - {"suite", "models"})
    if unknown:
        raise UserInputError(f"policy field crypto: unknown key(s) {', '.join(unknown)} (known: models, suite)")
    out: dict[str, Any] = {}
    try:
        if "suite" in table:
            out["suite"] = check_suite(table["suite"])
        if "models" in table:
            if not isinstance(table["models"], dict):
                raise UserInputError("models must be a table {name: suite}")
            out["models"] = {check_name(k): check_suite(v) for k, v in table["models"].items()}
    except UserInputError as e:
        raise UserInputError(f"policy field crypto: {e}") from None
    return out


_FIELDS = {f.name for f in fields(Policy)}


def policy_from_dict(d: dict[str, Any]) -> Policy:
    unknown = sorted(set(d) - _FIELDS)
    if unknown:  # a typo must not silently leave a rule at its default
        raise UserInputError(f"unknown policy field(s): {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")
    return Policy(**d)


def load_policy(path: str | Path) -> Policy:
    """Read a TOML policy file; unreadable, malformed or unknown fields are `UserInputError`."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserInputError(f"policy file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserInputError(f"policy file {p} is not valid TOML: {e}") from None
    try:
        return policy_from_dict(data)
    except UserInputError as e:
        raise UserInputError(f"policy file {p}: {e}") from None
    except TypeError as e:
        raise UserInputError(f"policy file {p}: {e}") from None


def write_policy(policy: Policy, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(policy.to_toml(), encoding="utf-8")
    return p
