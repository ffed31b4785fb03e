"""The training plan: what a CalTrain deployment trains, fixed when `train serve` starts.

Trust side: written by the owner, passed by the host to the enclave at launch, enforced by the
enclave, checked by each participant against its policy before it uploads anything. Pure logic,
no I/O. Why a plan (docs/caltrain.md, security review F-40 to F-44): participants agree to more
than an owner. They agree to a data model (class names, input shape: the meaning of the labels
they sign), and to the protection their data gets: the split point k (a FrontNet of one layer
leaks invertible IRs), how many classifier layers stay in the enclave (`head`), and which
label-leakage defence runs. The plan names all of them; any may be left to the owner's
`train run` (null), and a participant whose policy requires a minimum refuses such a plan.

    plan = {"version": 1, "owner": HEX | null, "data_model": "darknet", "classes": [...],
            "input": [3, 32, 32], "model": "darknet:width=16" | "mypkg.nets:build" | null, "split": 5 | null,
            "head": 0 | null, "defence": {"name": "noise", "settings": {"scale": 1.0}} | null}
    plan hash = SHA-256("enclaveml/v1 caltrain-plan\\0" || canonical JSON of the plan)

The data model (a zoo name) says how instances are decoded and normalised; the owner declares
the class names (any number from 2 up to MAX_CLASSES; default the data model's). The model is a
model specification (`models/spec.py`): a zoo model whose classes match, or the owner's own
architecture as `package.module:function`, which an enclave builds only when its measured
configuration allows that factory (`enclave.enclave_config`; a plan that fixes a factory allows
it). A plan is parsed without importing anything: a factory is first built, and its classes and
split checked, inside the enclave at start (`build_model`).

How it binds (all backends, simulated or hardware):
- the enclave's evidence carries the plan hash in the upper half of its report data
  (`plan_report_data`), so a host cannot describe one plan and run another;
- each participant signs every instance over the plan hash (instances.py), and the enclave's
  data, tag, state and mapping keys are derived per plan (`plan_key`), so instances, checkpoints
  and releases of one plan never open under another;
- the owner's start command names the plan hash, and the enclave refuses a start whose model,
  split, head, defence or classes differ from a value the plan fixes (`TrainingPlan.resolve`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import PolicyViolation, TamperedMessage, UserInputError

PLAN_VERSION = 1
PLAN_DOMAIN = b"enclaveml/v1 caltrain-plan\x00"
#: The plan hash of an in-process pipeline with no deployment (benchmarks). No deployed enclave
#: has it (a plan hash is a SHA-256), so an instance bound to it is refused by every enclave.
UNPLANNED = bytes(32)
MAX_HEAD = 64
MAX_CLASSES = 1000
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")
_SETTING = re.compile(r"[a-z_]{1,20}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("version", "owner", "data_model", "classes", "input", "model", "split", "head", "defence")


def _int(name: str, v: Any, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise UserInputError(f"training plan: {name} must be an integer {low}..{high}, got {v!r}")
    return v


@dataclass(frozen=True)
class Defence:
    """A label-leakage defence by name with numeric settings (`NAME[:key=value,...]`; "none" = no defence)."""

    name: str
    settings: tuple[tuple[str, float | int], ...] = ()

    @classmethod
    def parse(cls, value: "str | dict | Defence") -> "Defence":
        """From `noise:scale=1.0`, `{"name": "noise", "settings": {"scale": 1.0}}` or a Defence."""
        if isinstance(value, Defence):
            return value
        if isinstance(value, str):
            name, _, rest = value.partition(":")
            settings: dict[str, Any] = {}
            for part in filter(None, rest.split(",")):
                k, eq, v = part.partition("=")
                try:
                    settings[k] = int(v) if re.fullmatch(r"[0-9]{1,9}", v) else float(v)
                except ValueError:
                    raise UserInputError(f"defence {value!r}: setting {part!r} is not key=number") from None
                if not eq:
                    raise UserInputError(f"defence {value!r}: setting {part!r} is not key=number")
            value = {"name": name, "settings": settings}
        if not isinstance(value, dict) or set(value) != {"name", "settings"}:
            raise UserInputError("defence must be NAME[:key=value,...] or {\"name\": ..., \"settings\": {...}}")
        name, settings = value["name"], value["settings"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserInputError(f"defence name {name!r}: 1-31 of a-z, 0-9, '_', '-', starting with a letter")
        if not isinstance(settings, dict) or len(settings) > 16:
            raise UserInputError("defence settings must be a table of at most 16 numbers")
        out = []
        for k, v in settings.items():
            if not isinstance(k, str) or not _SETTING.fullmatch(k):
                raise UserInputError(f"defence setting {k!r}: 1-20 of a-z and '_'")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e9:
                raise UserInputError(f"defence setting {k} = {v!r} is not a finite number")
            out.append((k, v))
        if name == "none" and out:
            raise UserInputError("defence none takes no settings")
        from .defences import DefenceSpec  # one defence registry: known names, settings, defaults

        spec = DefenceSpec(name, dict(out))
        return cls(spec.name, tuple(sorted(spec.settings.items())))

    @property
    def text(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.settings) if self.settings else "")

    def to_dict(self) -> dict:
        return {"name": self.name, "settings": dict(self.settings)}


NO_DEFENCE = Defence("none")


@dataclass(frozen=True)
class RunChoice:
    """What one run trains, once the start command and the plan agree (enclave and owner side)."""

    model: str
    split: int
    head: int
    defence: Defence


@dataclass(frozen=True)
class TrainingPlan:
    """A validated plan. Build with `TrainingPlan.build` (checks the zoo) or `from_dict` (strict)."""

    owner: str | None  # Ed25519 public key hex; None only for owner-less in-process test enclaves
    data_model: str = "darknet"
    classes: tuple[str, ...] = field(default=())
    input: tuple[int, int, int] = (3, 32, 32)
    model: str | None = None
    split: int | None = None
    head: int | None = None
    defence: Defence | None = None

    @classmethod
    def build(cls, owner: Any = None, data_model: str = "darknet", classes: "list[str] | None" = None,
              model: str | None = None, split: int | None = None, head: int | None = None,
              defence: "str | dict | Defence | None" = None) -> "TrainingPlan":
        """A plan from its parts: zoo names resolved, classes and input shape from the data model."""
        from .enclave import parse_owner
        from .spec import ModelSpec

        data = ModelSpec.parse(data_model)
        h, w = data.preprocessing().size
        doc = {"version": PLAN_VERSION, "owner": None if owner is None else parse_owner(owner).to_bytes().hex(),
               "data_model": data.text, "classes": list(classes) if classes is not None else data.classes,
               "input": [3, int(h), int(w)], "model": None if model is None else ModelSpec.parse(model).text,
               "split": split, "head": head,
               "defence": None if defence is None else Defence.parse(defence).to_dict()}
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, d: Any) -> "TrainingPlan":
        """Parse a plan document; anything malformed or unknown is a `UserInputError` naming the field."""
        from .spec import ModelSpec

        if not isinstance(d, dict):
            raise UserInputError("training plan must be a JSON object")
        if set(d) != set(_FIELDS):
            extra, missing = sorted(set(d) - set(_FIELDS)), sorted(set(_FIELDS) - set(d))
            raise UserInputError(f"training plan fields: unknown {extra}, missing {missing}")
        if d["version"] != PLAN_VERSION or isinstance(d["version"], bool):
            raise UserInputError(f"training plan version {d['version']!r} is not {PLAN_VERSION}")
        owner = d["owner"]
        if owner is not None and (not isinstance(owner, str) or not _HEX64.fullmatch(owner)):
            raise UserInputError("training plan: owner must be an Ed25519 public key as 64 lowercase hex digits")
        if not isinstance(d["data_model"], str):
            raise UserInputError("training plan: data_model must be a zoo model name")
        data = ModelSpec.parse(d["data_model"])
        if data.is_factory:
            raise UserInputError("training plan: data_model must be a zoo model name (it fixes how instances are "
                                 "decoded); the model to train goes in model")
        classes = d["classes"]
        if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES or \
                not all(isinstance(c, str) and 1 <= len(c) <= 64 and c.isprintable() for c in classes) or \
                len(set(classes)) != len(classes):
            raise UserInputError(f"training plan: classes must be 2 to {MAX_CLASSES} distinct names of 1-64 "
                                 f"printable characters")
        h, w = data.preprocessing().size
        if d["input"] != [3, h, w]:
            raise UserInputError(f"training plan: input {d['input']!r} is not the data model's [3, {h}, {w}]")
        model = d["model"]
        if model is not None:
            if not isinstance(model, str):
                raise UserInputError("training plan: model must be a model spec or null")
            spec = ModelSpec.parse(model)
            if spec.text != model:
                raise UserInputError(f"training plan: model {model!r} is not in canonical form ({spec.text!r})")
            if not spec.is_factory and (spec.num_classes != len(classes) or spec.preprocessing().size != (h, w)):
                raise UserInputError(f"training plan: model {model} does not take the data model's input or the "
                                     f"plan's {len(classes)} classes")
        split = None if d["split"] is None else _int("split", d["split"], 1, 1000)
        head = None if d["head"] is None else _int("head", d["head"], 0, MAX_HEAD)
        defence = None if d["defence"] is None else Defence.parse(d["defence"])
        plan = cls(owner, data.text, tuple(classes), (3, h, w), model, split, head, defence)
        if model is not None:
            plan._check_model(model, split, head)
        return plan

    def _check_model(self, model: str, split: int | None, head: int | None) -> None:
        """The split must be a partition point of the model and leave the host at least one layer."""
        from .spec import ModelSpec

        spec = ModelSpec.parse(model)
        if spec.is_factory:
            return  # not imported outside an enclave that allows it: checked by `build_model` at start
        n = len(spec.build())
        if split is not None and not 1 <= split <= n - 1:
            raise UserInputError(f"training plan: split {split} is out of range for {model} (points 1..{n - 1})")
        if split is not None and head is not None and split + head > n - 1:
            raise UserInputError(f"training plan: split {split} + head {head} leaves the host no layer of {model} "
                                 f"({n} layers)")

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "owner": self.owner, "data_model": self.data_model,
                "classes": list(self.classes), "input": list(self.input), "model": self.model, "split": self.split,
                "head": self.head, "defence": None if self.defence is None else self.defence.to_dict()}

    def hash(self) -> bytes:
        from ..tee.sim_evidence import canonical_json

        return hashlib.sha256(PLAN_DOMAIN + canonical_json(self.to_dict())).digest()

    def data_spec(self):
        from .spec import ModelSpec

        return ModelSpec.parse(self.data_model)

    def open_fields(self) -> list[str]:
        """The fields the plan leaves to the owner's `train run`."""
        return [n for n in ("model", "split", "head", "defence") if getattr(self, n) is None]

    def resolve(self, model: Any = None, split: Any = None, head: Any = None, defence: Any = None,
                classes: Any = None) -> RunChoice:
        """The run a start command asks for, checked against the plan (PolicyViolation naming the field).

        A field the plan fixes may be omitted (the plan's value is used) or repeated (it must be
        equal); a field the plan leaves open must be given (head and defence default to 0 and none).
        """
        from .spec import ModelSpec

        if classes is not None and list(classes) != list(self.classes):
            raise PolicyViolation("training plan: the start command names other classes than the plan")
        if model is not None:
            if not isinstance(model, str):
                raise UserInputError("model must be a model spec")
            model = ModelSpec.parse(model).text
        if defence is not None:
            defence = Defence.parse(defence)
        asked = {"model": model, "split": split, "head": head, "defence": defence}
        out = {}
        for name, value in asked.items():
            fixed = getattr(self, name)
            if fixed is not None and value is not None and value != fixed:
                shown = value.text if isinstance(value, Defence) else value
                fixed_shown = fixed.text if isinstance(fixed, Defence) else fixed
                raise PolicyViolation(f"training plan fixes {name} = {fixed_shown}; the run asks for {shown}")
            out[name] = fixed if fixed is not None else value
        if out["model"] is None:
            raise UserInputError("the plan leaves the model to the owner: give one (train run --model)")
        if out["split"] is None:
            raise UserInputError("the plan leaves the split to the owner: give one (train run --split)")
        head = 0 if out["head"] is None else _int("head", out["head"], 0, MAX_HEAD)
        split = _int("split", out["split"], 1, 1000)
        spec = ModelSpec.parse(out["model"])
        if not spec.is_factory and (spec.num_classes != len(self.classes)
                                    or spec.preprocessing().size != tuple(self.input[1:])):
            raise UserInputError(f"model {spec.text} does not take this plan's input or its {len(self.classes)} "
                                 "classes")
        self._check_model(spec.text, split, head)
        return RunChoice(spec.text, split, head, out["defence"] or NO_DEFENCE)

    def factories(self) -> tuple[str, ...]:
        """The user factory this plan fixes, if any (an enclave running the plan allows it)."""
        from .spec import ModelSpec

        spec = None if self.model is None else ModelSpec.parse(self.model)
        return (spec.target,) if spec is not None and spec.is_factory else ()

    def preprocessing(self):
        """How instances are decoded and normalised: the data model's."""
        return self.data_spec().preprocessing()

    def build_model(self, model: str, allowed_factories: Any = (), split: int | None = None, head: int = 0):
        """The architecture `model` names for this plan's input and classes (random weights).

        A factory only when `allowed_factories` (the caller's trusted configuration: an enclave's
        measured one, a host operator's flags, the owner's own choice) names it, else
        PolicyViolation before any import; then its classes and, if given, the split are checked.
        """
        from ..models.split import check_split
        from .spec import ModelSpec

        spec = ModelSpec.parse(model)
        if not spec.allowed_by(allowed_factories):
            raise PolicyViolation(f"model factory {spec.target!r} is not allowed here (a training enclave allows "
                                  "the factories of its measured configuration: train serve --allow-factory, or a "
                                  "plan that fixes the model)")
        from ..models.loading import probe_classes

        built = spec.build(tuple(self.input), len(self.classes), allowed_factories)
        outputs = probe_classes(built, tuple(self.input), f"model {spec.text}: ") if spec.is_factory \
            else built.num_classes
        if outputs != len(self.classes):
            raise UserInputError(f"model {spec.text} has {outputs} outputs; the plan declares "
                                 f"{len(self.classes)} classes")
        if tuple(built.input_shape) != tuple(self.input):
            raise UserInputError(f"model {spec.text} takes {list(built.input_shape)}, the plan's input is "
                                 f"{list(self.input)}")
        if split is not None:
            check_split(built, split, head)
        return built


def plan_report_data(public_key: bytes, nonce: bytes, plan_hash: bytes) -> bytes:
    """The 64-byte report data of a training enclave: SHA-256(key || nonce) || plan hash.

    `bind_report_data` leaves the upper 32 bytes zero for a second binding; a training enclave
    puts its plan hash there, so the evidence itself (on every backend) says which plan runs.
    """
    from ..tee import bind_report_data

    if len(plan_hash) != 32:
        raise ValueError("plan hash must be 32 bytes")
    return bind_report_data(public_key, nonce)[:32] + bytes(plan_hash)


def plan_key(sealing_key: bytes, plan_hash: bytes) -> bytes:
    """A per-plan key from a backend sealing key: what one plan seals, another cannot open."""
    return hmac.new(bytes(sealing_key), b"caltrain/plan\x00" + bytes(plan_hash), hashlib.sha256).digest()


def plan_from_answer(info: Any) -> tuple[TrainingPlan, bytes]:
    """The plan a server's /info answer describes, parsed as hostile input: (plan, its hash)."""
    try:
        plan = TrainingPlan.from_dict(info.get("plan") if isinstance(info, dict) else None)
    except UserInputError as e:
        raise TamperedMessage(f"the server's /info answer carries no valid training plan ({e})") from None
    return plan, plan.hash()


def check_requirements(plan: TrainingPlan, req: dict, plan_hash: bytes | None = None) -> None:
    """A participant's (or owner's) `[caltrain]` policy table against a plan; PolicyViolation naming the rule.

    owner      the plan's owner must be this key
    plans      the plan's hash must be one of these (an exact agreement)
    min_split  the plan must fix a split point k >= this (a deeper FrontNet leaks less)
    min_head   the plan must keep at least this many classifier layers in the enclave
    defences   the plan must fix a label-leakage defence of one of these names
    """
    h = plan.hash() if plan_hash is None else plan_hash
    if req.get("owner") is not None and not hmac.compare_digest(str(plan.owner or "").encode(),
                                                                 str(req["owner"]).lower().encode()):
        raise PolicyViolation(f"policy rule caltrain.owner: the plan trains for owner {str(plan.owner)[:16]}..., "
                              f"not {str(req['owner'])[:16]}...")
    plans = req.get("plans") or []
    if plans and not any(hmac.compare_digest(h.hex().encode(), p.lower().encode()) for p in plans):
        raise PolicyViolation(f"policy rule caltrain.plans: plan {h.hex()[:16]}... is not one the policy accepts")
    if req.get("min_split") is not None:
        if plan.split is None:
            raise PolicyViolation(f"policy rule caltrain.min_split: the plan leaves the split to the owner; "
                                  f"the policy requires k >= {req['min_split']}")
        if plan.split < req["min_split"]:
            raise PolicyViolation(f"policy rule caltrain.min_split: the plan splits at k = {plan.split}, "
                                  f"below {req['min_split']}")
    if req.get("min_head") is not None and req["min_head"] > 0:
        if plan.head is None or plan.head < req["min_head"]:
            got = "leaves the head to the owner" if plan.head is None else f"keeps {plan.head} head layer(s) sealed"
            raise PolicyViolation(f"policy rule caltrain.min_head: the plan {got}; the policy requires "
                                  f"{req['min_head']} in the enclave")
    names = req.get("defences") or []
    if names:
        d = plan.defence
        if d is None or d.name not in names:
            got = "leaves the defence to the owner" if d is None else f"uses defence {d.text}"
            raise PolicyViolation(f"policy rule caltrain.defences: the plan {got}; the policy requires one of "
                                  f"{', '.join(names)}")


def participant_policy(plan: TrainingPlan, rules: dict | None = None, pin_plan: bool = True,
                       allowed_factories: "tuple[str, ...] | list[str]" = ()):
    """The sim policy that accepts this machine's training enclave for `plan`'s owner: `[caltrain]`
    pins the owner, the exact plan (unless `pin_plan` is False) and the least protection `rules`
    ({min_split, min_head, defences}). Refuses a pinned plan that can never meet the rules. The
    measured configuration allows the plan's factory and `allowed_factories` (as `train serve
    --allow-factory`)."""
    from ..errors import EnclaveMLError, UserInputError
    from ..tee.sim import sim_policy
    from .enclave import enclave_config

    rules = dict(rules or {})
    table: dict = {"owner": plan.owner}
    if pin_plan:
        table["plans"] = [plan.hash().hex()]
        try:
            check_requirements(plan, rules)
        except EnclaveMLError as e:
            raise UserInputError(f"the plan you pin can never meet your own requirements: {e}") from None
    table.update(rules)
    return sim_policy(enclave_config(plan.owner, plan.factories() + tuple(allowed_factories)), caltrain=table)
