"""Typed stage records: which model ships, stale artifacts refused, and one network behind every app runtime.

The files here are stand-ins (a few bytes each): the records and the decisions built on them only care
about which file was made from which, by hash, so no model needs to be trained.
"""

from __future__ import annotations

import pytest

from course_utils.app import catalog
from course_utils.core.artifacts import (
    FileRef,
    FinetuneRecord,
    MissingArtifactError,
    OnnxRecord,
    PruneRecord,
    PtqRecord,
    StaleArtifactError,
)
from course_utils.core.config import CourseConfig
from course_utils.core.ledger import Ledger, deployed_model


def _file(config: CourseConfig, name: str, content: bytes) -> FileRef:
    path = config.workspace / "models" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return FileRef.of(path, config.workspace)


def _finetuned(config: CourseConfig, content: bytes = b"fine-tuned weights") -> FinetuneRecord:
    return Ledger(config.workspace).save(FinetuneRecord(
        checkpoint=_file(config, "finetuned.pt", content), backbone="efficientnet-lite0", dataset="ants-bees",
        classes=["ants", "bees"], metrics={"val_top1": 0.95}))


def _pruned(config: CourseConfig, made_from: FinetuneRecord, meets_target: bool) -> PruneRecord:
    return Ledger(config.workspace).save(PruneRecord(
        model=_file(config, "pruned.pt", b"pruned weights"), meets_target=meets_target,
        target="≥ 40% fewer MACs within 1 point", made_from={"finetuned": made_from.checkpoint.sha256},
        metrics={"val_top1_after_retrain": 0.94 if meets_target else 0.84}))


def _onnx(config: CourseConfig, model_sha256: str, content: bytes = b"onnx graph") -> OnnxRecord:
    path = config.workspace / "onnx" / "optimized.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    ref = FileRef.of(path, config.workspace)
    return Ledger(config.workspace).save(OnnxRecord(
        raw=ref, optimized=ref, source="finetuned", backbone="efficientnet-lite0", input_name="images",
        output_name="logits", input_size=224, made_from={"model": model_sha256}))


def _int8(config: CourseConfig, onnx: OnnxRecord) -> PtqRecord:
    path = config.workspace / "int8" / "u8s8.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"int8 graph")
    return Ledger(config.workspace).save(PtqRecord(cpu_int8=FileRef.of(path, config.workspace),
                                                   made_from={"onnx": onnx.optimized.sha256}))


def test_records_round_trip_with_workspace_relative_paths(config: CourseConfig) -> None:
    saved = _finetuned(config)
    loaded = Ledger(config.workspace).load(FinetuneRecord)
    assert loaded == saved and loaded.recorded_at
    assert loaded.checkpoint.path == "models/finetuned.pt"  # no machine path in the record
    assert loaded.checkpoint.resolve(config.workspace).read_bytes() == b"fine-tuned weights"


def test_a_missing_stage_names_the_notebook_and_command(config: CourseConfig) -> None:
    with pytest.raises(MissingArtifactError, match=r"notebook 02 \(`python -m course_utils train`\)"):
        deployed_model(Ledger(config.workspace))


def test_the_fine_tuned_model_ships_until_a_pruned_one_meets_its_target(config: CourseConfig) -> None:
    ledger = Ledger(config.workspace)
    finetuned = _finetuned(config)
    assert deployed_model(ledger).kind == "finetuned"
    assert "no pruning stage" in deployed_model(ledger).reason

    _pruned(config, finetuned, meets_target=False)
    shipped = deployed_model(ledger)
    assert shipped.kind == "finetuned" and shipped.sha256 == finetuned.checkpoint.sha256
    assert "misses its target" in shipped.reason

    pruned = _pruned(config, finetuned, meets_target=True)
    shipped = deployed_model(ledger)
    assert shipped.kind == "pruned" and shipped.sha256 == pruned.model.sha256


def test_a_pruned_model_of_an_older_fine_tune_never_ships(config: CourseConfig) -> None:
    ledger = Ledger(config.workspace)
    _pruned(config, _finetuned(config, b"first fine-tune"), meets_target=True)
    retrained = _finetuned(config, b"second fine-tune")
    shipped = deployed_model(ledger)
    assert shipped.kind == "finetuned" and shipped.sha256 == retrained.checkpoint.sha256
    assert "older fine-tuned model" in shipped.reason and "notebook 03" in shipped.reason


def test_an_artifact_made_from_another_model_is_refused_with_what_to_rerun(config: CourseConfig) -> None:
    from course_utils.deploy.tensorrt_engines import onnx_model

    ledger = Ledger(config.workspace)
    finetuned = _finetuned(config)
    _onnx(config, finetuned.checkpoint.sha256)
    assert onnx_model(config).sha256 == ledger.require(OnnxRecord).optimized.sha256
    _pruned(config, finetuned, meets_target=True)  # the pruned model ships now; the export is of the old one
    with pytest.raises(StaleArtifactError, match=r"another model .*notebook 04 \(`python -m course_utils export`\)"):
        onnx_model(config)


def test_a_file_changed_after_it_was_recorded_is_refused(config: CourseConfig) -> None:
    record = _finetuned(config)
    record.checkpoint.resolve(config.workspace).write_bytes(b"edited by hand")
    with pytest.raises(StaleArtifactError, match="changed since it was recorded.*notebook 02"):
        Ledger(config.workspace).require(FinetuneRecord)


def test_every_runtime_the_app_offers_runs_the_same_network(config: CourseConfig) -> None:
    finetuned = _finetuned(config)
    _onnx(config, finetuned.checkpoint.sha256)
    _int8(config, Ledger(config.workspace).require(OnnxRecord))
    course = next(choice for choice in catalog.model_choices(config) if choice.key == catalog.DEPLOYED)
    offered = catalog.runtime_choices(config, course)
    assert [r.key for r in offered] == ["pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"]
    assert {r.network_sha256 for r in offered} == {finetuned.checkpoint.sha256}

    # Pruning now meets its target: the course model is the pruned network, and the export (and the INT8
    # model made from it) are of the fine-tuned one, so the app offers PyTorch alone until they are rebuilt.
    pruned = _pruned(config, finetuned, meets_target=True)
    course = next(choice for choice in catalog.model_choices(config) if choice.key == catalog.DEPLOYED)
    assert course.network_sha256 == pruned.model.sha256 and course.kind == "pruned"
    assert [r.key for r in catalog.runtime_choices(config, course)] == ["pytorch_fp32"]

    _int8(config, _onnx(config, pruned.model.sha256, b"onnx of the pruned model"))
    offered = catalog.runtime_choices(config, course)
    assert [r.key for r in offered] == ["pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"]
    assert {r.network_sha256 for r in offered} == {pruned.model.sha256}


def test_an_int8_model_of_an_older_export_is_not_offered(config: CourseConfig) -> None:
    finetuned = _finetuned(config)
    _int8(config, _onnx(config, finetuned.checkpoint.sha256, b"first export"))
    _onnx(config, finetuned.checkpoint.sha256, b"second export, another opset")
    course = next(choice for choice in catalog.model_choices(config) if choice.key == catalog.DEPLOYED)
    assert [r.key for r in catalog.runtime_choices(config, course)] == ["pytorch_fp32", "onnxruntime_fp32"]


def test_the_report_says_which_model_shipped_and_why(config: CourseConfig) -> None:
    from course_utils.core.report import render_markdown

    _pruned(config, _finetuned(config), meets_target=False)
    markdown = render_markdown(Ledger(config.workspace))
    assert "Model shipped: the finetuned efficientnet-lite0 (finetuned.pt)" in markdown
    assert "misses its target" in markdown and str(config.workspace) not in markdown


def test_stages_refuse_to_start_without_their_upstream(config: CourseConfig) -> None:
    """No stage quietly runs an earlier stage's work: each names the notebook that makes its input."""
    from course_utils.deploy import onnx_export
    from course_utils.vision import prune

    with pytest.raises(MissingArtifactError, match="notebook 02"):
        onnx_export.run(config)
    with pytest.raises(MissingArtifactError, match="notebook 02"):
        prune.run(config)
    assert not (config.workspace / "train").exists()


def test_the_report_marks_sections_made_from_an_older_upstream(config: CourseConfig) -> None:
    from course_utils.core.report import render_markdown

    finetuned = _finetuned(config)
    _onnx(config, finetuned.checkpoint.sha256)
    assert "stale" not in render_markdown(Ledger(config.workspace))
    _pruned(config, finetuned, meets_target=True)
    markdown = render_markdown(Ledger(config.workspace))
    onnx_section = markdown[markdown.index("04 · ONNX"):]
    assert "⚠ stale" in onnx_section and "another model" in onnx_section and "notebook 04" in onnx_section


def test_a_spec_that_changed_the_backbone_makes_the_fine_tuned_model_stale(config: CourseConfig) -> None:
    _finetuned(config)
    other = config.model_copy(update={"model": config.model.model_copy(update={"backbone": "mobilenet-v2"})})
    assert deployed_model(Ledger(config.workspace), config).kind == "finetuned"
    with pytest.raises(StaleArtifactError, match="spec asks for mobilenet-v2.*notebook 02"):
        deployed_model(Ledger(config.workspace), other)


def test_consumers_of_the_current_pipeline_check_the_upstream_themselves(config: CourseConfig) -> None:
    """``require`` without ``made_from`` compares against what the ledger holds now."""
    ledger = Ledger(config.workspace)
    finetuned = _finetuned(config)
    onnx = _onnx(config, finetuned.checkpoint.sha256)
    _int8(config, onnx)
    assert ledger.require(PtqRecord).made_from == {"onnx": onnx.optimized.sha256}
    _onnx(config, finetuned.checkpoint.sha256, b"a new export")
    with pytest.raises(StaleArtifactError, match="another onnx.*notebook 06"):
        ledger.require(PtqRecord)
    assert ledger.current(PtqRecord) is None


def test_a_pruning_verdict_made_under_other_targets_asks_for_a_rerun(config: CourseConfig) -> None:
    record = _pruned(config, _finetuned(config), meets_target=False)
    record.settings = {"prune": config.prune.model_dump()}
    Ledger(config.workspace).save(record)
    assert deployed_model(Ledger(config.workspace), config).kind == "finetuned"
    lenient = config.model_copy(update={"prune": config.prune.model_copy(update={"max_top1_drop": 0.2})})
    with pytest.raises(StaleArtifactError, match="other targets.*notebook 03"):
        deployed_model(Ledger(config.workspace), lenient)
