"""The results ledger: ``<workspace>/results.json``, one typed record per stage (``course_utils.core.artifacts``).

Each stage saves what it made and measured; later stages, the CLI, the app and the report read those
records instead of scraping notebook outputs or guessing paths. Only this module knows the file's layout::

    ledger = Ledger(config.workspace)
    ledger.save(FinetuneRecord(checkpoint=..., backbone=..., ...))
    onnx = ledger.require(OnnxRecord)  # made from the model that ships now, else StaleArtifactError

Writes are atomic and serialised by a file lock, so the app and a notebook may record at the same time.
Metric conventions: accuracies are fractions in [0, 1] (differences, keys with ``_drop`` or ``_delta``, in
[-1, 1]); times are seconds unless the key ends in ``_ms``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from pydantic import ValidationError

from course_utils.core.artifacts import (
    DeployedModel,
    FinetuneRecord,
    MissingArtifactError,
    OnnxRecord,
    PruneRecord,
    StageRecord,
    StaleArtifactError,
    rerun_hint,
    target_words,
)
from course_utils.core.atomic import write_json_atomic
from course_utils.core.config import CourseConfig
from course_utils.core.errors import CourseError

LEDGER_NAME = "results.json"
LOG = logging.getLogger(__name__)
R = TypeVar("R", bound=StageRecord)


class LedgerError(CourseError, ValueError):
    """A value that breaks the ledger's conventions, or a ledger file that cannot be read."""


def _check(stage: str, key: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for sub_key, sub_value in value.items():
            _check(stage, f"{key}.{sub_key}", sub_value)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise LedgerError(f"{stage}.{key} is {value}: record a finite number or leave the key out.")
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low = -1.0 if "_drop" in leaf or "_delta" in leaf else 0.0  # a difference of two accuracies may be negative
        if ("top1" in leaf or leaf.endswith(("_accuracy", "_rate"))) and not low <= value <= 1.0:
            raise LedgerError(f"{stage}.{key} = {value}: accuracies and rates are fractions in [0, 1] "
                              "(their differences, keys with _drop or _delta, in [-1, 1]).")


class Ledger:
    """Save and load the typed stage records of one workspace."""

    def __init__(self, workspace: str | Path) -> None:
        self.workspace = Path(workspace)
        self.path = self.workspace / LEDGER_NAME
        self._lock = FileLock(str(self.path) + ".lock")

    def read(self) -> dict[str, dict[str, Any]]:
        """Every stored record as plain data, by stage (an empty mapping when nothing was recorded yet)."""
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise LedgerError(
                f"{self.path} is not valid JSON ({error}); move it aside and rerun the stages to rebuild it."
            ) from None

    def save(self, record: R) -> R:
        """Stamp ``record`` and store it as its stage's entry (replacing the previous one); return it."""
        stage = type(record).stage
        if not stage:
            raise LedgerError(f"{type(record).__name__} names no stage: subclass a record of course_utils.core.artifacts.")
        for key, value in record.metrics.items():
            _check(stage, key, value)
        record.recorded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.workspace.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = self.read()
            data[stage] = record.model_dump(mode="json")
            write_json_atomic(self.path, data)
        return record

    def load(self, kind: type[R]) -> R | None:
        """The stored record of ``kind``'s stage, or None (also when it was written by an older course)."""
        raw = self.read().get(kind.stage)
        if raw is None:
            return None
        try:
            return kind.model_validate(raw)
        except ValidationError:
            return None

    def require(self, kind: type[R], made_from: Mapping[str, str] | None = None) -> R:
        """The record of ``kind`` with its files intact and made from the current upstream artifacts.

        Each ``made_from`` role is checked against ``made_from`` when given, else against what the ledger
        holds now (``current_upstream``). Raises ``MissingArtifactError`` (no such record, or one an older
        course wrote) or ``StaleArtifactError`` (a file gone or changed, or made from another upstream),
        each naming the notebook or command to rerun.
        """
        record = self.load(kind)
        if record is None:
            older = kind.stage in self.read()
            raise MissingArtifactError(
                f"No {kind.stage} artifacts in {self.workspace}"
                + (" this course version can read (an older course wrote them)" if older else "")
                + f": {rerun_hint(kind)} first.")
        for role, ref in record.files().items():
            if (problem := ref.problem(self.workspace)) is not None:
                raise StaleArtifactError(f"The {kind.stage} stage's {role}: {problem}; {rerun_hint(kind)} again.")
        expected = dict(made_from) if made_from is not None else self.current_upstream(record.made_from)
        for role, wanted in expected.items():
            if record.made_from.get(role) != wanted:
                raise StaleArtifactError(
                    f"The {kind.stage} artifacts were made from another {role} "
                    f"({record.made_from.get(role, 'unknown')[:12]}…) than the current one ({wanted[:12]}…): "
                    f"{rerun_hint(kind)} again.")
        return record

    def current(self, kind: type[R], made_from: Mapping[str, str] | None = None) -> R | None:
        """``require``, or None where it would raise: for consumers that simply leave out what is not current."""
        try:
            return self.require(kind, made_from)
        except MissingArtifactError:
            return None
        except StaleArtifactError as why:  # worth a word: the user may expect it to be used
            LOG.warning("Left out: %s", why)
            return None

    def current_upstream(self, roles: Mapping[str, str]) -> dict[str, str]:
        """What each of ``roles`` (``finetuned``, ``model``, ``onnx``) hashes to now; a role with no current
        artifact maps to ``"none"``, so anything made from an earlier one is stale."""
        found: dict[str, str] = {}
        for role in roles:
            try:
                if role == "finetuned":
                    found[role] = self.require(FinetuneRecord).checkpoint.sha256
                elif role == "model":
                    found[role] = deployed_model(self).sha256
                elif role == "onnx":
                    found[role] = self.require(OnnxRecord).optimized.sha256
            except (MissingArtifactError, StaleArtifactError):
                found[role] = "none"
        return found

    def stale_reason(self, record: StageRecord) -> str | None:
        """Why ``record`` no longer describes the current pipeline (made from an older upstream), or None."""
        try:
            self.require(type(record))
        except StaleArtifactError as why:
            return str(why)
        except MissingArtifactError:
            return None
        return None

    def records(self) -> dict[str, StageRecord]:
        """Every record this course version can read, by stage name (the file's keys are sorted)."""
        loaded = {}
        for stage in self.read():
            kind = StageRecord.registry.get(stage)
            if kind is not None and (record := self.load(kind)) is not None:
                loaded[stage] = record
        return loaded


def finetuned_model(ledger: Ledger, config: CourseConfig | None = None) -> FinetuneRecord:
    """The fine-tuning stage's record; with ``config``, stale when the spec now names another backbone."""
    finetuned = ledger.require(FinetuneRecord)
    if config is not None and finetuned.backbone != config.model.backbone:
        raise StaleArtifactError(
            f"The fine-tuned model is a {finetuned.backbone} but the spec asks for {config.model.backbone} "
            f"(model.backbone): {rerun_hint(FinetuneRecord)} again.")
    return finetuned


def deployed_model(ledger: Ledger, config: CourseConfig | None = None) -> DeployedModel:
    """The one answer to "which model ships": every deployment stage, the CLI, the app and the report ask here.

    The pruned model ships only when the pruning stage was made from the current fine-tuned checkpoint and
    met its target; otherwise the fine-tuned model ships, and ``reason`` says why. With ``config``, a
    fine-tuned model of another backbone than the spec names, or a pruning verdict made under other targets,
    is stale: the spec changed since, and the error names the notebook to rerun.
    """
    finetuned = finetuned_model(ledger, config)
    pruned = ledger.load(PruneRecord)
    if pruned is None:
        reason = "no pruning stage has run, so the fine-tuned model ships"
    elif pruned.made_from.get("finetuned") != finetuned.checkpoint.sha256:
        reason = (f"the pruned model was made from an older fine-tuned model; the fine-tuned model ships "
                  f"({rerun_hint(PruneRecord)} to prune the current one)")
    elif (problem := pruned.model.problem(ledger.workspace)) is not None:
        reason = f"the pruned model's file is unusable ({problem}); the fine-tuned model ships"
    elif config is not None and _targets(pruned.settings.get("prune")) not in (None, _targets(config.prune.model_dump())):
        raise StaleArtifactError(f"The pruned model was judged against other targets ({pruned.target}) than the "
                                 f"spec's ({target_words(config.prune)}): {rerun_hint(PruneRecord)} again "
                                 "(its runs are cached).")
    elif not pruned.meets_target:
        reason = (f"the pruned model misses its target ({pruned.target}: {pruned.macs_reduction:.0%} fewer MACs, "
                  f"top-1 {pruned.top1_drop * 100:.1f} points below the unpruned model), so the fine-tuned "
                  "model ships")
    else:
        return DeployedModel(kind="pruned", model=pruned.model, backbone=finetuned.backbone,
                             classes=finetuned.classes, reason=f"the pruned model meets its target ({pruned.target})")
    return DeployedModel(kind="finetuned", model=finetuned.checkpoint, backbone=finetuned.backbone,
                         classes=finetuned.classes, reason=reason)


def _targets(prune_settings: Mapping[str, Any] | None) -> tuple[Any, Any] | None:
    if not prune_settings:
        return None
    return prune_settings.get("target_macs_reduction"), prune_settings.get("max_top1_drop")

