"""Engine planning without TensorRT: profiles, routes per version, names, caches, commands, errors."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from course_utils.core.artifacts import FileRef, PtqRecord
from course_utils.core.config import CourseConfig, load_config
from course_utils.core.ledger import Ledger
from course_utils.deploy import tensorrt_engines as te
from course_utils.deploy.tensorrt_engines import (
    BatchProfile,
    CacheKey,
    EngineBuildError,
    Gpu,
    OnnxModel,
    build_route,
    engine_filename,
    plan_engine,
)
from course_utils.lessons import exercises

ORIN = Gpu("NVIDIA Jetson Orin Nano", "8.7")
RTX = Gpu("NVIDIA GeForce RTX 4090", "8.9")
SHA = "ab" * 32


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv net exported with a dynamic batch, like the course's model but tiny."""
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    torch.onnx.export(net, torch.randn(2, 3, 32, 32), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def model(tmp_path: Path, sha: str = SHA) -> OnnxModel:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx bytes")
    return OnnxModel(path, sha, input_size=224)


def plan(tmp_path: Path, precision: str, version: str, config: CourseConfig | None = None, **kwargs: object
         ) -> te.EnginePlan:
    engine = (config or load_config("smoke", environ={})).engine
    return plan_engine(model(tmp_path), precision, build_route(version), ORIN, engine, tmp_path / "engines",
                       **kwargs)  # type: ignore[arg-type]


def test_profile_shapes_and_tag() -> None:
    profile = BatchProfile(1, 4, 8)
    assert profile.shapes(224) == {"min": (1, 3, 224, 224), "opt": (4, 3, 224, 224), "max": (8, 3, 224, 224)}
    assert profile.tag == "b1-4-8"
    with pytest.raises(EngineBuildError, match="min <= opt <= max"):
        BatchProfile(4, 2, 8)


def test_profiles_from_config_include_extra_profiles() -> None:
    config = load_config("smoke", {"engine.extra_profiles": [[1, 1, 1]]}, environ={})
    assert te.batch_profiles(config.engine) == (BatchProfile(1, 4, 8), BatchProfile(1, 1, 1))


@pytest.mark.parametrize(("version", "flags", "implicit", "typed", "level", "deprecations"), [
    ("8.5.2", True, True, False, False, 0),
    ("10.3.0", True, True, False, True, 1),
    ("10.13.0.35", True, True, False, True, 2),
    ("11.0.0", False, False, True, True, 0),
])
def test_route_per_version(version: str, flags: bool, implicit: bool, typed: bool, level: bool,
                           deprecations: int) -> None:
    route = build_route(version)
    assert (route.precision_flags, route.implicit_int8, route.strongly_typed) == (flags, implicit, typed)
    assert route.optimization_level is level
    assert len(route.deprecated) == deprecations
    assert version in route.explain()


def test_route_sources_and_explanations() -> None:
    assert build_route("8.5.2").source("int8") == "fp32-onnx"
    # ModelOpt's Q/DQ is opset 19; TensorRT 8.5/8.6's parser reads up to 17: calibrate implicitly there.
    assert build_route("8.5.2").source("int8", have_qdq=True) == "fp32-onnx"
    assert build_route("8.6.1").source("int8", have_qdq=True) == "fp32-onnx"
    assert build_route("10.3.0").source("int8", have_qdq=True) == "qdq-onnx"
    assert "opset 17 at most" in build_route("8.5.2").explain()
    assert build_route("11.0.0").qdq_high_precision == "fp16" and build_route("10.3.0").qdq_high_precision == "fp32"
    assert "FP16 between the Q/DQ" in build_route("11.0.0").explain()
    assert build_route("11.0.0").source("fp16") == "autocast-fp16-onnx"
    assert build_route("11.0.0").source("int8") == "qdq-onnx"
    assert "no builder optimization level" in build_route("8.5.2").explain()
    assert "AutoCast" in build_route("11.0.0").explain() and "Q/DQ" in build_route("11.0.0").explain()
    assert build_route("10.3").generation == "10.x" and build_route("8.6.2").generation == "8.6"


def test_unsupported_and_malformed_versions() -> None:
    with pytest.raises(EngineBuildError, match="older than the course supports"):
        build_route("8.4.1")
    with pytest.raises(EngineBuildError, match="not a TensorRT version"):
        build_route("latest")
    assert te.parse_version("11.0.0rc1") == (11, 0, 0)


def test_engine_file_name_has_every_part() -> None:
    profiles = (BatchProfile(1, 4, 8),)
    name = engine_filename(SHA, "fp16", profiles, ORIN, "10.3.0.30", "12.6")
    assert name == f"{SHA[:12]}_fp16_b1-4-8_nvidia-jetson-orin-nano-sm87_trt10.3.0.30_cu12.6.engine"
    others = {engine_filename("cd" * 32, "fp16", profiles, ORIN, "10.3.0.30", "12.6"),
              engine_filename(SHA, "int8", profiles, ORIN, "10.3.0.30", "12.6"),
              engine_filename(SHA, "fp16", (BatchProfile(1, 1, 1),), ORIN, "10.3.0.30", "12.6"),
              engine_filename(SHA, "fp16", profiles, RTX, "10.3.0.30", "12.6"),
              engine_filename(SHA, "fp16", profiles, ORIN, "8.5.2", "12.6"),
              engine_filename(SHA, "fp16", profiles, ORIN, "10.3.0.30", "13")}
    assert name not in others and len(others) == 6


def test_timing_cache_keys_and_invalidation(tmp_path: Path) -> None:
    key = CacheKey.of(ORIN, "10.3.0")
    cache = tmp_path / key.filename
    assert te.timing_cache_state(cache, key) == "missing"
    cache.write_bytes(b"tactic timings")
    assert te.timing_cache_state(cache, key) == "unverified"  # copied in, no sidecar
    te.seal_timing_cache(cache, key)
    assert te.timing_cache_state(cache, key) == "valid"
    assert te.timing_cache_state(cache, CacheKey.of(RTX, "10.3.0")) == "foreign"
    assert te.timing_cache_state(cache, CacheKey.of(ORIN, "10.13.0")) == "foreign"
    assert te.timing_cache_state(cache, CacheKey.of(ORIN, "10.3.0", cuda="13")) == "foreign"  # tensorrt-cu13
    assert te.timing_cache_state(cache, CacheKey.of(ORIN, "10.3.0", tf32=True)) == "foreign"
    names = {k.filename for k in (key, CacheKey.of(RTX, "10.3.0"), CacheKey.of(ORIN, "8.5.2"),
                                  CacheKey.of(ORIN, "10.3.0", cuda="13"), CacheKey.of(ORIN, "10.3.0", tf32=True))}
    assert len(names) == 5
    cache.write_bytes(b"tampered")
    assert te.timing_cache_state(cache, key) == "modified"


def test_a_foreign_cache_is_deleted_and_a_valid_one_kept(tmp_path: Path) -> None:
    key = CacheKey.of(ORIN, "10.3.0")
    cache = tmp_path / key.filename
    cache.write_bytes(b"timings")
    te.seal_timing_cache(cache, CacheKey.of(RTX, "10.3.0"))
    assert te.prepare_timing_cache(cache, key) == "foreign"
    assert not cache.exists() and not Path(f"{cache}.json").exists()
    cache.write_bytes(b"timings")
    te.seal_timing_cache(cache, key)
    assert te.prepare_timing_cache(cache, key) == "valid" and cache.exists()


def test_engine_reuse_needs_matching_sidecar(tmp_path: Path) -> None:
    fp16 = plan(tmp_path, "fp16", "10.3.0")
    assert not te.reusable_engine(fp16)
    fp16.engine_path.parent.mkdir(parents=True)
    fp16.engine_path.write_bytes(b"engine")
    te.record_engine(fp16, 1.5)
    assert te.reusable_engine(fp16)
    slower = plan(tmp_path, "fp16", "10.3.0", load_config("smoke", {"engine.optimization_level": 5}, environ={}))
    assert slower.engine_path == fp16.engine_path and not te.reusable_engine(slower)
    other_model = plan_engine(model(tmp_path, "cd" * 32), "fp16", build_route("10.3.0"), ORIN,
                              load_config("smoke", environ={}).engine, tmp_path / "engines")
    assert other_model.engine_path != fp16.engine_path and not te.reusable_engine(other_model)
    fp16.engine_path.write_bytes(b"corrupted engine")
    assert not te.reusable_engine(fp16)


def test_plans_follow_the_route(tmp_path: Path, qdq_onnx: Callable[[Path, str], Path]) -> None:
    old = plan(tmp_path, "fp16", "8.5.2")
    assert (old.fp16_flag, old.int8_flag, old.optimization_level, old.source_kind) == (True, False, None, "fp32-onnx")
    calibrated = plan(tmp_path, "int8", "10.3.0", calibration_images=8)
    assert calibrated.calibrate and calibrated.int8_flag and calibrated.fp16_flag
    assert calibrated.calibration_cache is not None and "entropy-8img" in calibrated.calibration_cache.name
    qdq, qdq_fp16 = qdq_onnx(tmp_path / "qdq.onnx", "fp32"), qdq_onnx(tmp_path / "qdq-fp16.onnx", "fp16")
    explicit = plan(tmp_path, "int8", "10.3.0", qdq_onnx=qdq, calibration_images=8)
    assert (explicit.source, explicit.calibrate, explicit.int8_flag, explicit.fp16_flag) == (qdq, False, True, True)
    typed = plan(tmp_path, "fp16", "11.0.0")
    assert typed.source_kind == "autocast-fp16-onnx" and not (typed.fp16_flag or typed.int8_flag)
    assert plan(tmp_path, "int8", "11.0.0", qdq_onnx=qdq_fp16).source == qdq_fp16
    with pytest.raises(EngineBuildError, match="keeps FP32 between its Q/DQ pairs"):
        plan(tmp_path, "int8", "11.0.0", qdq_onnx=qdq)
    assert not plan(tmp_path, "fp32", "10.3.0").tf32 and "--noTF32" in te.trtexec_command(explicit)


def test_int8_without_calibrator_or_qdq_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError, match="explicit Q/DQ ONNX.*notebook 06"):
        plan(tmp_path, "int8", "11.0.0", calibration_images=500)
    with pytest.raises(EngineBuildError, match="opt size \\(4\\).*calibration_images >= 4"):
        plan(tmp_path, "int8", "10.3.0", calibration_images=3)
    with pytest.raises(EngineBuildError, match="Unknown precision"):
        plan(tmp_path, "bf16", "10.3.0")


def test_polygraphy_and_trtexec_commands(tmp_path: Path) -> None:
    config = load_config("smoke", {"engine.extra_profiles": [[1, 1, 1]]}, environ={})
    fp16 = plan(tmp_path, "fp16", "10.3.0", config)
    polygraphy = shlex.split(te.polygraphy_command(fp16))
    assert polygraphy[:3] == ["polygraphy", "convert", str(fp16.source)]
    assert polygraphy.count("--trt-min-shapes") == 2 and "images:[4,3,224,224]" in polygraphy
    assert {"--fp16", "workspace:2048M", "--builder-optimization-level"} <= set(polygraphy)
    assert "--int8" not in polygraphy
    trtexec = shlex.split(te.trtexec_command(fp16))
    assert {"--fp16", "--minShapes=images:1x3x224x224", "--maxShapes=images:8x3x224x224",
            "--memPoolSize=workspace:2048", "--builderOptimizationLevel=3"} <= set(trtexec)
    old_int8 = plan(tmp_path, "int8", "8.5.2", calibration_images=8)
    assert "--builderOptimizationLevel=3" not in te.trtexec_command(old_int8)
    assert f"--calib={old_int8.calibration_cache}" in te.trtexec_command(old_int8)
    assert "--noTF32" in shlex.split(te.trtexec_command(old_int8))  # trtexec enables TF32 unless told
    assert "--calibration-base-class" not in te.polygraphy_command(old_int8)  # entropy: Polygraphy's default
    minmax = plan(tmp_path, "int8", "8.5.2", load_config("smoke", {"engine.calibrator": "minmax"}, environ={}),
                  calibration_images=8)
    assert "--calibration-base-class IInt8MinMaxCalibrator" in te.polygraphy_command(minmax)
    commands = te.shell_commands(plan(tmp_path, "fp16", "11.0.0"))
    assert "modelopt.onnx.autocast" in commands[0] and "--fp16" not in commands[1]


def test_polygraphy_commands_parse_with_polygraphys_own_cli(tmp_path: Path) -> None:
    import argparse

    from polygraphy.tools.convert import Convert

    parser = argparse.ArgumentParser(exit_on_error=False)
    Convert().setup_parser(parser.add_subparsers())
    minmax = load_config("smoke", {"engine.calibrator": "minmax", "engine.extra_profiles": [[1, 1, 1]]}, environ={})
    for made in (plan(tmp_path, "int8", "10.3.0", minmax, calibration_images=8), plan(tmp_path, "fp16", "8.5.2")):
        args = parser.parse_args(shlex.split(te.polygraphy_command(made))[1:])
        assert (bool(args.fp16), bool(args.int8), bool(args.tf32)) == (made.fp16_flag, made.int8_flag, made.tf32)
        assert args.calibration_base_class == ("IInt8MinMaxCalibrator" if made.calibrate else None)


def test_course_plans_read_the_ptq_qdq_model(config: CourseConfig, tmp_path: Path,
                                             qdq_onnx: Callable[[Path, str], Path]) -> None:
    onnx_model = model(tmp_path)
    plans = te.course_plans(config, onnx_model, "11.0.0", ORIN)
    assert isinstance(plans["int8"], EngineBuildError) and isinstance(plans["fp32"], te.EnginePlan)
    ledger = Ledger(config.workspace)
    qdq = qdq_onnx(config.workspace / "int8" / "qdq.onnx", "fp32")
    qdq_fp16 = qdq_onnx(config.workspace / "int8" / "qdq-fp16.onnx", "fp16")
    files = {"tensorrt_qdq": FileRef.of(qdq, config.workspace), "tensorrt_qdq_fp16": FileRef.of(qdq_fp16, config.workspace)}
    ledger.save(PtqRecord(**files, made_from={"onnx": "another export"}))
    assert isinstance(te.course_plans(config, onnx_model, "11.0.0", ORIN)["int8"], EngineBuildError)
    ledger.save(PtqRecord(tensorrt_qdq=files["tensorrt_qdq"], made_from={"onnx": onnx_model.sha256}))
    assert isinstance(te.course_plans(config, onnx_model, "11.0.0", ORIN)["int8"], EngineBuildError)  # no FP16 copy
    ledger.save(PtqRecord(**files, made_from={"onnx": onnx_model.sha256}))
    planned = {version: te.course_plans(config, onnx_model, version, ORIN)["int8"] for version in ("11.0.0", "10.3.0", "8.5.2")}
    assert all(isinstance(p, te.EnginePlan) for p in planned.values())
    assert [p.source for p in planned.values()] == [qdq_fp16, qdq, onnx_model.path]  # type: ignore[union-attr]


def test_building_without_tensorrt_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = plan(tmp_path, "fp32", "10.3.0")
    monkeypatch.setattr(te, "tensorrt_version", lambda: None)
    with pytest.raises(EngineBuildError, match="TensorRT is not installed"):
        te.build_engine(fp32)
    monkeypatch.setattr(te, "tensorrt_version", lambda: "10.13.0.35")
    with pytest.raises(EngineBuildError, match="plan again"):
        te.build_engine(fp32)


def fake_tensorrt() -> SimpleNamespace:
    """The few TensorRT names the loader wiring touches, for checking it without TensorRT."""
    return SimpleNamespace(MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
                           IInt8EntropyCalibrator2=type("Entropy", (), {}), IInt8MinMaxCalibrator=type("MinMax", (), {}))


def test_calibrator_class_follows_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert te._calibrator_class("minmax") is fake.IInt8MinMaxCalibrator
    assert te._calibrator_class("entropy") is fake.IInt8EntropyCalibrator2


def test_autocast_fp16_runs_on_cpu(tiny_onnx: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("modelopt.onnx.autocast")
    converted = te.autocast_fp16(tiny_onnx, tmp_path / "fp16.onnx")
    graph = onnx.load(str(converted)).graph
    assert {onnx.TensorProto.FLOAT16} == {t.data_type for t in graph.initializer if t.data_type != 7}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 in and out
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    reference = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"images": images})
    half = ort.InferenceSession(str(converted), providers=["CPUExecutionProvider"]).run(None, {"images": images})
    np.testing.assert_allclose(half[0], reference[0], atol=2e-2)


def test_calibration_set_uses_the_last_profiles_opt_batch(tmp_path: Path) -> None:
    from PIL import Image

    torch = pytest.importorskip("torch")
    samples = []
    for index in range(10):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (40, 30), (index * 20, 0, 0)).save(path)
        samples.append((path, index % 2))

    def transform(image: Image.Image) -> object:
        return torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1).copy())

    config = load_config("smoke", {"engine.extra_profiles": [[1, 2, 2]], "quant.calibration_images": 5}, environ={})
    int8 = plan(tmp_path, "int8", "8.5.2", config, calibration_images=5)
    calibration = te.calibration_set(int8, samples, transform, seed=0)
    assert [b["images"].shape for b in calibration.batches()] == [(2, 3, 30, 40)] * 2  # kOPT of the last profile
    int8.engine_path.parent.mkdir(parents=True)
    int8.engine_path.write_bytes(b"engine")
    te.record_engine(int8, 3.0, calibration.sha256)
    assert te.reusable_engine(int8, calibration.sha256) and te.reusable_engine(int8)
    assert not te.reusable_engine(int8, "another calibration set")


def test_profile_shape_exercise(config: CourseConfig) -> None:
    right = {"min": (1, 3, 224, 224), "opt": (4, 3, 224, 224), "max": (8, 3, 224, 224)}
    assert exercises.check_profile_shapes(right, config, 224).passed
    assert not exercises.check_profile_shapes({**right, "opt": (8, 3, 224, 224)}, config, 224).passed
    assert not exercises.check_profile_shapes(None, config, 224).passed
    with pytest.raises(AssertionError):
        exercises.check_profile_shapes({**right, "max": (1, 3, 224, 224)}, config, 224, strict=True)


def test_sidecar_is_plain_json(tmp_path: Path) -> None:
    fp32 = plan(tmp_path, "fp32", "8.5.2")
    fp32.engine_path.parent.mkdir(parents=True)
    fp32.engine_path.write_bytes(b"engine")
    sidecar = json.loads(te.record_engine(fp32, 2.0).read_text())
    assert sidecar["tensorrt"] == "8.5.2" and sidecar["gpu"]["compute_capability"] == "8.7"
    assert sidecar["settings"]["optimization_level"] is None and sidecar["build_seconds"] == 2.0


def test_each_notebook_plans_the_precisions_it_teaches(config: CourseConfig, tmp_path: Path) -> None:
    onnx_model = model(tmp_path)
    assert list(te.course_plans(config, onnx_model, "10.3.0", ORIN, precisions=te.FLOAT_PRECISIONS)) == ["fp32", "fp16"]
    assert list(te.course_plans(config, onnx_model, "10.3.0", ORIN, precisions=te.INT8_PRECISIONS)) == ["int8"]
    assert list(te.course_plans(config, onnx_model, "10.3.0", ORIN)) == ["fp32", "fp16", "int8"]
    only_fp16 = config.model_copy(update={"engine": config.engine.model_copy(update={"precisions": ["int8", "fp16"]})})
    assert te.wanted_precisions(only_fp16) == ["fp16", "int8"]  # course order, whatever the spec's order
    assert te.wanted_precisions(only_fp16, te.FLOAT_PRECISIONS) == ["fp16"]


def test_merged_build_figures_keep_what_a_call_did_not_rebuild() -> None:
    earlier = {"build_seconds": {"tensorrt_fp32": 30.0, "tensorrt_fp16": 40.0},
               "timing_cache_builds": {"no_cache_s": 30.0}, "skipped_engines": {"int8": "no calibration images"}}
    now = {"build_seconds": {"tensorrt_int8": 55.0}, "timing_cache_builds": {}, "skipped_engines": {}}
    merged = te.merge_metrics(earlier, now, ["int8"])
    assert merged == {"build_seconds": {"tensorrt_fp32": 30.0, "tensorrt_fp16": 40.0, "tensorrt_int8": 55.0},
                      "timing_cache_builds": {"no_cache_s": 30.0}, "skipped_engines": {}}


def _deployable(config: CourseConfig, onnx_file: Path) -> None:
    """A ledger holding a fine-tuned model and its ONNX export, as notebooks 02 and 04 record them."""
    from course_utils.core.artifacts import FinetuneRecord, OnnxRecord

    workspace = config.workspace
    checkpoint = workspace / "models" / "finetuned.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    ledger = Ledger(workspace)
    finetuned = ledger.save(FinetuneRecord(checkpoint=FileRef.of(checkpoint, workspace), backbone="efficientnet-lite0",
                                           dataset="package-textures", classes=["a", "b"]))
    onnx = FileRef.of(onnx_file, workspace)
    ledger.save(OnnxRecord(raw=onnx, optimized=onnx, source="finetuned", backbone="efficientnet-lite0",
                           input_name="images", output_name="logits", input_size=224,
                           made_from={"model": finetuned.checkpoint.sha256}))


def test_notebook_06_adds_int8_to_the_engines_notebook_05_built(config: CourseConfig, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.core.artifacts import EnginesRecord
    from course_utils.vision import data

    onnx_file = config.workspace / "onnx" / "optimized.onnx"
    onnx_file.parent.mkdir(parents=True)
    onnx_file.write_bytes(b"onnx bytes")
    _deployable(config, onnx_file)
    asked: list[list[str]] = []

    def fake_builds(config: CourseConfig, dataset: object, onnx: OnnxModel, transform: object,
                    precisions: Sequence[str] | None = None) -> dict[str, te.EngineBuild | EngineBuildError]:
        plans = te.course_plans(config, onnx, "10.3.0", RTX, precisions=precisions)  # type: ignore[arg-type]
        asked.append(list(plans))
        for made in plans.values():
            made.engine_path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            made.engine_path.write_bytes(made.precision.encode())  # type: ignore[union-attr]
        return {p: te.EngineBuild(made, 10.0, False, "missing") for p, made in plans.items()}  # type: ignore[arg-type]

    for name, value in (("tensorrt_version", lambda: "10.3.0"), ("detect_gpu", lambda: RTX),
                        ("cuda_version", lambda: "12.6"), ("build_course_engines", fake_builds)):
        monkeypatch.setattr(te, name, value)
    monkeypatch.setattr(data, "resolve_dataset", lambda config: None)
    floats = te.run(config, precisions=te.FLOAT_PRECISIONS)
    assert asked == [["fp32", "fp16"]] and set(floats.record.engines) == {"fp32", "fp16"}
    int8 = te.run(config, precisions=te.INT8_PRECISIONS)
    assert asked[-1] == ["int8"] and list(int8.built) == ["int8"]
    recorded = Ledger(config.workspace).load(EnginesRecord)
    assert recorded is not None and set(recorded.engines) == {"fp32", "fp16", "int8"}
    assert set(recorded.metrics["build_seconds"]) == {"tensorrt_fp32", "tensorrt_fp16", "tensorrt_int8"}
    monkeypatch.setattr(te, "detect_gpu", lambda: ORIN)  # engines of another GPU are never kept beside these
    assert list(te.run(config, precisions=te.INT8_PRECISIONS).record.engines) == ["int8"]
