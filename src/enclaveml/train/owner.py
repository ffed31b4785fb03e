"""`train run` and `train trace`: the model owner's side of CalTrain.

Trust side: owner (or an auditor the owner hands the model folder to). `run` reads the server's
training plan (plan.py), checks that it names us and that the run we ask for fits it, attests
the enclave (its evidence carries the plan hash), sends it an owner-signed start command bound to
that plan (sealed to its key), waits, then asks for the release: the enclave encrypts the model
and the linkage key to a one-time key of ours. The model folder it writes:

    model.safetensors  front.safetensors  back.safetensors   (class order)
    model.json         spec, arch, split, head, defence, plan and plan hash, classes, input,
                       preprocessing, config
    linkage.db         the encrypted linkage store, as the host keeps it
    linkage.key        the 32-byte key that opens it (mode 0600)
    bundle/            the model as `enclaveml partition` writes a bundle (signed manifest, sealed
                       FrontNet and class map, BackNet safetensors), for `enclaveml deploy` as it is
    bundle.modelkey    its model key (mode 0600), as `partition` keeps it beside the bundle

`trace` works offline on that folder: fingerprint of the image, nearest same-label records.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import keyfiles
from ..crypto import HpkeKeyPair, SigningKey, open_request, seal_owner_command
from ..errors import PolicyViolation, TamperedMessage, UserInputError
from .client import HostClient
from .enclave import AUDIT, AUDIT_INFO, RELEASE, RELEASE_INFO, START, unpack_files
from .partitioned import TrainConfig
from .spec import ModelSpec


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def run(url: str, policy: str | Path, model: str | None, split: int | None, cfg: TrainConfig,
        key_path: "str | Path | SigningKey", out: str | Path, run_id: str = "caltrain", checkpoint_every: int = 50,
        poll: float = 1.0, progress: Callable[[dict], None] | None = None, wait: bool = True,
        head: int | None = None, defence: "str | dict | None" = None, bundle: "str | Path | None" = None,
        name: str | None = None, enclaves: int | None = None) -> dict:
    """Start (or resume) a run, wait for it, and fetch the release into `out`.

    `model`, `split`, `head`, `defence`: None takes the plan's value (model "darknet", head 0 and
    no defence where the plan leaves them open); a value the plan fixes otherwise is refused here,
    before anything is sent, and again by the enclave. `head`: the last layers that run in the
    enclave too (the host then sees cut-layer gradients, not class scores); `defence`: the
    label-leakage defence the enclave applies to the gradient it hands the host
    (`defences.DefenceSpec`, text `NAME[:k=v,...]` or its dict). Both travel in the signed start
    command; the enclave checks them and reports them back. `key_path`: the owner's key file
    (created on first use), or the key itself. The release goes to `out` with a servable bundle
    (`write_bundle`: `bundle`, default OUT/bundle, named `name`, default the run id). `enclaves`: require data-parallel
    training over exactly this many enclaves (in the signed command; enclave 0 checks it, and
    the release's `model.json` must say so).
    """
    from ..tee import load_policy
    from .partitioned import check_head
    from .plan import Defence, check_requirements

    # What can be checked here is refused before anything is sent (or an owner key created).
    if wait:
        bundle_target(out, bundle)
    if defence is not None:
        defence = Defence.parse(defence)  # unknown name or out-of-range setting
    if head is not None and model is not None and split is not None and not ModelSpec.parse(model).is_factory:
        check_head(ModelSpec.parse(model).build(), split, head)
    owner = key_path if isinstance(key_path, SigningKey) else keyfiles.load_or_create_signing_key(key_path)
    rules = load_policy(policy).caltrain
    client = HostClient(url)
    phases: dict[str, float] = {}  # where the owner's wall time went (s), in the answer as "phases"
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        t = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + t - mark, 3)
        mark = t

    try:
        plan, plan_hash = client.plan()
        if plan.owner != owner.public_key().to_bytes().hex():
            raise PolicyViolation(f"this server's training plan names owner {str(plan.owner)[:16]}..., not the key "
                                  f"{owner.public_key().to_bytes().hex()[:16]}... of {key_path}")
        check_requirements(plan, rules, plan_hash)
        if model is None and plan.model is None:
            model = "darknet"
        choice = plan.resolve(model, split, head, defence)
        spec = ModelSpec.parse(choice.model)
        if not spec.is_factory:
            check_head(spec.build(), choice.split, choice.head)  # before anything is sent
        phase("plan")
        pub, nonce = client.attest(policy, plan_hash)  # the evidence names the plan
        phase("attest")
        if spec.is_factory:
            # Only now: an enclave our policy accepts was measured with this factory allowed (its
            # configuration), so the plan's factory is one this owner configured, not the host's.
            plan.build_model(spec.text, spec.target_allowed(), choice.split, choice.head)
        cmd = seal_owner_command(owner, pub, START, run_id, nonce,
                                 {"model": choice.model, "split": choice.split, "head": choice.head,
                                  "defence": choice.defence.to_dict(), "plan": plan_hash.hex(), "config": cfg.to_dict(),
                                  **({"enclaves": int(enclaves)} if enclaves is not None else {})})
        st = client.start(run_id, cmd, checkpoint_every)
        phase("start")
        if not wait:
            return st
        while st.get("state") == "running":
            if progress:
                progress(st)
            asked = time.monotonic()
            # a long poll: the server answers when the run ends, or after `poll` s with its progress
            st = client.get_json("/train/status", run_id=run_id, wait=poll)
            rest = poll - (time.monotonic() - asked)
            if st.get("state") == "running" and rest > 0:
                time.sleep(rest)  # a server that does not wait answered at once
        phase("train")
        if st.get("state") != "done":
            raise UserInputError(f"training did not finish: {st.get('state')} {st.get('error', '')}".strip())
        pub, nonce = client.attest(policy, plan_hash)  # a fresh nonce: the enclave accepts each one once
        phase("release_attest")
        out_info = release(client, pub, nonce, owner, run_id, out, bundle=bundle, name=name, enclaves=enclaves)
        phase("release")
        return {**st, **out_info, "phases": phases}
    finally:
        client.close()


def fetch_release(url: str, policy: str | Path, key_path: "str | Path | SigningKey", out: str | Path,
                  run_id: str = "caltrain", bundle: "str | Path | None" = None, name: str | None = None,
                  enclaves: int | None = None) -> dict:
    """Fetch a finished run's release again (attest, signed release command) into `out`, with its bundle.
    `enclaves`: require a run trained over exactly this many enclaves (as `run` does)."""
    bundle_target(out, bundle)
    owner = key_path if isinstance(key_path, SigningKey) else keyfiles.load_signing_key(key_path)
    client = HostClient(url)
    try:
        plan, plan_hash = client.plan()
        pub, nonce = client.attest(policy, plan_hash)
        return release(client, pub, nonce, owner, run_id, out, bundle=bundle, name=name, enclaves=enclaves)
    finally:
        client.close()


def release(client: HostClient, pub: bytes, nonce: bytes, owner: SigningKey, run_id: str, out: str | Path,
            bundle: "str | Path | None" = None, name: str | None = None, enclaves: int | None = None) -> dict:
    """Ask the enclave for the model (sealed to a one-time key of ours), write the model folder,
    and make the servable bundle from it (`write_bundle`; `bundle` default OUT/bundle). `enclaves`:
    refuse (before writing anything) a release whose sealed header names another group size."""
    reply = HpkeKeyPair.generate()
    cmd = seal_owner_command(owner, pub, RELEASE, run_id, nonce, {"reply_to": reply.public_bytes().hex()})
    data, _ = open_request(reply, client.release(run_id, cmd), b"", info=RELEASE_INFO)
    header, files = unpack_files(data)
    trained_by = int(header.get("enclaves", 1))
    if enclaves is not None and trained_by != int(enclaves):
        raise PolicyViolation(f"the run was trained by {trained_by} enclave(s), not the {enclaves} asked for")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for fname in ("model.safetensors", "front.safetensors", "back.safetensors"):
        (out / fname).write_bytes(files[fname])
    key = bytes.fromhex(header.pop("linkage_key"))
    _write_private(out / "linkage.key", key)
    (out / "model.json").write_text(json.dumps(header, indent=2) + "\n")
    (out / "linkage.db").write_bytes(client.get("/train/linkage", run_id=run_id).content)
    made = write_bundle(out, owner, bundle, name=name)
    return {"out": str(out), "instances": header["instances"], "enclaves": int(header.get("enclaves", 1)), **made}


def bundle_target(out: str | Path, bundle: "str | Path | None" = None) -> Path:
    """Where a release's bundle goes (default OUT/bundle); `UserInputError` if a bundle or its
    model key is already there (a release never overwrites a model key: choose another place)."""
    from ..models.bundle import model_key_path

    target = Path(bundle) if bundle is not None else Path(out) / "bundle"
    if (target.exists() and (not target.is_dir() or any(target.iterdir()))) or model_key_path(target).exists():
        raise UserInputError(f"{target}: a bundle (or {model_key_path(target).name}) is already there; choose "
                             "another --out or --bundle (a release never overwrites a model key)")
    return target


def released_model(folder: str | Path):
    """(LayeredModel in class order, model.json) of a released model folder (owner or auditor).

    The folder is the owner's own file, like a model card: a user factory it names is built
    (the attested training enclave was configured to allow it, `run`), no other.
    """
    from safetensors.torch import load_file

    from .plan import TrainingPlan

    d = Path(folder)
    try:
        meta = json.loads((d / "model.json").read_text())
    except FileNotFoundError as e:
        raise UserInputError(f"{d}: not a CalTrain model folder ({e.filename} missing)") from None
    except ValueError:
        raise UserInputError(f"{d}/model.json: not JSON") from None
    spec = ModelSpec.parse(meta["model"])
    if "plan" in meta:
        model = TrainingPlan.from_dict(meta["plan"]).build_model(spec.text, spec.target_allowed())
    else:  # released before plans existed: zoo models only
        model = spec.build()
    try:
        model.load_state_dict(load_file(str(d / "model.safetensors")))
    except (OSError, RuntimeError) as e:
        raise UserInputError(f"{d}/model.safetensors does not fit {spec.text} ({type(e).__name__})") from None
    return model.eval(), meta


def write_bundle(folder: str | Path, owner: SigningKey, bundle: "str | Path | None" = None,
                 name: str | None = None) -> dict:
    """The released model as a bundle in exactly `enclaveml partition`'s format, ready for `deploy`.

    Same split (k and head as trained), the same architecture spec in the manifest's `arch`
    (`models/spec.py`), the plan's preprocessing and the owner's class names, a FRESH secret
    class mapping (the training run's was exposed to the host's gradients), signed with the
    owner's key. The model key goes to BUNDLE.modelkey (0600) as `partition` writes it.
    Default bundle: FOLDER/bundle; default name: the run id.
    """
    from ..data.preprocess import Preprocessing
    from ..models.bundle import make_bundle, model_key_path, save_model_key

    target = bundle_target(folder, bundle)
    key_file = model_key_path(target)
    model, meta = released_model(folder)
    manifest, key = make_bundle(model, int(meta["split"]), target, ModelSpec.parse(meta["model"]).arch,
                                Preprocessing.from_dict(meta["preprocessing"]), list(meta["classes"]), owner,
                                name=name or _bundle_name(str(meta.get("run_id", "caltrain"))),
                                head=int(meta.get("head", 0)))
    try:
        save_model_key(key_file, key)
    except BaseException:
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        raise
    return {"bundle": str(target), "model_key": str(key_file), "name": manifest.name,
            "bundle_id": manifest.bundle_id}


def _bundle_name(run_id: str) -> str:
    """A model name servers accept (letters, digits, '-', '_', '.'), from a run id."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in run_id)
    return safe.lstrip(".")[:64] or "caltrain"


def audit(url: str, policy: str | Path, key_path: str | Path, run_id: str = "caltrain",
          out: str | Path | None = None) -> dict:
    """Ask the enclave for the label audit of a finished run; verify it; optionally write it to `out`.

    Returns the signed envelope {report, signature, audit_key, evidence} after `verify_audit`.
    """
    owner = keyfiles.load_signing_key(key_path)
    client = HostClient(url)
    try:
        pub, nonce = client.attest(policy)
        reply = HpkeKeyPair.generate()
        cmd = seal_owner_command(owner, pub, AUDIT, run_id, nonce, {"reply_to": reply.public_bytes().hex()})
        sealed = client.audit(run_id, cmd)
    finally:
        client.close()
    data, _ = open_request(reply, sealed, b"", info=AUDIT_INFO)
    try:
        envelope = json.loads(data)
    except ValueError:
        raise TamperedMessage("the audit is not valid JSON") from None
    verify_audit(envelope, policy, run_id=run_id)
    if out is not None:
        Path(out).write_text(json.dumps(envelope, indent=1) + "\n")
    return envelope


def verify_audit(envelope: dict, policy: "str | Path | Any", run_id: str | None = None, now=None) -> dict:
    """Check a signed label audit (owner, or anyone the owner shows it to); returns the report.

    The audit key's signature must cover the report, and the enclave's evidence must bind that
    key and the report's digest and satisfy `policy` (the participants' policy: the measured
    enclave for this owner). `now` pins the clock of the policy's freshness rule (e.g. the
    report's time, to check an old report). TamperedMessage / EvidenceRejected / PolicyViolation.
    """
    from ..crypto import VerifyKey
    from ..tee import bind_report_data, load_policy, verify_evidence
    from .audit import report_digest, signed_bytes

    try:
        report = envelope["report"]
        vk_raw = bytes.fromhex(str(envelope["audit_key"]))
        sig = bytes.fromhex(str(envelope["signature"]))
        evidence = envelope["evidence"]
        vk = VerifyKey.from_bytes(vk_raw)
    except (KeyError, ValueError, TypeError):
        raise TamperedMessage("the audit envelope is malformed") from None
    vk.verify(sig, signed_bytes(report))
    pol = load_policy(policy) if isinstance(policy, (str, Path)) else policy
    verify_evidence(evidence, pol, bind_report_data(vk_raw, report_digest(report)), now=now)
    if run_id is not None and report.get("run_id") != run_id:
        raise TamperedMessage("the audit is of another run")
    return report


class TracedModel:
    """The released model folder, opened for tracing (owner or auditor)."""

    def __init__(self, folder: str | Path, linkage: str | Path | None = None):
        """`linkage`: read the records from there (a `postgresql://` URL or another SQLite file)
        instead of the folder's linkage.db; the folder's key and run id still decide what opens."""
        from ..data.preprocess import Preprocessing
        from .linkage import LinkageStore, records_to_arrays

        self.dir = Path(folder)
        self.model, self.meta = released_model(self.dir)
        try:
            key = (self.dir / "linkage.key").read_bytes()
        except FileNotFoundError as e:
            raise UserInputError(f"{self.dir}: not a CalTrain model folder ({e.filename} missing)") from None
        self.spec = ModelSpec.parse(self.meta["model"])
        self.classes = list(self.meta["classes"])
        self.pre = (Preprocessing.from_dict(self.meta["preprocessing"]) if "preprocessing" in self.meta
                    else self.spec.preprocessing())
        with LinkageStore(linkage or self.dir / "linkage.db", key,
                          store=self.meta.get("run_id") if linkage else None) as store:
            self.records = store.read_all()  # TamperedMessage if the store was changed
        if len(self.records) != int(self.meta["instances"]):
            raise TamperedMessage("linkage store does not hold one record per training instance")
        self.fps, self.labels = records_to_arrays(self.records)

    def label_index(self, label: str) -> int:
        if label in self.classes:
            return self.classes.index(label)
        if label.isdigit() and int(label) < len(self.classes):
            return int(label)
        raise UserInputError(f"unknown label {label!r}; classes: {', '.join(self.classes)}")

    @torch.no_grad()
    def fingerprint(self, image_bytes: bytes) -> tuple[torch.Tensor, int]:
        x = self.pre(image_bytes).unsqueeze(0)
        fp = torch.nn.functional.normalize(self.model.penultimate(x), dim=1)[0]
        return fp, int(self.model(x).argmax(1))

    def trace(self, image_bytes: bytes, label: str, k: int = 10, mode: str = "nearest") -> dict:
        """Trace a misprediction (`trace.MODES`: "nearest" for backdoors, "mislabel" for flipped labels)."""
        from .trace import trace

        y = self.label_index(label)
        fp, pred = self.fingerprint(image_bytes)
        res = trace(fp, y, self.fps, self.labels, [r.instance_hash for r in self.records],
                    [r.participant for r in self.records], k=k, mode=mode)
        d = res.to_dict(self.classes)
        d["predicted"] = self.classes[pred]
        sigs = {i: self.records[n.index].signature.hex() for i, n in enumerate(res.neighbours)}
        for i, n in enumerate(d["neighbours"]):
            n["signature"] = sigs[i]
        return d

    def trace_cluster(self, images: list[bytes], label: str, k: int = 10) -> dict:
        """Trace several mispredictions together (mode "cluster", see `cluster.py`): the poison
        cluster of `label` they point to, and per input its K nearest cluster members."""
        from .cluster import cluster_summary, trace_cluster

        if not images:
            raise UserInputError("mode cluster needs at least one traced input")
        y = self.label_index(label)
        fps, preds = zip(*(self.fingerprint(b) for b in images))
        hashes, pids = [r.instance_hash for r in self.records], [r.participant for r in self.records]
        res, answers = trace_cluster(torch.stack(fps), y, self.fps, self.labels, hashes, pids, k=k)
        out = {"mode": "cluster", "label": y, "label_name": self.classes[y],
               "cluster": cluster_summary(res, pids, hashes), "inputs": []}
        for a, pred in zip(answers, preds):
            d = a.to_dict(self.classes)
            d["predicted"] = self.classes[pred]
            out["inputs"].append(d)
        return out

    def verify_instance(self, image_bytes: bytes, public_key_hex: str) -> dict:
        """A participant's proof: the image hashes to a record, whose signature their key made."""
        from ..crypto import VerifyKey
        from .instances import instance_hash, participant_id, signed_message

        h = instance_hash(image_bytes)
        vk = VerifyKey.from_bytes(bytes.fromhex(public_key_hex))
        try:
            plan = bytes.fromhex(str(self.meta["plan_hash"]))
        except (KeyError, ValueError):
            raise UserInputError(f"{self.dir}: model.json names no training plan (released before plans existed)") \
                from None
        for r in self.records:
            if r.instance_hash == h:
                if participant_id(vk) != r.participant:
                    raise TamperedMessage("that key is not the contributor of this instance")
                vk.verify(r.signature, signed_message(h, r.label, r.participant, plan))
                return {"instance_hash": h.hex(), "participant": r.participant.hex(), "label": self.classes[r.label],
                        "plan": plan.hex(), "verified": True}
        raise UserInputError("no training instance has that image's hash")
