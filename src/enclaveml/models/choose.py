"""Which partition point a bundle uses: the owner's k, or the assessment's recommendation (owner side).

The rule: k defaults to the assessment's `recommended` point; a k shallower than that point is
refused unless forced (its IR leaks by that assessment), a deeper one is allowed. The CLI
(`enclaveml partition`) and the Python API (`enclaveml.partition`) both call `partition_point`,
each naming its own arguments in the messages (`--at K` / `k=K`). Pure: the assessment arrives as
an already-decoded record; `read_assessment` is the one file read, kept apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import PartitionError, UserInputError


@dataclass(frozen=True)
class ArgNames:
    """How the caller spells its arguments, so that a refusal names what the user typed."""

    k: str  # prefix of a k value: "--at " or "k="
    k_hint: str  # "--at K" or "k=K"
    assessment_hint: str  # "--assessment FILE" or "assessment=..."
    force: str  # "--force" or "force=True"


CLI_ARGS = ArgNames(k="--at ", k_hint="--at K", assessment_hint="--assessment FILE", force="--force")
PYTHON_ARGS = ArgNames(k="k=", k_hint="k=K", assessment_hint="assessment=(an Assessment or its JSON file)",
                       force="force=True")


class ShallowPartitionPoint(PartitionError):
    """A k shallower than the assessment's recommended point, not forced."""

    def __init__(self, message: str, k: int, recommended: int):
        super().__init__(message)
        self.k, self.recommended = k, recommended


def read_assessment(path: "str | Path") -> dict:
    """The decoded assessment.json at `path` (one `UserInputError` line for an unreadable file)."""
    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserInputError(f"{path}: cannot read assessment ({e.strerror})") from None
    except ValueError:
        raise UserInputError(f"{path}: not a JSON assessment report") from None
    return report


def recommended_point(report: Any, model_name: str | None, source: str) -> int | None:
    """The record's `recommended` point (None: it recommends none), checked to be for `model_name`.

    `source` names the assessment in messages (its path, or "the assessment"). `model_name=None`
    skips the model check (a caller that cannot name its model, e.g. an unnamed nn.Module).
    """
    if not isinstance(report, Mapping) or "recommended" not in report:
        raise UserInputError(f"{source}: no 'recommended' partition point in the assessment")
    named = report.get("model")
    if model_name is not None and isinstance(named, str) and named != model_name:
        raise UserInputError(f"{source}: the assessment is for model {named!r}, not {model_name!r}")
    recommended = report["recommended"]
    if recommended is not None and (isinstance(recommended, bool) or not isinstance(recommended, int)):
        raise UserInputError(f"{source}: 'recommended' must be a layer index")
    return recommended


def partition_point(k: int | None, recommended: int | None, *, assessed: bool, force: bool = False,
                    source: str = "the assessment", names: ArgNames = PYTHON_ARGS) -> int:
    """The k to split at: `k` itself, or the recommendation when `k` is None.

    `assessed` says whether an assessment was given at all (its `recommended` may still be None).
    Refuses (`ShallowPartitionPoint`) a `k` shallower than `recommended` unless `force`.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise UserInputError(f"{names.k}{k!r}: a partition point is an integer layer count")
    if k is None:
        if not assessed:
            raise UserInputError(f"give the partition point with {names.k_hint}, or an assessment with "
                                 f"{names.assessment_hint}")
        if recommended is None:
            raise UserInputError(f"{source}: the assessment recommends no partition point; choose one with "
                                 f"{names.k_hint}")
        return recommended
    if recommended is not None and k < recommended and not force:
        raise ShallowPartitionPoint(f"{names.k}{k} is shallower than the assessment's recommended point "
                                    f"{recommended} (its IR leaks by that assessment); pass {names.force} to "
                                    "override", k, recommended)
    return k
