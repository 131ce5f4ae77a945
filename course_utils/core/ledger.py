"""The results ledger: ``<workspace>/results.json``, a mapping stage -> measured figures.

Each stage records what it measured (metrics, sizes, timings, which assets and runtime it used);
later stages and the final report read it instead of scraping notebook outputs. Conventions:
accuracies are fractions in [0, 1] (differences of accuracies, keys with ``_drop`` or ``_delta``, in
[-1, 1]); times are seconds unless the key ends in ``_ms``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from course_utils.core.atomic import write_json_atomic

LEDGER_NAME = "results.json"


class LedgerError(ValueError):
    """A value that breaks the ledger's conventions."""


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
    """Read and update the results ledger of one workspace."""

    def __init__(self, workspace: str | Path) -> None:
        self.path = Path(workspace) / LEDGER_NAME

    def read(self) -> dict[str, dict[str, Any]]:
        """All stages' results (an empty mapping when nothing was recorded yet)."""
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise LedgerError(
                f"{self.path} is not valid JSON ({error}); move it aside and rerun the stages to rebuild it."
            ) from None

    def stage(self, stage: str) -> dict[str, Any]:
        """One stage's results, or an empty mapping."""
        return self.read().get(stage, {})

    def record(self, stage: str, metrics: Mapping[str, Any], replace: bool = False) -> None:
        """Merge ``metrics`` into ``stage`` (or replace the stage), stamp it, write atomically."""
        for key, value in metrics.items():
            _check(stage, key, value)
        data = self.read()
        entry = {} if replace else dict(data.get(stage, {}))
        entry.update(metrics)
        entry["recorded_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data[stage] = entry
        write_json_atomic(self.path, data)
