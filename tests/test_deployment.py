"""Notebook 03's deploy decision: the table it shows and the exercise that asks for it, from the ledger alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from course_utils.core.artifacts import (
    FileRef,
    FinetuneRecord,
    MissingArtifactError,
    PruneRecord,
    target_words,
)
from course_utils.core.config import CourseConfig
from course_utils.core.ledger import Ledger
from course_utils.lessons import exercises
from course_utils.vision.deployment import deploy_decision


def _file(workspace: Path, name: str) -> FileRef:
    path = workspace / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(name.encode())
    return FileRef.of(path, workspace)


def _pruned(config: CourseConfig, top1_after: float) -> None:
    """Notebook 02's and 03's records: a 0.9 top-1 model pruned to 44% fewer MACs at ``top1_after``."""
    ledger = Ledger(config.workspace)
    finetuned = ledger.save(FinetuneRecord(checkpoint=_file(config.workspace, "models/finetuned.pt"),
                                           backbone="efficientnet-lite0", dataset="package-textures", classes=["a", "b"]))
    drop = round(0.9 - top1_after, 4)
    meets = 0.44 >= config.prune.target_macs_reduction and drop <= config.prune.max_top1_drop
    ledger.save(PruneRecord(
        model=_file(config.workspace, "models/pruned.pt"), meets_target=meets, target=target_words(config.prune),
        macs_reduction=0.44, top1_drop=drop, made_from={"finetuned": finetuned.checkpoint.sha256},
        settings={"prune": config.prune.model_dump()},
        metrics={"ratio": 0.25, "val_top1_unpruned": 0.9, "val_top1_after_retrain": top1_after, "macs_before": 400e6,
                 "macs_after": 224e6, "latency_ms_b1_before": 20.0, "latency_ms_b1_after": 14.0,
                 "latency_ms_b8_before": 120.0, "latency_ms_b8_after": 80.0, "file_mb_before": 13.4,
                 "file_mb_after": 7.5}))


def test_the_decision_table_says_which_model_ships_and_why(config: CourseConfig) -> None:
    with pytest.raises(MissingArtifactError, match="notebook 03"):
        deploy_decision(config)
    _pruned(config, top1_after=0.7)
    unpruned, pruned, target = deploy_decision(config)
    assert (unpruned["val top-1"], unpruned["MACs"], unpruned["ships"]) == (0.9, 400e6, "yes")
    assert (pruned["val top-1"], pruned["CPU ms b8"], pruned["ships"]) == (0.7, 80.0, "no")
    assert target["val top-1"] == "-20.0 points" and target["MACs"] == "-44%"
    assert target["ships"].startswith("missed: the pruned model misses its target")


def test_the_exercise_asks_deployed_model(config: CourseConfig) -> None:
    _pruned(config, top1_after=0.9)
    assert deploy_decision(config)[1]["ships"] == "yes"
    assert exercises.check_deployed_kind("pruned", config).passed
    assert not exercises.check_deployed_kind("finetuned", config).passed
    assert not exercises.check_deployed_kind(None, config).passed
    with pytest.raises(AssertionError):
        exercises.check_deployed_kind("finetuned", config, strict=True)
