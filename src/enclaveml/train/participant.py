"""`train contribute`: check the training plan, attest the enclave, then upload signed, encrypted instances.

Trust side: participant. The server's training plan (plan.py) is checked against the policy's
`[caltrain]` rules (owner, accepted plans, least split, sealed head, defence) and then proved by
the enclave's evidence, which carries the plan hash; class names come from that plan, never from
the host's word. Each instance is signed with the participant's Ed25519 key over (plan hash,
instance hash, label, participant id) and HPKE-encrypted to the attested enclave key; the host
sees only ciphertext. Resumable: a journal beside the key lists the hashes the server has
acknowledged (accepted or already held), so a second session uploads only the rest, and the
server deduplicates anything sent twice anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import keyfiles
from ..data.folder import list_image_folder
from ..data.preprocess import load_image_bytes
from ..errors import DataError
from .client import HostClient
from .instances import instance_hash, make_upload


@dataclass
class ContributionReport:
    participant: str
    plan: str = ""  # hash (hex) of the training plan the instances are bound to
    total: int = 0
    skipped: int = 0  # acknowledged in an earlier session (journal)
    counts: Counter = field(default_factory=Counter)
    rejections: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"participant": self.participant, "plan": self.plan, "total": self.total,
                "skipped_from_journal": self.skipped,
                **dict(self.counts), "rejections": self.rejections[:20]}


def journal_path(key_path: Path, url: str, plan_hash: bytes = b"") -> Path:
    """Per server and plan: an instance acknowledged under one plan is not contributed to another."""
    tag = hashlib.sha256(url.encode() + b"\x00" + bytes(plan_hash)).hexdigest()[:12]
    return key_path.with_name(key_path.name + f".{tag}.journal")


def _load_journal(p: Path) -> set[str]:
    try:
        return set(json.loads(p.read_text()))
    except (FileNotFoundError, ValueError):
        return set()


def _save_journal(p: Path, done: set[str]) -> None:
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(sorted(done)))
    os.replace(tmp, p)


def contribute(data_dir: str | Path, url: str, policy: str | Path, key_path: str | Path, batch: int = 128,
               limit: int | None = None, progress: Callable[[int, int], None] | None = None,
               stop_after_batches: int | None = None) -> ContributionReport:
    """Upload every image of `data_dir/<class>/` (class names must be the server's)."""
    from ..tee import load_policy
    from .plan import check_requirements

    key_path = Path(key_path)
    key = keyfiles.load_or_create_signing_key(key_path)
    rules = load_policy(policy).caltrain
    client = HostClient(url)
    try:
        plan, plan_hash = client.plan()  # the host's word, until the evidence below proves it
        check_requirements(plan, rules, plan_hash)  # PolicyViolation: the plan is not what we accept
        classes = list(plan.classes)
        folder_classes, samples = list_image_folder(data_dir)
        unknown = [c for c in folder_classes if c not in classes]
        if unknown:
            raise DataError(f"{data_dir}: class folder(s) {', '.join(unknown[:5])} are not classes of this "
                            f"training ({', '.join(classes)})")
        samples = [(p, classes.index(folder_classes[y])) for p, y in samples][:limit]
        # EvidenceRejected / PolicyViolation stop us before any upload; the evidence names the plan
        pub, _ = client.attest(policy, plan_hash)
        jpath = journal_path(key_path, url, plan_hash)
        done = _load_journal(jpath)
        rep = ContributionReport(key.public_key().fingerprint(), plan=plan_hash.hex(), total=len(samples))
        todo = []
        for p, y in samples:
            data = load_image_bytes(p)
            if instance_hash(data).hex() in done:
                rep.skipped += 1
            else:
                todo.append((p, data, y))
        for bi, i in enumerate(range(0, len(todo), batch)):
            if stop_after_batches is not None and bi >= stop_after_batches:
                break  # tests: simulate an interrupted session
            chunk = todo[i:i + batch]
            ups = [make_upload(pub, key, data, y, plan=plan_hash) for _, data, y in chunk]
            results = client.contribute([u for _, u in ups])  # TamperedMessage: not one result per upload
            for (path, _, _), (h, _), r in zip(chunk, ups, results):
                rep.counts[r.status] += 1
                if r.status in ("accepted", "exists"):
                    done.add(h.hex())
                else:
                    rep.rejections.append({"file": str(path), "error": r.error, "reason": r.reason})
            _save_journal(jpath, done)
            if progress:
                progress(min(i + batch, len(todo)), len(todo))
        return rep
    finally:
        client.close()


__all__ = ["contribute", "ContributionReport", "journal_path"]
