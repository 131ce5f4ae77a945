"""INT8 PTQ on a tiny ONNX model: ONNX Runtime U8S8 keeps accuracy, ModelOpt makes S8 Q/DQ, caches are keyed."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from course_utils.core.artifacts import PtqRecord
from course_utils.core.config import CourseConfig, load_config
from course_utils.core.downloads import sha256_file
from course_utils.core.ledger import Ledger, LedgerError
from course_utils.deploy import ptq
from course_utils.deploy.calibration import CalibrationSet
from course_utils.deploy.ptq import QuantizationError, Recipe, VariantResult
from course_utils.deploy.tensorrt_engines import EngineBuildError, Gpu, OnnxModel
from course_utils.lessons import exercises

SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    """A small ReLU6 conv net with a dynamic batch, exported like the course model."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 4)).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(net, torch.randn(2, 3, SIZE, SIZE), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return OnnxModel.from_path(path, input_size=SIZE)


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def calibration() -> CalibrationSet:
    return CalibrationSet((), images(16, 0), batch_size=4, seed=0)


@pytest.fixture
def quick(tmp_path: Path) -> CourseConfig:
    """The smoke spec in a throwaway workspace, with the shortest benchmark."""
    return load_config("smoke", {"workspace": str(tmp_path / "workspace"), "benchmark.warmup": 0,
                                 "benchmark.iterations": 2}, environ={})


def fp32_labels(model: OnnxModel, data: np.ndarray) -> np.ndarray:
    from course_utils.deploy.runtimes import OrtRunner

    with OrtRunner(model.path) as runner:
        return runner.run(data).argmax(-1)


def qdq_nodes(path: Path) -> tuple[dict[str, int], set[int]]:
    """Q/DQ node counts and the element types of the Q/DQ zero points."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    counts = {op: sum(n.op_type == op for n in graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"}
    zero_points = [n.input[2] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    tensors = [inits.get(name) or consts.get(name) for name in zero_points]
    types = {t.data_type for t in tensors if t is not None}
    nonzero = any(numpy_helper.to_array(t).any() for t in tensors if t is not None)
    return counts | {"nonzero_zero_points": int(nonzero)}, types


def test_recipes_name_the_runtime_they_are_for() -> None:
    quant = load_config("default", environ={}, overrides={"quant": {"methods": ["minmax", "entropy", "percentile"]}}).quant
    recipes = ptq.course_recipes(quant)
    assert [r.name for r in recipes] == ["ort-u8s8-minmax", "ort-u8s8-entropy", "ort-u8s8-percentile",
                                         "ort-s8s8-minmax", "modelopt-max", "modelopt-entropy"]
    assert [r.target for r in recipes] == ["cpu"] * 3 + ["tensorrt"] * 3
    with pytest.raises(QuantizationError, match="no calibration method"):
        Recipe("onnxruntime", "max")
    with pytest.raises(QuantizationError, match="TensorRT only"):
        Recipe("modelopt", "max", "u8", "cpu")


def test_onnxruntime_u8s8_keeps_accuracy_and_is_reused(tiny: OnnxModel, calibration: CalibrationSet,
                                                        quick: CourseConfig, tmp_path: Path) -> None:
    from onnx import TensorProto

    val = images(48, 1)
    labels = fp32_labels(tiny, val)
    fp32, reference = ptq.measure_fp32(tiny, val, labels, quick)
    made = ptq.quantize(tiny, Recipe("onnxruntime", "minmax"), calibration, tmp_path)
    counts, types = qdq_nodes(made.path)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0 and TensorProto.UINT8 in types
    result = ptq.measure_int8(made, val, labels, quick, reference)
    assert (result.name, result.tool, result.target, result.calibration_images) == (
        "ort-u8s8-minmax", "onnxruntime", "cpu", 16)
    assert fp32.val_top1 == 1.0 and result.agreement_with_fp32 >= 0.9 and result.top1_drop_vs_fp32 <= 0.1
    assert result.latency_ms_b1 > 0 and result.latency_ms_b8 > 0 and result.size_mb > 0
    assert not made.reused and made.calibration_images == 16
    again = ptq.quantize(tiny, Recipe("onnxruntime", "minmax"), calibration, tmp_path)
    assert again.reused and again.path == made.path
    fewer = ptq.quantize(tiny, Recipe("onnxruntime", "minmax"), calibration.head(8), tmp_path)
    assert fewer.path != made.path and not fewer.reused
    made.path.write_bytes(made.path.read_bytes() + b"\0")  # tampered: the sidecar's hash no longer matches
    assert not ptq.quantize(tiny, Recipe("onnxruntime", "minmax"), calibration, tmp_path).reused


def test_tensorrt_style_s8_activations_are_symmetric(tiny: OnnxModel, calibration: CalibrationSet,
                                                     tmp_path: Path) -> None:
    from onnx import TensorProto

    made = ptq.quantize(tiny, Recipe("onnxruntime", "minmax", "s8"), calibration, tmp_path)
    counts, types = qdq_nodes(made.path)
    assert types == {TensorProto.INT8} and counts["nonzero_zero_points"] == 0


def test_modelopt_makes_symmetric_s8_qdq_and_leaves_its_input_alone(tiny: OnnxModel, calibration: CalibrationSet,
                                                                    tmp_path: Path) -> None:
    from onnx import TensorProto

    from course_utils.deploy.runtimes import OrtRunner

    before = sha256_file(tiny.path)
    made = ptq.quantize(tiny, Recipe("modelopt", "max", "s8", "tensorrt"), calibration, tmp_path)
    assert sha256_file(tiny.path) == before
    counts, types = qdq_nodes(made.path)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    assert types == {TensorProto.INT8} and counts["nonzero_zero_points"] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work files left behind
    val = images(16, 2)
    with OrtRunner(made.path) as int8, OrtRunner(tiny.path) as fp32:
        assert (int8.run(val).argmax(-1) == fp32.run(val).argmax(-1)).mean() >= 0.85
    # ModelOpt runs in its own process: ONNX Runtime's quantizer here still works after it (it patches ORT).
    assert ptq.quantize(tiny, Recipe("onnxruntime", "entropy"), calibration, tmp_path).path.exists()
    assert "--calibration_eps" in ptq.modelopt_command(tiny.path, made.path, tmp_path, "max", "images", (4, 3, 8, 8))


def test_the_tensorrt11_copy_has_fp16_between_the_qdq_pairs(tiny: OnnxModel, calibration: CalibrationSet,
                                                            quick: CourseConfig, tmp_path: Path) -> None:
    from course_utils.deploy.tensorrt_engines import qdq_high_precision

    val = images(4, 2)
    fp32 = ptq.measure_int8(ptq.quantize(tiny, Recipe("modelopt", "max", "s8", "tensorrt"), calibration, tmp_path),
                            val, np.zeros(4, int), quick, np.zeros(4, int), latency=False)
    fp16 = ptq.tensorrt_fp16_qdq(tiny, [fp32], calibration, tmp_path)
    assert fp16 is not None and fp16.recipe.name == "modelopt-max-fp16" and fp16.path != fp32.path
    assert (qdq_high_precision(fp32.path), qdq_high_precision(fp16.path)) == ("fp32", "fp16")
    assert ptq.tensorrt_fp16_qdq(tiny, [], calibration, tmp_path) is None  # no ModelOpt variant, no copy
    with pytest.raises(QuantizationError, match="FP16 is ModelOpt's"):
        Recipe("onnxruntime", "minmax", high_precision="fp16")


def result(name: str, top1: float, agreement: float, b8: float, target: str = "cpu",
           tool: str = "onnxruntime") -> VariantResult:
    return VariantResult(name, tool, target, Path(f"{name}.onnx"), top1, 0.9 - top1, agreement, 1.0, b8, 1.0, 16)


def test_best_models_and_ledger_figures(tmp_path: Path) -> None:
    variants = [result("slow", 0.9, 1.0, 50), result("fast", 0.9, 1.0, 20), result("better", 0.92, 0.97, 30),
                result("modelopt-max", 0.95, 0.99, 90, "tensorrt", "modelopt"),
                result("ort-s8s8-minmax", 0.96, 1.0, 80, "tensorrt")]
    assert ptq.best_cpu_variant(variants).name == "better"
    assert ptq.best_cpu_variant(variants[:2]).name == "fast"
    assert ptq.best_tensorrt_variant(variants).name == "modelopt-max"
    assert ptq.best_tensorrt_variant(variants[:2]) is None
    with pytest.raises(QuantizationError, match="quant.methods"):
        ptq.best_cpu_variant(variants[3:])
    fp32 = result("fp32", 0.9, 1.0, 90, tool="fp32")
    calibration = CalibrationSet((), images(8, 0), 4, 0)
    metrics = ptq.ptq_metrics(fp32, variants, [{"calibration_images": 8, "val_top1": 0.9, "top1_drop_vs_fp32": 0.0,
                                                "agreement_with_fp32": 1.0}], "minmax", calibration)
    assert metrics["best_cpu_variant"] == "better" and metrics["tensorrt_qdq_variant"] == "modelopt-max"
    assert metrics["best_cpu_speedup_b8"] == 3.0 and metrics["variants"]["better"]["top1_drop_vs_fp32"] < 0
    Ledger(tmp_path).save(PtqRecord(metrics=metrics))  # an INT8 model better than FP32 is a negative drop: allowed
    with pytest.raises(LedgerError):
        Ledger(tmp_path).save(PtqRecord(metrics={"top1_drop_vs_fp32": -1.5}))  # a difference of fractions: [-1, 1]
    recorded = Ledger(tmp_path).load(PtqRecord)
    assert recorded is not None and recorded.metrics["ablation"]["8_images"]["val_top1"] == 0.9


def test_ablation_sizes_are_whole_batches_within_the_set() -> None:
    full = CalibrationSet((), images(20, 0), 4, 0)
    assert ptq.ablation_sizes([16, 64, None, 2, 5], full) == [4, 16, 20]


ORIN = Gpu("NVIDIA Jetson Orin Nano", "8.7")


def test_implicit_int8_plans_give_each_calibrator_its_own_cache(tiny: OnnxModel, calibration: CalibrationSet,
                                                                quick: CourseConfig) -> None:
    plans = ptq.implicit_int8_plans(tiny, calibration, quick, "10.3.0", ORIN)
    assert set(plans) == {"entropy", "minmax"}
    assert all(plan.calibration_cache.parent == quick.workspace / "engines" for plan in plans.values())
    caches = {plan.calibration_cache for plan in plans.values()}
    engines = {plan.engine_path for plan in plans.values()}
    assert len(caches) == 2 and len(engines) == 2
    for calibrator, plan in plans.items():
        key = ptq.calibration_key(tiny, calibrator, "10.3.0", calibration)
        assert plan.calibrator == calibrator and plan.calibrate and plan.calibration_cache.name == key.filename
        assert plan.engine_path.name.endswith(f"_{calibrator}-{key.digest}.engine")
    other_data = ptq.implicit_int8_plans(tiny, calibration.head(8), quick, "10.3.0", ORIN)
    assert other_data["entropy"].calibration_cache != plans["entropy"].calibration_cache
    assert other_data["entropy"].engine_path != plans["entropy"].engine_path
    with pytest.raises(EngineBuildError, match="Q/DQ"):
        ptq.implicit_int8_plans(tiny, calibration, quick, "11.0.0", ORIN)
    wrong_batch = CalibrationSet((), images(6, 0), 3, 0)
    with pytest.raises(QuantizationError, match="opt"):
        ptq.implicit_int8_plans(tiny, wrong_batch, quick, "10.3.0", ORIN)


def test_implicit_builds_hand_each_plan_the_calibration_set(tiny: OnnxModel, calibration: CalibrationSet,
                                                             quick: CourseConfig, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from course_utils.deploy import tensorrt_engines as te

    plans = ptq.implicit_int8_plans(tiny, calibration, quick, "10.3.0", ORIN)
    seen: list[tuple[str, Path, int]] = []
    monkeypatch.setattr(te, "build_engine", lambda plan, data: seen.append(
        (plan.calibrator, plan.calibration_cache, data.batches()[0]["images"].shape[0])) or plan.engine_path)
    builds = ptq.build_implicit_int8_engines(plans, calibration)
    assert [(c, p) for c, p, _ in seen] == [(c, plans[c].calibration_cache) for c in ("entropy", "minmax")]
    assert {batch for *_, batch in seen} == {quick.engine.batch_opt}
    assert builds == {c: plans[c].engine_path for c in plans}


def test_one_failed_calibrator_does_not_stop_the_other(tiny: OnnxModel, calibration: CalibrationSet,
                                                       quick: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.deploy import tensorrt_engines as te
    from course_utils.deploy.calibration import CalibrationError

    plans = ptq.implicit_int8_plans(tiny, calibration, quick, "10.3.0", ORIN)

    def build(plan: te.EnginePlan, data: CalibrationSet) -> Path:
        if plan.calibrator == "entropy":
            raise CalibrationError("the cache was made by TensorRT 8.5")
        return plan.engine_path

    monkeypatch.setattr(te, "build_engine", build)
    builds = ptq.build_implicit_int8_engines(plans, calibration)
    assert isinstance(builds["entropy"], CalibrationError) and builds["minmax"] == plans["minmax"].engine_path


def test_calibration_batch_is_the_last_profiles_opt(quick: CourseConfig) -> None:
    assert ptq.calibration_batch(quick) == quick.engine.batch_opt
    extra = quick.model_copy(update={"engine": quick.engine.model_copy(update={"extra_profiles": [(1, 2, 2)]})})
    assert ptq.calibration_batch(extra) == 2


def test_quantization_steps_exercise() -> None:
    assert not exercises.check_quantization_steps(None).passed
    assert not exercises.check_quantization_steps({"s8": 6 / 128, "u8": 6 / 256}).passed
    assert exercises.check_quantization_steps({"s8": 6 / 127, "u8": 6 / 255}).passed
    with pytest.raises(AssertionError):
        exercises.check_quantization_steps({"s8": 6 / 255, "u8": 6 / 127}, strict=True)


def test_recipe_options_name_the_variant_and_stay_onnxruntime_only() -> None:
    base = Recipe("onnxruntime", "minmax")
    assert Recipe("onnxruntime", "minmax", per_channel=False, quant_format="qoperator").name == \
        "ort-u8s8-minmax-per-tensor-qop"
    assert Recipe("onnxruntime", "minmax", prepare="ort-preprocess", reduce_range=True).name == \
        "ort-u8s8-minmax-reduce-range-ort-preprocess"
    kept = Recipe("onnxruntime", "minmax", keep_fp32=("a", "b"), label="slow")
    assert kept.name == "ort-u8s8-minmax-fp32-slow2" and ptq.key_digest(asdict(kept)) != ptq.key_digest(asdict(base))
    assert Recipe("onnxruntime", "minmax", extra=(("ForceQuantizeNoInputCheck", True),)).name.endswith(
        "ForceQuantizeNoInputCheck=True")
    with pytest.raises(QuantizationError, match="label="):
        Recipe("onnxruntime", "minmax", keep_fp32=("a",))
    with pytest.raises(QuantizationError, match="quantize_static"):
        Recipe("modelopt", "max", "s8", "tensorrt", per_channel=False)


@pytest.mark.parametrize("prepare", ["ort-preprocess", "ort-optimized", "onnxslim"])
def test_every_preparation_keeps_the_fp32_outputs(tiny: OnnxModel, prepare: str, tmp_path: Path) -> None:
    from course_utils.deploy.runtimes import OrtRunner

    prepared = ptq.prepare_fp32(tiny.path, prepare, tmp_path / "prepared.onnx")  # type: ignore[arg-type]
    assert prepared != tiny.path
    data = images(4, 3)
    with OrtRunner(prepared) as after, OrtRunner(tiny.path) as before:
        np.testing.assert_allclose(after.run(data), before.run(data), rtol=1e-4, atol=1e-5)
    assert ptq.prepare_fp32(tiny.path, "none", tmp_path / "unused.onnx") == tiny.path


def ops_of(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_qoperator_and_layers_kept_in_fp32(tiny: OnnxModel, calibration: CalibrationSet, tmp_path: Path) -> None:
    qop = ptq.quantize(tiny, Recipe("onnxruntime", "minmax", quant_format="qoperator"), calibration, tmp_path)
    assert "QLinearConv" in ops_of(qop.path) and "DequantizeLinear" in ops_of(qop.path)
    kinds = ptq.layer_kinds(tiny.path)
    depthwise = tuple(name for name, kind in kinds.items() if kind == "depthwise")
    kept = ptq.quantize(tiny, Recipe("onnxruntime", "minmax", keep_fp32=depthwise, label="depthwise"), calibration,
                        tmp_path)
    import onnx

    graph = onnx.load(str(kept.path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    convs = {node.name: node for node in graph.node if node.op_type == "Conv"}
    assert all(producers.get(convs[name].input[1]) != "DequantizeLinear" for name in depthwise)  # FP32 weights
    others = [node for name, node in convs.items() if name not in depthwise]
    assert others and all(producers.get(node.input[1]) == "DequantizeLinear" for node in others)


def test_the_layer_profile_names_each_layer_and_its_kind(tiny: OnnxModel, calibration: CalibrationSet,
                                                         tmp_path: Path) -> None:
    kinds = ptq.layer_kinds(tiny.path)
    assert sorted(kinds.values()) == ["depthwise", "fully connected", "pointwise", "stem"]
    made = ptq.quantize(tiny, Recipe("onnxruntime", "minmax"), calibration, tmp_path)
    times = ptq.layer_times(tiny.path, made.path, 2, SIZE, runs=3)
    assert [t.node for t in times if t.kind != "fully connected"] == [n for n, k in kinds.items()
                                                                      if k != "fully connected"]
    assert all(t.fp32_ms > 0 and t.int8_ms > 0 for t in times)
    assert ptq.layers_to_keep_fp32(times, min_gain=0.0) == ()
    assert ptq.layers_to_keep_fp32(times, min_gain=float("inf")) == tuple(t.node for t in times)
    summary = {row["kind"]: row for row in ptq.gains_by_kind(times)}
    assert sum(row["layers"] for row in summary.values()) == len(times)
    assert sum(row["share_of_int8_layer_time"] for row in summary.values()) == pytest.approx(1.0, abs=0.01)
    ops = ptq.time_by_op(ptq.node_times(made.path, 2, SIZE, runs=2))
    assert list(ops.values()) == sorted(ops.values(), reverse=True) and ops


def test_the_network_speedup_is_the_layers_total_time_in_fp32_over_int8() -> None:
    times = [ptq.LayerTime("dw", "depthwise", 4.0, 4.0), ptq.LayerTime("pw", "pointwise", 12.0, 3.0)]
    assert ptq.speedup_with(times) == pytest.approx(16 / 7)
    assert ptq.speedup_with(times, {"depthwise": 4.0}) == pytest.approx(16 / 4)  # every layer at 4x
    assert ptq.speedup_with(times, {"conv": 10.0}) == ptq.speedup_with(times)  # no such layer: no change


def test_the_cpu_model_is_chosen_on_dev_agreement_then_speed() -> None:
    def dev(name: str, val_top1: float, agreement: float, b8: float) -> VariantResult:
        return replace(result(name, val_top1, 1.0, b8), dev_agreement=agreement)

    variants = [dev("best-on-val", 0.99, 0.995, 30), dev("fast", 0.90, 0.99, 20), dev("fastest", 0.95, 0.98, 10)]
    assert ptq.best_cpu_variant(variants).name == "fast"  # the validation top-1 plays no part
    assert ptq.best_cpu_variant([dev("a", 0.9, 0.97, 10), dev("b", 0.9, 0.98, 30)]).name == "b"
    assert "dev_agreement_with_fp32" in variants[0].metrics() and "dev_agreement_with_fp32" not in \
        result("plain", 0.9, 1.0, 10).metrics()


def test_measure_int8_reports_the_dev_agreement(tiny: OnnxModel, calibration: CalibrationSet, quick: CourseConfig,
                                                tmp_path: Path) -> None:
    made = ptq.quantize(tiny, Recipe("onnxruntime", "minmax"), calibration, tmp_path)
    dev_images, dev_reference = ptq.dev_predictions(tiny, calibration, quick)
    assert dev_images.shape[0] == len(calibration) and dev_reference.shape == (len(calibration),)
    flipped = (dev_reference + 1) % 4  # FP32 "predicting" another class on every image: agreement 0
    measured = ptq.measure_int8(made, images(8, 1), np.zeros(8, int), quick, np.zeros(8, int), latency=False,
                                dev=(dev_images, flipped))
    assert measured.dev_agreement == 0.0
    same = ptq.measure_int8(made, images(8, 1), np.zeros(8, int), quick, np.zeros(8, int), latency=False,
                            dev=(dev_images, dev_reference))
    assert same.dev_agreement is not None and same.dev_agreement >= 0.8
