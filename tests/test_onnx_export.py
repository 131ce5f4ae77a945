"""Stage 04: ONNX export with a dynamic batch, the known traps, checked optimization steps, the cache."""

from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from course_utils.core.config import CourseConfig, load_config
from course_utils.core.ledger import Ledger
from course_utils.deploy import graph_optimize as go
from course_utils.deploy import onnx_export as ox
from course_utils.lessons import exercises
from course_utils.lessons.checks import ExerciseFailed
from course_utils.vision import zoo

SMALL = 64  # EfficientNet-Lite is fully convolutional: a small input keeps every export fast


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite0() -> zoo.Classifier:
    torch.manual_seed(0)
    model = zoo.load("efficientnet-lite0", pretrained=False)
    model.preprocessing = zoo.Preprocessing(SMALL, 73)
    return model


@pytest.fixture(scope="module")
def lite0_onnx(lite0: zoo.Classifier, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ox.export_onnx(lite0, tmp_path_factory.mktemp("lite0") / "raw.onnx", SMALL)


@pytest.fixture(scope="module")
def stage_config(tmp_path_factory: pytest.TempPathFactory) -> CourseConfig:
    return load_config("smoke", {"workspace": str(tmp_path_factory.mktemp("workspace"))}, environ={})


@pytest.fixture(scope="module")
def built(stage_config: CourseConfig, lite0: zoo.Classifier) -> ox.OnnxArtifacts:
    return ox.course_onnx(stage_config, model=lite0)


def _ops(path: Path) -> dict[str, int]:
    return go.graph_stats(path).ops


# ------------------------------------------------------------------------------------------ export


def test_cnn_export_has_named_dynamic_batch_and_matches_pytorch(lite0: zoo.Classifier, lite0_onnx: Path) -> None:
    model = onnx.load(str(lite0_onnx))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert ox.batch_dimension(lite0_onnx) == "batch"
    assert model.opset_import[0].version == 17
    parity = go.ParityChecker(lite0, SMALL).check(lite0_onnx)
    assert parity.passed and parity.batches == (1, 3, 8), parity
    assert 0 < parity.max_rel_diff <= go.PARITY_TOLERANCE


def test_dynamo_export_traced_at_batch_two_stays_dynamic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:  # torch < 2.5 (JetPack 6.0)
        with pytest.raises(ox.ExportError, match="needs torch 2.5.*export.exporter=torchscript"):
            ox.export_onnx(model, tmp_path / "dynamo.onnx", 16, exporter="dynamo", opset=18)
        return
    path = ox.export_onnx(model, tmp_path / "dynamo.onnx", 16, exporter="dynamo", opset=18)
    assert ox.batch_dimension(path) == "batch"
    assert onnx.load(str(path)).opset_import[0].version == 18
    assert go.ParityChecker(model, 16, batches=(1, 8)).check(path).passed
    assert ox.effective_opset("dynamo", 17) == 18 and ox.effective_opset("torchscript", 17) == 17


def test_trace_batch_of_one_is_refused(lite0: zoo.Classifier, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ox.export_onnx(lite0, tmp_path / "m.onnx", SMALL, trace_batch=1)


def test_static_batch_is_caught(lite0: zoo.Classifier, tmp_path: Path) -> None:
    path = tmp_path / "static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lite0, (torch.randn(1, 3, SMALL, SMALL),), str(path),
                          **ox.exporter_options("torchscript"), input_names=["images"], output_names=["logits"])
    with pytest.raises(ox.ExportError, match="static batch of 1"):
        ox.check_dynamic_batch(path)


def _tiny_swin() -> nn.Module:
    from course_utils.vision.compat import import_mmpretrain

    import_mmpretrain()
    from mmpretrain.models.backbones import SwinTransformer

    class TinySwin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            arch = {"embed_dims": 16, "depths": [2, 2], "num_heads": [2, 2]}
            self.backbone = SwinTransformer(arch=arch, img_size=32, window_size=4, out_indices=(1,))
            self.head = nn.Linear(32, 5)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(images)[-1].mean((2, 3)))

    torch.manual_seed(0)
    return TinySwin().eval()


def test_swin_export_matches_pytorch_at_batches_other_than_the_traced_one(tmp_path: Path) -> None:
    model = _tiny_swin()
    path = ox.export_onnx(model, tmp_path / "swin.onnx", 32)  # traced at batch 2, patched by export_onnx
    assert go.ParityChecker(model, 32, batches=(1, 3, 8)).check(path).passed


def test_unpatched_swin_export_is_silently_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trap the patch exists for: mmpretrain's own window_reverse bakes the traced batch in."""
    from mmpretrain.models.utils.attention import ShiftWindowMSA

    def original(windows: torch.Tensor, H: int, W: int, window_size: int) -> torch.Tensor:  # mmpretrain 1.2's
        B = int(windows.shape[0] / (H * W / window_size / window_size))
        x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)

    model = _tiny_swin()
    windows = torch.randn(3 * 4, 4, 4, 16)
    patched = ShiftWindowMSA.window_reverse(windows, 8, 8, 4)
    assert torch.equal(patched, original(windows, 8, 8, 4))  # same arithmetic in eager mode
    monkeypatch.setattr(ShiftWindowMSA, "window_reverse", staticmethod(original))
    path = tmp_path / "unpatched.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), **ox.exporter_options("torchscript"),
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    assert go.ParityChecker(model, 32, batches=(2,)).check(path).passed
    at_three = go.ParityChecker(model, 32, batches=(3,)).check(path)
    assert not at_three.passed and at_three.max_rel_diff > 100 * go.PARITY_TOLERANCE, at_three


def test_zero_outputs_are_refused_and_randomized() -> None:
    linear = nn.Linear(3 * 4 * 4, 5)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    model = nn.Sequential(nn.Flatten(), linear)
    with pytest.raises(ValueError, match="all zero"):
        go.ParityChecker(model, 4)
    ox.randomize_zero_weights(model)
    assert go.ParityChecker(model, 4).scale > 0


# ------------------------------------------------------------------------------------ optimization


def test_transformer_steps_keep_parity_and_never_add_nodes(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ox.randomize_zero_weights(zoo.load("deit-tiny", pretrained=False))
    raw = ox.export_onnx(model, tmp_path / "deit.onnx", 224)
    checker = go.ParityChecker(model, 224, batches=(3,))
    result = go.optimize_graph(raw, checker, tmp_path / "steps")
    assert result.raw.parity.passed  # type: ignore[union-attr]
    for record in result.singles:
        assert record.kept and record.parity.passed and record.stats.nodes < result.raw.stats.nodes, record  # type: ignore[union-attr]
    previous = result.raw.stats.nodes
    for record in result.pipeline:
        assert record.parity is not None and (record.kept == (record.parity.passed and record.stats.nodes <= previous))
        previous = record.stats.nodes if record.kept else previous
    assert result.chosen.stats.nodes <= min(r.stats.nodes for r in result.singles)
    assert result.chosen.stats.nodes < result.raw.stats.nodes / 2
    assert checker.check(result.chosen.path).passed  # type: ignore[arg-type]


def test_a_step_that_breaks_parity_or_adds_nodes_is_rolled_back(lite0: zoo.Classifier, lite0_onnx: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def scale_weights(model: onnx.ModelProto) -> onnx.ModelProto:
        first = model.graph.initializer[0]
        values = onnx.numpy_helper.to_array(first) * 2
        first.CopyFrom(onnx.numpy_helper.from_array(values, first.name))
        return model

    def add_identity(model: onnx.ModelProto) -> onnx.ModelProto:
        output = model.graph.output[0].name
        model.graph.node[-1].output[0] = "before_identity"
        model.graph.node.append(onnx.helper.make_node("Identity", ["before_identity"], [output]))
        return model

    monkeypatch.setitem(go.STEPS, "break", go.GraphStep("break", scale_weights, "test", "breaks parity"))
    monkeypatch.setitem(go.STEPS, "grow", go.GraphStep("grow", add_identity, "test", "adds a node"))
    records = go.run_steps(lite0_onnx, ["break", "grow", "onnxslim"], tmp_path, go.ParityChecker(lite0, SMALL))
    assert [(r.step, r.kept) for r in records] == [("break", False), ("grow", False), ("onnxslim", True)]
    assert records[0].note == "broke parity" and records[1].note == "added 1 nodes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [records[2].path.name]  # type: ignore[union-attr]


class _DynamicReshape(nn.Module):
    """Reshape targets computed from the batch size: Shape → Gather → Unsqueeze → Concat in the graph."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = images.reshape(images.shape[0], 3, 16).transpose(1, 2)
        return tokens.reshape(images.shape[0], 48)


class _AttentionKeyTranspose(nn.Module):
    """What the dynamo exporter writes for ``k.transpose(-2, -1)``: merge leading axes, transpose, split."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(-1, 4, 4).transpose(1, 2).reshape(-1, 3, 4, 4).flatten(1)


@pytest.mark.parametrize(("module", "removed"), [
    (_DynamicReshape(), lambda before, after: "Shape" in before and not {"Shape", "Gather", "Concat"} & set(after)),
    (_AttentionKeyTranspose(), lambda before, after: before["Reshape"] - after.get("Reshape", 0) == 2
     and after["Transpose"] == 1),
], ids=["constant-reshape-targets", "reshape-transpose-reshape"])
def test_course_passes_remove_what_they_promise(module: nn.Module, removed: Any, tmp_path: Path) -> None:
    model = nn.Sequential(module, nn.Linear(48, 5)).eval()
    raw = ox.export_onnx(model, tmp_path / "raw.onnx", 4)
    records = go.run_steps(raw, ["course-passes"], tmp_path, go.ParityChecker(model, 4))
    assert records[0].kept and records[0].parity.passed  # type: ignore[union-attr]
    assert removed(_ops(raw), records[0].stats.ops), (_ops(raw), records[0].stats.ops)


def test_external_data_past_the_threshold(lite0_onnx: Path, tmp_path: Path) -> None:
    target = go.save_onnx(onnx.load(str(lite0_onnx)), tmp_path / "big.onnx", external_data_threshold=0)
    data = tmp_path / "big.onnx.data"
    assert data.exists() and go.external_data_files(target) == [data]
    assert target.stat().st_size < data.stat().st_size
    assert go.graph_stats(target).size_bytes == target.stat().st_size + data.stat().st_size
    images = np.zeros((2, 3, SMALL, SMALL), np.float32)
    assert go.onnxruntime_session(target).run(None, {"images": images})[0].shape[0] == 2
    go.remove_onnx(target)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- the stage


def test_course_onnx_builds_then_reuses(built: ox.OnnxArtifacts, stage_config: CourseConfig,
                                        lite0: zoo.Classifier) -> None:
    assert not built.reused and built.parity.passed
    assert built.raw_path.exists() and built.optimized_path.exists()
    assert built.raw_path.parent.parent == stage_config.workspace / "onnx"
    assert built.nodes_optimized <= min(r["nodes"] for r in built.steps if r["run"] == "single" and r["kept"])
    assert sorted(p.name for p in built.raw_path.parent.iterdir()) == ["manifest.json", "optimized.onnx", "raw.onnx"]
    again = ox.course_onnx(stage_config, model=lite0)
    assert again.reused and again.key == built.key and again.optimized_path == built.optimized_path
    assert again.steps == built.steps


def test_cache_key_follows_weights_settings_and_tools(lite0: zoo.Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = ox.model_sha256(lite0)
    key = ox.artifact_key(digest, "torchscript", 17, SMALL)
    assert key == ox.artifact_key(digest, "torchscript", 17, SMALL)
    assert key != ox.artifact_key(digest, "dynamo", 18, SMALL)
    assert key != ox.artifact_key(digest, "torchscript", 18, SMALL)
    changed = zoo.load("efficientnet-lite0", pretrained=False)
    changed.load_state_dict(lite0.state_dict())
    assert ox.model_sha256(changed) == digest
    with torch.no_grad():
        next(changed.parameters())[0].add_(1e-3)
    assert ox.model_sha256(changed) != digest
    monkeypatch.setattr(ox, "tool_versions", lambda: {"onnxslim": "9.9.9"})
    assert ox.artifact_key(digest, "torchscript", 17, SMALL) != key


def test_stale_artifacts_are_rebuilt(built: ox.OnnxArtifacts, stage_config: CourseConfig, lite0: zoo.Classifier,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # One step instead of the whole pipeline keeps the rebuild quick; what is tested is that it happens.
    monkeypatch.setattr(ox, "optimize_graph", functools.partial(go.optimize_graph, pipeline=("onnxslim",), singles=()))
    built.optimized_path.unlink()
    rebuilt = ox.course_onnx(stage_config, model=lite0)
    assert not rebuilt.reused and rebuilt.optimized_path.exists() and rebuilt.key == built.key


def test_stage_metrics_fit_the_ledger(built: ox.OnnxArtifacts, stage_config: CourseConfig) -> None:
    from course_utils.core.artifacts import FileRef, OnnxRecord

    latency = ox.onnx_latency_ms(built.optimized_path, SMALL, stage_config, batches=(1, 8))
    assert set(latency) == {1, 8} and all(ms > 0 for ms in latency.values())
    metrics = ox.stage_metrics(built, latency)
    ledger = Ledger(stage_config.workspace)
    ledger.save(OnnxRecord(raw=FileRef.of(built.raw_path, stage_config.workspace),
                           optimized=FileRef.of(built.optimized_path, stage_config.workspace), source="given",
                           backbone=built.backbone, input_name=built.input_name, output_name=built.output_name,
                           input_size=built.input_size, made_from={"model": "abc"}, metrics=metrics))
    recorded = ledger.require(OnnxRecord, made_from={"model": "abc"})
    for key in ("nodes_raw", "nodes_optimized", "parity_max_abs_diff", "opset", "exporter", "latency_ms_b1",
                "latency_ms_b8"):
        assert key in recorded.metrics, key
    assert recorded.input_size == SMALL and recorded.metrics["opset"] == 17 and recorded.input_name == "images"
    assert recorded.optimized.resolve(stage_config.workspace) == built.optimized_path
    assert "| pipeline | onnxslim |" in ox.steps_markdown(built)
    assert ox.op_histogram_figure(built.stats("raw"), built.stats("optimized")).axes


def test_the_deployed_model_loads_by_its_kind(config: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.core.artifacts import DeployedModel, FileRef
    from course_utils.vision import deployment

    pruned = config.workspace / "models" / "pruned.pt"
    pruned.parent.mkdir(parents=True, exist_ok=True)
    pruned.write_bytes(b"weights")
    fake = types.ModuleType("course_utils.vision.prune")
    fake.load_pruned = lambda path: f"pruned model from {Path(path).name}"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "course_utils.vision.prune", fake)
    shipped = DeployedModel(kind="pruned", model=FileRef.of(pruned, config.workspace), backbone="lite0",
                            classes=["a", "b"], reason="it meets its target")
    assert deployment.load_model(shipped, config.workspace) == "pruned model from pruned.pt"


def test_exercise_checks(lite0_onnx: Path, built: ox.OnnxArtifacts) -> None:
    assert not exercises.check_batch_dimension(lite0_onnx, None).passed
    assert not exercises.check_batch_dimension(lite0_onnx, 1).passed
    assert exercises.check_batch_dimension(lite0_onnx, "batch", strict=True).passed
    with pytest.raises(ExerciseFailed):
        exercises.check_batch_dimension(lite0_onnx, 8, strict=True)
    sanitize = next(r for r in built.steps if r["run"] == "single" and r["step"] == "sanitize")
    delta = go.histogram_delta(built.stats("raw"), go.GraphStats(sanitize["nodes"], sanitize["ops"]))
    most = min(delta, key=lambda op: delta[op])
    assert exercises.check_most_folded_op(built, most, strict=True).passed
    assert not exercises.check_most_folded_op(built, "Conv").passed


def test_cli_has_the_export_command() -> None:
    from course_utils.cli import build_parser, cmd_export

    args = build_parser().parse_args(["export", "--rebuild", "--set", "export.exporter=dynamo"])
    assert args.func is cmd_export and args.rebuild
