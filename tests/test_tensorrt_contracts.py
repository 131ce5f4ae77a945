"""Contract tests of the course's TensorRT path over a recording stand-in of the surface it uses.

TensorRT cannot be installed here, so these tests replace the few Polygraphy loaders and TensorRT names the
course calls with recording stand-ins. Each stand-in binds its arguments to the signature of the *real*
Polygraphy class or function (installed here), so a keyword Polygraphy does not take fails at once; when called,
it behaves as TensorRT does where the course depends on it: it calibrates at the calibration profile's opt
batch, saves the timing cache, and hands out one reused output buffer.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from course_utils.core.config import load_config
from course_utils.core.errors import CourseError
from course_utils.deploy import tensorrt_engines as te
from course_utils.deploy.calibration import CalibrationSet
from course_utils.deploy.runtimes import TensorRTRunner
from course_utils.deploy.tensorrt_engines import CacheKey, Gpu, OnnxModel, build_route, plan_engine

ORIN = Gpu("NVIDIA Jetson Orin Nano", "8.7")
RTX = Gpu("NVIDIA GeForce RTX 4090", "8.9")


def bind_like(real: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments as ``real`` (a Polygraphy class or function) would bind them; ``**kwargs`` a class passes on
    to its base class are bound to the base's signature, so an unknown keyword fails however deep it goes."""
    signature = inspect.signature(real)
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    passed_on = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    extra = arguments.pop(passed_on, {}) if passed_on else {}
    if extra:
        if not inspect.isclass(real):
            raise TypeError(f"{real.__name__} got keywords it only swallows: {sorted(extra)}")
        base = next(cls for cls in real.__mro__[1:] if "__init__" in cls.__dict__)
        if base is object:
            raise TypeError(f"{real.__name__} does not take {sorted(extra)}")
        arguments.update(bind_like(base, (), extra))
    return arguments


class TensorRTStandIn:
    """Records every loader the course creates and simulates the parts of an engine build it relies on."""

    def __init__(self) -> None:
        import polygraphy.backend.common as real_common
        import polygraphy.backend.trt as real_trt

        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.calibrated_batches: list[tuple[int, ...]] = []
        self.trt = ModuleType("tensorrt")
        self.trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]
        self.trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {})  # type: ignore[attr-defined]
        self.trt.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (), {})  # type: ignore[attr-defined]
        self.polygraphy_trt = ModuleType("polygraphy.backend.trt")
        for name in ("NetworkFromOnnxPath", "CreateConfig", "EngineFromNetwork", "SaveEngine", "Calibrator",
                     "EngineFromBytes", "TrtRunner"):
            setattr(self.polygraphy_trt, name, self._recording(name, getattr(real_trt, name)))
        self.polygraphy_trt.Profile = real_trt.Profile  # type: ignore[attr-defined]  (plain data, no TensorRT)
        self.polygraphy_common = ModuleType("polygraphy.backend.common")
        self.polygraphy_common.BytesFromPath = self._recording(  # type: ignore[attr-defined]
            "BytesFromPath", real_common.BytesFromPath)

    def install(self, monkeypatch: pytest.MonkeyPatch, tensorrt: str, gpu: Gpu, cuda: str) -> None:
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", self.polygraphy_trt)
        monkeypatch.setitem(sys.modules, "polygraphy.backend.common", self.polygraphy_common)
        monkeypatch.setattr(te, "tensorrt_version", lambda: tensorrt)
        monkeypatch.setattr(te, "detect_gpu", lambda: gpu)
        monkeypatch.setattr(te, "cuda_version", lambda: cuda)

    def called(self, name: str) -> list[dict[str, Any]]:
        return [arguments for called, arguments in self.calls if called == name]

    def _recording(self, name: str, real: Any) -> Any:
        stand_in = self

        class Recorded:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.arguments = bind_like(real, args, kwargs)  # TypeError on a keyword Polygraphy does not take
                stand_in.calls.append((name, self.arguments))
                self.output = np.zeros((8, 2), np.float32)  # TrtRunner: one host buffer, reused by every call
                self.is_active = False

            def __call__(self) -> Any:
                if name == "SaveEngine":
                    return stand_in.build(self.arguments)
                if name == "Calibrator":
                    return self
                return self

            def activate(self) -> None:
                self.is_active = True

            def deactivate(self) -> None:
                self.is_active = False

            def get_input_metadata(self) -> dict[str, Any]:
                return {"images": None}

            def infer(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                images = feed_dict["images"]
                self.output[:len(images)] = images.reshape(len(images), -1)[:, :2]
                return {"logits": self.output[:len(images)]}

        return Recorded

    def build(self, save: dict[str, Any]) -> Path:
        """What TensorRT does when the course's SaveEngine runs: calibrate, save the timing cache, write the plan."""
        engine = save["engine"].arguments
        config = engine["config"].arguments
        profiles = config.get("profiles") or []
        calibrator = config.get("calibrator")
        if calibrator is not None:
            opt = profiles[-1]["images"].opt  # TensorRT calibrates at kOPT of the calibration (last) profile
            for batch in calibrator.arguments["data_loader"]:
                shape = tuple(batch["images"].shape)
                if shape[0] != opt[0]:
                    raise RuntimeError(f"calibration batch {shape} but the calibration profile's opt is {tuple(opt)}")
                self.calibrated_batches.append(shape)
            Path(calibrator.arguments["cache"]).write_bytes(b"TRT-1003-EntropyCalibration2\n")
        Path(engine["save_timing_cache"]).write_bytes(b"timings")
        Path(save["path"]).write_bytes(b"serialized engine")
        return Path(save["path"])


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> TensorRTStandIn:
    made = TensorRTStandIn()
    made.install(monkeypatch, "10.3.0", ORIN, "12.6")
    return made


def onnx_model(tmp_path: Path) -> OnnxModel:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    return OnnxModel(path, "ab" * 32, input_size=32)


def calibration(count: int, batch: int) -> CalibrationSet:
    images = np.random.default_rng(0).standard_normal((count, 3, 32, 32)).astype(np.float32)
    return CalibrationSet(tuple((Path(f"{i}.png"), i % 2) for i in range(count)), images, batch, 0)


def test_engine_outputs_are_copied_out_of_the_reused_buffer(stand_in: TensorRTStandIn, tmp_path: Path) -> None:
    with TensorRTRunner(tmp_path / "model.engine", "fp16") as runner:
        first = runner.run(np.ones((2, 3, 32, 32), np.float32))
        runner.run(np.full((2, 3, 32, 32), 5.0, np.float32))
    np.testing.assert_array_equal(first, np.ones((2, 2), np.float32))


def test_implicit_int8_calibrates_at_the_last_profiles_opt_batch(stand_in: TensorRTStandIn, tmp_path: Path) -> None:
    config = load_config("smoke", {"engine.extra_profiles": [[1, 2, 2]]}, environ={})
    plan = plan_engine(onnx_model(tmp_path), "int8", build_route("10.3.0"), ORIN, config.engine, tmp_path / "e",
                       calibration_images=8, cuda="12.6")
    te.build_engine(plan, calibration(8, te.batch_profiles(config.engine)[-1].opt))
    assert stand_in.calibrated_batches == [(2, 3, 32, 32)] * 4
    with pytest.raises(RuntimeError, match="calibration profile's opt"):
        te.build_engine(plan, calibration(8, 4), force=True)  # batches of the first profile's opt: refused


@pytest.mark.parametrize("version", ["8.5.2", "10.3.0"])
def test_weakly_typed_int8_builds_with_fp16_and_without_tf32(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             version: str) -> None:
    made = TensorRTStandIn()
    made.install(monkeypatch, version, ORIN, "12.6")
    config = load_config("smoke", environ={})
    plan = plan_engine(onnx_model(tmp_path), "int8", build_route(version), ORIN, config.engine, tmp_path / "e",
                       calibration_images=8, cuda="12.6")
    te.build_engine(plan, calibration(8, 4))
    (created,) = made.called("CreateConfig")
    assert (created["fp16"], created["int8"], created["tf32"]) == (True, True, False)
    assert created["calibrator"] is not None and made.called("NetworkFromOnnxPath")[0]["path"] == str(plan.model.path)


def test_tensorrt11_int8_builds_the_fp16_qdq_model_without_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 qdq_onnx: Callable[[Path, str], Path]) -> None:
    made = TensorRTStandIn()
    made.install(monkeypatch, "11.0.0", RTX, "13")
    config = load_config("smoke", environ={})
    fp16 = qdq_onnx(tmp_path / "qdq-fp16.onnx", "fp16")
    plan = plan_engine(onnx_model(tmp_path), "int8", build_route("11.0.0"), RTX, config.engine, tmp_path / "e",
                       qdq_onnx=fp16, cuda="13")
    te.build_engine(plan)
    (created,) = made.called("CreateConfig")
    assert (created.get("fp16", False), created.get("int8", False), created["calibrator"]) == (False, False, None)
    assert made.called("NetworkFromOnnxPath")[0]["path"] == str(fp16)
    with pytest.raises(CourseError, match="keeps FP32"):
        plan_engine(onnx_model(tmp_path), "int8", build_route("11.0.0"), RTX, config.engine, tmp_path / "e",
                    qdq_onnx=qdq_onnx(tmp_path / "qdq.onnx", "fp32"), cuda="13")


@pytest.mark.parametrize("foreign", [CacheKey.of(RTX, "10.3.0", "12.6"), CacheKey.of(ORIN, "8.5.2", "12.6"),
                                     CacheKey.of(ORIN, "10.3.0", "13"), CacheKey.of(ORIN, "10.3.0", "12.6", tf32=True)],
                         ids=["gpu", "tensorrt", "cuda", "tf32"])
def test_a_timing_cache_made_elsewhere_is_never_loaded(stand_in: TensorRTStandIn, tmp_path: Path,
                                                       foreign: CacheKey) -> None:
    config = load_config("smoke", environ={})
    plan = plan_engine(onnx_model(tmp_path), "fp16", build_route("10.3.0"), ORIN, config.engine, tmp_path / "e",
                       cuda="12.6")
    plan.timing_cache.parent.mkdir(parents=True)
    plan.timing_cache.write_bytes(b"timings from another machine")  # copied in under this machine's name
    te.seal_timing_cache(plan.timing_cache, foreign)
    te.build_engine(plan)
    assert stand_in.called("CreateConfig")[0]["load_timing_cache"] is None
    assert te.timing_cache_state(plan.timing_cache, plan.cache_key) == "valid"  # the fresh one, sealed for here
    te.build_engine(plan, force=True)
    assert stand_in.called("CreateConfig")[1]["load_timing_cache"] == str(plan.timing_cache)


def test_an_engine_built_with_another_cuda_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = load_config("smoke", environ={})
    made = TensorRTStandIn()
    made.install(monkeypatch, "10.3.0", ORIN, "12.6")
    built = te.build_engine(plan_engine(onnx_model(tmp_path), "fp32", build_route("10.3.0"), ORIN, config.engine,
                                        tmp_path / "e", cuda="12.6"))
    assert not built.reused and te.build_engine(built.plan).reused
    other = plan_engine(onnx_model(tmp_path), "fp32", build_route("10.3.0"), ORIN, config.engine, tmp_path / "e",
                        cuda="13")
    assert other.engine_path != built.plan.engine_path and not te.build_engine(other).reused


def test_a_failed_calibration_skips_one_precision_and_builds_the_rest(stand_in: TensorRTStandIn,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    from course_utils.deploy.calibration import CalibrationError

    config = load_config("smoke", {"workspace": str(tmp_path / "ws")}, environ={})

    def no_calibration(*args: Any, **kwargs: Any) -> CalibrationSet:
        raise CalibrationError("3 calibration image(s) do not fill one batch of 4")

    monkeypatch.setattr(te, "calibration_set", no_calibration)
    monkeypatch.setattr(te, "measure_build_times", lambda plan, calibration: te.build_engine(plan, calibration))
    builds = te.build_course_engines(config, SimpleNamespace(samples={"train": []}), onnx_model(tmp_path), None)
    assert isinstance(builds["int8"], te.EngineBuildError) and "do not fill one batch" in str(builds["int8"])
    assert {p for p, b in builds.items() if isinstance(b, te.EngineBuild)} == {"fp32", "fp16"}
    assert "int8" in te.build_metrics(builds)["skipped_engines"]
