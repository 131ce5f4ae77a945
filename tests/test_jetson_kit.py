"""The Jetson deploy kit: the kit a smoke workspace makes, its device script under Python 3.8 (ONNX Runtime
standing in for TensorRT), its TensorRT calls against a recording stand-in of TensorRT, DeepStream's scale
and offsets, Triton's configs against Triton's schema, and the results merged back into the ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from course_utils.core.artifacts import DeviceRunRecord, FileRef, FinetuneRecord, OnnxRecord, PtqRecord
from course_utils.core.config import CourseConfig, load_config
from course_utils.core.ledger import Ledger
from course_utils.deploy import jetson_kit
from course_utils.deploy.kit_device import trt_kit
from course_utils.deploy.onnx_export import exporter_options
from course_utils.deploy.runtimes import OrtRunner, top1, validation_arrays
from course_utils.vision import zoo
from course_utils.vision.data import load_rgb, resolve_dataset

REPO = Path(__file__).resolve().parents[1]
PY38 = REPO / ".venv-py38" / "bin" / "python"
CLASSES = ["ants", "bees"]


def _dataset(root: Path) -> Path:
    """A tiny ImageFolder: reddish ants, bluish bees, PNG and JPEG, odd sizes (so resize and crop matter)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 6)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            base = np.array([200, 60, 40]) if label == 0 else np.array([40, 80, 200])
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 60, (90 + 7 * i, 120, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.{'jpg' if i % 2 else 'png'}")
    return root


def _tiny_onnx(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU6(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    torch.onnx.export(net, torch.randn(2, 3, 224, 224), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                      **exporter_options("torchscript"))
    return path


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> CourseConfig:
    """A smoke workspace with a fine-tuned model, its optimized ONNX and a Q/DQ ONNX (as notebooks 02-06 leave)."""
    from course_utils.deploy import ptq
    from course_utils.deploy.calibration import CalibrationSet
    from course_utils.deploy.tensorrt_engines import OnnxModel

    root = tmp_path_factory.mktemp("kit")
    config = load_config("smoke", {"workspace": str(root / "workspace"), "dataset.name": str(_dataset(root / "data"))},
                         environ={})
    workspace = config.workspace
    (workspace / "models").mkdir(parents=True)
    checkpoint = workspace / "models" / "finetuned.pt"
    checkpoint.write_bytes(b"fine-tuned weights")
    ledger = Ledger(workspace)
    finetuned = ledger.save(FinetuneRecord(checkpoint=FileRef.of(checkpoint, workspace),
                                           backbone="efficientnet-lite0", dataset="tiny", classes=CLASSES))
    (workspace / "onnx").mkdir()
    onnx = FileRef.of(_tiny_onnx(workspace / "onnx" / "optimized.onnx"), workspace)
    ledger.save(OnnxRecord(raw=onnx, optimized=onnx, source="finetuned", backbone="efficientnet-lite0",
                           input_name="images", output_name="logits", input_size=224,
                           made_from={"model": finetuned.checkpoint.sha256}))
    model = OnnxModel.from_path(onnx.resolve(workspace), input_size=224)
    calibration = CalibrationSet((), np.random.default_rng(1).standard_normal((8, 3, 224, 224), dtype=np.float32),
                                 batch_size=4, seed=0)
    qdq = ptq.quantize(model, ptq.Recipe("onnxruntime", "minmax", "s8"), calibration, workspace / "int8")
    ledger.save(PtqRecord(tensorrt_qdq=FileRef.of(qdq.path, workspace), made_from={"onnx": onnx.sha256}))
    return config


@pytest.fixture(scope="module")
def kit(stage: CourseConfig) -> jetson_kit.KitResult:
    return jetson_kit.run(stage)


@pytest.fixture
def device_copy(kit: jetson_kit.KitResult, tmp_path: Path) -> Path:
    """The kit as it lands on the device: the .tar.gz unpacked somewhere else."""
    with tarfile.open(kit.archive) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / kit.folder.name


def _course_val(config: CourseConfig) -> tuple[np.ndarray, np.ndarray]:
    samples = resolve_dataset(config).samples["val"]
    return validation_arrays(samples, zoo.entry("efficientnet-lite0").preprocessing.eval_transform())


# --- The kit ------------------------------------------------------------------------------------------------------


def test_the_kit_plans_every_tensorrt_generation_from_the_engine_routes(kit: jetson_kit.KitResult,
                                                                         stage: CourseConfig) -> None:
    plan = kit.plan
    assert plan["model"]["opset"] == 17 and plan["model"]["sha256"] == kit.onnx_sha256
    assert plan["profiles"] == [{"min": 1, "opt": 4, "max": 8}] and plan["tf32"] is False
    routes = plan["generations"]
    for weak in ("8.5", "8.6"):  # ModelOpt's Q/DQ ONNX is opset >= 19: below TensorRT 10, INT8 calibrates
        int8 = routes[weak]["precisions"]["int8"]
        assert (int8["onnx"], int8["calibrate"], int8["fp16_flag"], int8["int8_flag"]) == ("model.onnx", True, True, True)
    assert routes["8.5"]["optimization_level"] is None and routes["8.6"]["optimization_level"] == 3
    int8_10 = routes["10.x"]["precisions"]["int8"]
    assert int8_10["onnx"].startswith("onnx/") and "qdq_fp32" in int8_10["onnx"] and not int8_10["calibrate"]
    assert int8_10["fp16_flag"] and int8_10["int8_flag"]  # weakly typed INT8 keeps FP16 for what is not INT8
    eleven = routes["11.x"]
    assert eleven["strongly_typed"] and "autocast_fp16" in eleven["precisions"]["fp16"]["onnx"]
    assert not any(eleven["precisions"][p].get("fp16_flag") for p in ("fp32", "fp16"))
    assert not eleven["precisions"]["int8"]["available"]  # the workspace has no Q/DQ ONNX with FP16 between
    assert "needs an explicit Q/DQ ONNX" in eleven["precisions"]["int8"]["why"]
    for name in ("model.onnx", "labels.txt", "preprocessing.json", "calibration.npy", "val.npy", "val_labels.json",
                 "trt_kit.py", "README.md", "deepstream/config_infer_primary.txt", "deepstream/config_infer_secondary.txt",
                 int8_10["onnx"], eleven["precisions"]["fp16"]["onnx"]):
        assert (kit.folder / name).is_file(), name
    calibration = np.load(kit.folder / "calibration.npy")
    assert calibration.dtype == np.uint8 and calibration.shape == (8, 3, 224, 224)  # whole batches of opt 4
    assert (kit.folder / "labels.txt").read_text().split() == CLASSES
    assert "sudo jetson_clocks" in (kit.folder / "README.md").read_text()
    assert os.access(kit.folder / "trt_kit.py", os.X_OK) and (kit.folder / "plan.json").stat().st_mode & 0o004


def test_a_valid_kit_is_reused_and_a_changed_one_rebuilt(kit: jetson_kit.KitResult, stage: CourseConfig) -> None:
    again = jetson_kit.run(stage)
    assert again.reused and again.folder == kit.folder and jetson_kit.existing_kit(stage) is not None
    (kit.folder / "labels.txt").write_text("tampered\n")
    assert jetson_kit.existing_kit(stage) is None
    rebuilt = jetson_kit.run(stage)
    assert not rebuilt.reused and (rebuilt.folder / "labels.txt").read_text().split() == CLASSES


def test_the_kits_tensors_are_the_courses_preprocessing_bit_for_bit(kit: jetson_kit.KitResult,
                                                                    stage: CourseConfig) -> None:
    images, labels = _course_val(stage)
    device = trt_kit.Kit(kit.folder)
    kit_images, kit_labels = device.validation()
    assert np.array_equal(kit_images, images) and np.array_equal(kit_labels, labels)
    transform = zoo.entry("efficientnet-lite0").preprocessing.eval_transform()
    demo = sorted((kit.folder / "images").rglob("*.png"))
    assert len(demo) == 4  # two per class
    for path in demo:  # the device's Pillow resize and crop, then its normalization, against the course's
        crop = trt_kit.load_image(path, device.preprocessing)[None]
        assert np.array_equal(trt_kit.normalize(crop, device.preprocessing)[0], transform(load_rgb(path)).numpy())


def test_an_export_above_opset_17_is_refused_for_tensorrt_8(stage: CourseConfig,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jetson_kit, "onnx_opset", lambda path: 19)
    with pytest.raises(jetson_kit.KitError, match=r"export.opset=17.*10\.x"):
        jetson_kit.run(stage)
    with pytest.raises(jetson_kit.KitError, match="Unknown TensorRT generation"):
        jetson_kit.run(stage, generations=("9.x",))


# --- The device script under Python 3.8, ONNX Runtime standing in -----------------------------------------------


def _py38() -> Path:
    if not PY38.exists():
        message = f"{PY38} is missing: `make py38` builds it from pyenv's Python 3.8"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PY38


def _device(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_py38()), str(folder / "trt_kit.py"), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, check=False)


def test_the_device_script_runs_on_python_38_and_its_results_import(device_copy: Path, stage: CourseConfig) -> None:
    ran = _device(device_copy, "all", "--iterations", "2", "--warmup", "1")
    assert ran.returncode == 0, ran.stderr
    assert trt_kit.STAND_IN_LINE in ran.stderr  # said loudly: these are not TensorRT figures
    results = json.loads((device_copy / "results.json").read_text())
    assert results["stand_in"] and results["runtime"] == "onnxruntime" and results["tensorrt"] is None
    assert results["tools"]["python"].startswith("3.8.")
    row = results["metrics"]["onnxruntime_fp32"]
    images, labels = _course_val(stage)
    with OrtRunner(device_copy / "model.onnx", threads=1) as runner:
        assert row["val_top1"] == top1(runner, images, labels)  # the course's own ONNX Runtime figure
        transform = zoo.entry("efficientnet-lite0").preprocessing.eval_transform()
        for item in results["classified"]:
            image = transform(load_rgb(device_copy / "images" / item["file"])).numpy()[None]
            assert item["label"] == CLASSES[int(runner.run(image).argmax())], item
    assert len(results["classified"]) == 4 and row["latency_ms_p50_b1"] > 0 and row["throughput_b8"] > 0
    record = jetson_kit.import_results(stage, device_copy / "results.json")
    saved = Ledger(stage.workspace).require(DeviceRunRecord)
    assert saved.metrics == record.metrics and saved.metrics["onnxruntime_fp32"]["val_top1"] == row["val_top1"]
    assert "stand-in" in saved.device and saved.made_from == {"onnx": results["kit_onnx_sha256"]}


def test_the_device_script_is_python_38_clean() -> None:
    checked = subprocess.run([str(Path(sys.executable).with_name("vermin")), "-t=3.8-", "--violations", "--no-tips",
                              str(jetson_kit.KIT_SCRIPT)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_bad_input_on_the_device_is_one_line(device_copy: Path) -> None:
    missing = _device(device_copy, "classify", str(device_copy / "no-such-folder"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: image folder")
    assert "Traceback" not in missing.stderr
    other = device_copy / "model.onnx"
    other.write_bytes(other.read_bytes() + b"\0")  # another model than the plan was made for
    swapped = _device(device_copy, "accuracy")
    assert swapped.returncode == 2 and "not the model this kit's plan was made for" in swapped.stderr
    assert len(swapped.stderr.strip().splitlines()) == 1


# --- The TensorRT path, against a recording stand-in of TensorRT ------------------------------------------------


class FakeCuda:
    """Device memory as host byte arrays; records every copy."""

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.copies: list[tuple[str, int]] = []

    def malloc(self, nbytes: int) -> int:
        pointer = 4096 * (len(self.memory) + 1)
        self.memory[pointer] = bytearray(nbytes)
        return pointer

    def free(self, pointer: int) -> None:
        del self.memory[pointer]

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int | None = None) -> None:
        self.memory[pointer][:array.nbytes] = array.tobytes()
        self.copies.append(("to device", array.nbytes))

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int | None = None) -> None:
        array[...] = np.frombuffer(bytes(self.memory[pointer][:array.nbytes]), dtype=array.dtype).reshape(array.shape)
        self.copies.append(("to host", array.nbytes))

    def stream_create(self) -> int:
        return 7

    def stream_synchronize(self, stream: int) -> None:
        pass

    def stream_destroy(self, stream: int) -> None:
        pass


def fake_tensorrt(version: str, cuda: FakeCuda, classes: int = 2) -> types.ModuleType:
    """The small TensorRT surface trt_kit.py uses, as it exists in ``version``; every call is recorded."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # type: ignore[attr-defined]
    record = trt.calls.append  # type: ignore[attr-defined]
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    flags = {"EXPLICIT_BATCH": 0} | ({"STRONGLY_TYPED": 1} if major >= 10 else {})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
    builder_flags = {"TF32": "TF32"} | ({"FP16": "FP16", "INT8": "INT8"} if major < 11 else {})
    trt.BuilderFlag = types.SimpleNamespace(**builder_flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dtype: np.float32

    class Calibrator:
        def __init__(self) -> None:
            record(("calibrator", type(self).__mro__[1].__name__))

    trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (Calibrator,), {})
    trt.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (Calibrator,), {})

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            self.shapes = (name, low, opt, high)

    class TimingCache:
        def serialize(self) -> bytes:
            return b"timings of " + version.encode()

    class Config:
        def __init__(self) -> None:
            self.flags: set[str] = {"TF32"}  # TensorRT's default
            self.profiles: list[Profile] = []
            self.int8_calibrator: Any = None
            self.calibration_profile: Profile | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            record(("pool", pool, size))

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: str) -> None:
            self.flags.discard(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: Profile) -> bool:
            self.calibration_profile = profile
            return True

        def create_timing_cache(self, data: bytes) -> TimingCache:
            record(("timing cache loaded", bytes(data)))
            return TimingCache()

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> TimingCache:
            return TimingCache()

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags

    class Parser:
        num_errors = 0

        def __init__(self, network: Network, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            record(("parse", Path(path).name))
            return True

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            batches = []
            calibrator = config.int8_calibrator
            if calibrator is not None and calibrator.read_calibration_cache() is None:  # TensorRT calibrates
                while (pointers := calibrator.get_batch(["images"])) is not None:
                    batches.append(len(cuda.memory[pointers[0]]))
                calibrator.write_calibration_cache(f"{trt_kit.calibration_header(version, 'entropy')}\n".encode())
            record(("build", {"network_flags": network.flags, "flags": set(config.flags),
                              "profiles": [p.shapes for p in config.profiles],
                              "calibration_profile": config.calibration_profile,
                              "profile_objects": list(config.profiles), "calibration_batches": batches,
                              "optimization_level": getattr(config, "builder_optimization_level", None)}))
            return b"engine"

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shapes["images"] if name == "images" else (self.shapes["images"][0], classes)

        def set_tensor_address(self, name: str, pointer: int) -> bool:
            self.addresses[name] = pointer
            return True

        def execute_async_v3(self, stream: int) -> bool:  # logits: each image's mean in channel 0 and 1
            batch = self.shapes["images"]
            images = np.frombuffer(bytes(cuda.memory[self.addresses["images"]][:int(np.prod(batch)) * 4]),
                                   dtype=np.float32).reshape(batch)
            logits = images.mean(axis=(2, 3))[:, :classes].astype(np.float32)
            cuda.memory[self.addresses["logits"]][:logits.nbytes] = logits.tobytes()
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, index: int) -> str:
            return ["images", "logits"][index]

        def get_tensor_mode(self, name: str) -> str:
            return "INPUT" if name == "images" else "OUTPUT"

        def get_tensor_dtype(self, name: str) -> str:
            return "FLOAT"

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if data == b"engine" else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


def _builds(trt: types.ModuleType) -> list[dict[str, Any]]:
    return [call[1] for call in trt.calls if call[0] == "build"]


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0.30", "11.0.0.1"])
def test_the_tensorrt_route_asks_tensorrt_for_the_right_build(device_copy: Path, version: str) -> None:
    cuda = FakeCuda()
    trt = fake_tensorrt(version, cuda)
    kit = trt_kit.Kit(device_copy)
    target = trt_kit.Target(version, "NVIDIA Jetson Xavier NX", "7.2", "11.4")
    route = trt_kit.route_for(kit, version)
    version_major = int(version.split(".")[0])
    weak = version_major < 11
    built = {}
    for precision in ("fp32", "fp16", "int8"):
        if not route["precisions"][precision]["available"]:
            assert version_major == 11 and precision == "int8"  # no FP16 Q/DQ ONNX in this workspace
            continue
        built[precision] = trt_kit.build_engine(trt, cuda, kit, precision, route, target)
    builds = _builds(trt)
    assert len(builds) == len(built)
    shape = (3, 224, 224)
    for build in builds:
        assert build["profiles"] == [("images", (1, *shape), (4, *shape), (8, *shape))]
        assert "TF32" not in build["flags"]  # trtexec --noTF32, as Polygraphy builds
        strongly = build["network_flags"] & (1 << 1)
        assert bool(strongly) == (not weak)
        assert bool(build["network_flags"] & 1) == (version_major < 10)  # EXPLICIT_BATCH below 10 only
    by_precision = dict(zip(built, builds))
    if weak:
        assert {"FP16", "INT8"} <= by_precision["int8"]["flags"]  # weakly typed INT8 keeps FP16
        assert by_precision["fp16"]["flags"] == {"FP16"} and not by_precision["fp32"]["flags"]
    parsed = [call[1] for call in trt.calls if call[0] == "parse"]
    if version_major == 8:  # implicit calibration at the calibration profile's opt batch, on that very profile
        int8 = by_precision["int8"]
        assert int8["calibration_profile"] is int8["profile_objects"][-1]
        assert int8["calibration_batches"] == [4 * 3 * 224 * 224 * 4] * 2
        assert parsed == ["model.onnx"] * 3 and ("calibrator", "IInt8EntropyCalibrator2") in trt.calls
        assert int8["optimization_level"] is None
    else:
        assert by_precision.get("int8", {}).get("calibration_batches", []) == []
        assert all(b["optimization_level"] == 3 for b in builds)
    if version_major == 11:
        assert "autocast_fp16" in parsed[1] and not any(b["flags"] for b in builds)
    timing = list(kit.engines.glob("timing_*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == f"timings of {version}".encode()
    assert trt_kit.sealed_problem(timing[0], target.as_dict()) is None
    for precision, (path, seconds) in built.items():  # a second build reuses every engine it sealed
        assert trt_kit.build_engine(trt, cuda, kit, precision, route, target) == (path, 0.0)
    assert len(_builds(trt)) == len(built)
    other_gpu = trt_kit.Target(version, "NVIDIA Jetson Orin Nano", "8.7", "11.4")
    trt_kit.build_engine(trt, cuda, kit, "fp32", route, other_gpu)  # another GPU: its own engine and cache
    assert len(_builds(trt)) == len(built) + 1 and len(list(kit.engines.glob("timing_*.cache"))) == 2
    assert trt.calls.count(("timing cache loaded", b"")) == 2  # each GPU's first build starts an empty cache


def test_the_runner_hands_out_a_fresh_copy_of_every_output(device_copy: Path) -> None:
    cuda = FakeCuda()
    trt = fake_tensorrt("10.3.0", cuda)
    kit = trt_kit.Kit(device_copy)
    target = trt_kit.Target("10.3.0", "GPU", "8.7", "12.6")
    path, _ = trt_kit.build_engine(trt, cuda, kit, "fp16", trt_kit.route_for(kit, "10.3.0"), target)
    runner = trt_kit.TrtRunner(trt, cuda, path, kit)
    first_images = np.ones((2, 3, 224, 224), np.float32)
    first = runner.run(first_images)
    second = runner.run(np.full((3, 3, 224, 224), 5, np.float32))
    assert first.shape == (2, 2) and second.shape == (3, 2)
    assert np.array_equal(first, np.ones((2, 2), np.float32))  # not overwritten by the second run
    assert ("to host", 2 * 2 * 4) in cuda.copies and ("to device", first_images.nbytes) in cuda.copies
    runner.close()


def _main(trt: types.ModuleType, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(trt_kit, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_kit, "CudaRuntime", lambda: types.SimpleNamespace(
        **{name: getattr(cuda, name) for name in dir(cuda) if not name.startswith("_")},
        device_name=lambda: "NVIDIA Jetson Xavier NX", compute_capability=lambda: "7.2", runtime_version=lambda: "11.4"))
    return trt_kit.main(list(argv))


def test_foreign_caches_and_engines_are_refused_or_rebuilt(device_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cuda = FakeCuda()
    trt = fake_tensorrt("8.5.2.2", cuda)
    kit = trt_kit.Kit(device_copy)
    brought = device_copy / "from-elsewhere.calib"
    brought.write_text("TRT-8601-EntropyCalibration2\nimages: 3c010204\n")  # TensorRT 8.6.1 wrote it
    code = _main(trt, cuda, monkeypatch, "build", "--kit", str(device_copy), "--precisions", "int8",
                 "--calibration-cache", str(brought))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: from-elsewhere.calib starts with 'TRT-8601-EntropyCalibration2'")
    assert not _builds(trt)
    cache = trt_kit.calibration_cache_path(kit)  # the kit's own cache, left by another TensorRT: recalibrated
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("TRT-100300-EntropyCalibration2\n")
    here = trt_kit.Target("8.5.2.2", "NVIDIA Jetson Xavier NX", "7.2", "11.4")
    timing = kit.engines / f"timing_{here.tag}.cache"  # sealed under this name for another CUDA: not reused
    timing.write_bytes(b"timings of another CUDA")
    trt_kit.seal(timing, dict(here.as_dict(), cuda="12.2"))
    assert _main(trt, cuda, monkeypatch, "build", "--kit", str(device_copy), "--precisions", "int8") == 0
    err = capsys.readouterr().err
    assert "recalibrating" in err and "made for another cuda" in err
    assert ("timing cache loaded", b"") in trt.calls and timing.read_bytes() == b"timings of 8.5.2.2"
    assert _builds(trt)[-1]["calibration_batches"] and cache.read_text().startswith("TRT-8502-EntropyCalibration2")
    engine = next(kit.engines.glob("*_int8_*.engine"))
    sidecar = Path(str(engine) + ".json")
    meta = json.loads(sidecar.read_text())
    meta["key"]["onnx_sha256"] = "0" * 64  # an engine of another model, under this kit's name
    sidecar.write_text(json.dumps(meta))
    code = _main(trt, cuda, monkeypatch, "accuracy", "--kit", str(device_copy), "--precisions", "int8",
                 "--engine", str(engine))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was built from another model (ONNX 000000000000" in err[0]


# --- DeepStream and Triton -------------------------------------------------------------------------------------------


def _nvinfer(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "resnet50_8xb32_in1k"])
def test_deepstream_scale_and_offsets_reproduce_the_course_normalization(kit: jetson_kit.KitResult,
                                                                          backbone: str) -> None:
    preprocessing = zoo.entry(backbone).preprocessing
    if backbone == "efficientnet-lite0":
        config = _nvinfer(kit.folder / "deepstream" / "config_infer_primary.txt")  # the kit's own file
    else:  # ImageNet's three different stds: one scale can only approximate them
        config = dict(line.split("=", 1) for line in jetson_kit.deepstream_config(
            "m", preprocessing, "engines/x.calib", secondary=True).splitlines() if "=" in line and line[0] != "#")
    scale, offsets = float(config["net-scale-factor"]), np.array([float(o) for o in config["offsets"].split(";")])
    worst = jetson_kit.deepstream_scale_offsets(preprocessing)[2]
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    pixels[0, :20], pixels[-1, -20:] = 0, 255  # both extremes, where the single scale errs most
    picture = Image.fromarray(pixels)
    crop = np.asarray(jetson_kit.crop_transform(preprocessing)(picture), dtype=np.float64)
    course = preprocessing.eval_transform()(picture).numpy()
    deepstream = scale * (crop - offsets.reshape(3, 1, 1))
    error = np.abs(deepstream - course).max()
    assert error <= worst + 1e-5
    if backbone == "efficientnet-lite0":  # one std for all channels: exact up to float32 rounding
        assert worst == 0 and error < 1e-5 and config["model-color-format"] == "0"
        assert config["network-type"] == "1" and config["int8-calib-file"].startswith("../engines/")
        assert (kit.folder / "deepstream" / config["labelfile-path"]).read_text().strip() == ";".join(CLASSES)
    else:
        assert 0.01 < worst < 0.1 and error > worst / 4  # the stated bound is the real one, not a loose one
        assert config["process-mode"] == "2" and config["operate-on-gie-id"] == "1"


def _model_config_class() -> Any:
    """Triton's ``ModelConfig`` (the fields the kit writes, with Triton's field numbers and enum values), built as
    a protobuf descriptor: tritonclient, which ships the schema, pins ml-dtypes below what the course needs."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fd = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    data_type = fd.enum_type.add(name="DataType")
    for number, name in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32",
                                   "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16",
                                   "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        data_type.value.add(name=name, number=number)
    F = descriptor_pb2.FieldDescriptorProto

    def message(name: str, fields: list[tuple[str, int, int, str | None, bool]],
                enums: dict[str, list[str]] | None = None) -> None:
        proto = fd.message_type.add(name=name)
        for enum_name, values in (enums or {}).items():
            enum = proto.enum_type.add(name=enum_name)
            for number, value in enumerate(values):
                enum.value.add(name=value, number=number)
        for field_name, number, kind, type_name, repeated in fields:
            field = proto.field.add(name=field_name, number=number, type=kind,
                                    label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                field.type_name = type_name

    message("ModelInput", [("name", 1, F.TYPE_STRING, None, False), ("data_type", 2, F.TYPE_ENUM, ".inference.DataType", False),
                           ("format", 3, F.TYPE_ENUM, ".inference.ModelInput.Format", False),
                           ("dims", 4, F.TYPE_INT64, None, True)],
            {"Format": ["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"]})
    message("ModelOutput", [("name", 1, F.TYPE_STRING, None, False),
                            ("data_type", 2, F.TYPE_ENUM, ".inference.DataType", False),
                            ("dims", 3, F.TYPE_INT64, None, True), ("label_filename", 4, F.TYPE_STRING, None, False)])
    message("ModelDynamicBatching", [("preferred_batch_size", 1, F.TYPE_INT32, None, True),
                                     ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, None, False)])
    message("ModelInstanceGroup", [("count", 2, F.TYPE_INT32, None, False),
                                   ("kind", 4, F.TYPE_ENUM, ".inference.ModelInstanceGroup.Kind", False)],
            {"Kind": ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]})
    message("ModelConfig", [("name", 1, F.TYPE_STRING, None, False), ("platform", 2, F.TYPE_STRING, None, False),
                            ("max_batch_size", 4, F.TYPE_INT32, None, False),
                            ("input", 5, F.TYPE_MESSAGE, ".inference.ModelInput", True),
                            ("output", 6, F.TYPE_MESSAGE, ".inference.ModelOutput", True),
                            ("instance_group", 7, F.TYPE_MESSAGE, ".inference.ModelInstanceGroup", True),
                            ("dynamic_batching", 11, F.TYPE_MESSAGE, ".inference.ModelDynamicBatching", False)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def test_triton_configs_parse_with_tritons_model_config_schema(kit: jetson_kit.KitResult) -> None:
    from google.protobuf import text_format

    ModelConfig = _model_config_class()
    repos = sorted((kit.folder / "triton").iterdir())
    assert [r.name for r in repos] == ["efficientnet_lite0_onnx", "efficientnet_lite0_plan"]
    for repo in repos:
        config = text_format.Parse((repo / "config.pbtxt").read_text(), ModelConfig())
        assert config.name == repo.name and config.max_batch_size == 8
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert list(config.input[0].dims) == [3, 224, 224] and config.input[0].name == "images"  # batch excluded
        assert list(config.output[0].dims) == [2] and (repo / config.output[0].label_filename).is_file()
    onnx_repo, plan_repo = repos
    assert text_format.Parse((onnx_repo / "config.pbtxt").read_text(), ModelConfig()).platform == "onnxruntime_onnx"
    assert (onnx_repo / "1" / "model.onnx").read_bytes() == (kit.folder / "model.onnx").read_bytes()
    plan = text_format.Parse((plan_repo / "config.pbtxt").read_text(), ModelConfig())
    assert plan.platform == "tensorrt_plan" and plan.instance_group[0].kind == 1  # KIND_GPU
    assert kit.plan["triton_plan"] == "triton/efficientnet_lite0_plan/1/model.plan"
    with pytest.raises(text_format.ParseError):  # the schema is strict: a misspelt field fails
        text_format.Parse('name: "x"\nmax_batch: 8\n', ModelConfig())


# --- Results back into the ledger -----------------------------------------------------------------------------------


def _results(kit: jetson_kit.KitResult, **changes: Any) -> dict[str, Any]:
    data = {"kit_format": 1, "kit_onnx_sha256": kit.onnx_sha256, "backbone": "efficientnet-lite0",
            "runtime": "tensorrt", "stand_in": False, "tensorrt": "8.5.2.2",
            "device": {"description": "NVIDIA Jetson Xavier NX (JetPack 5.1.1, TensorRT 8.5.2.2)"},
            "metrics": {"tensorrt_fp16": {"device": "cuda", "threads": None, "latency_ms_p50_b1": 2.1,
                                          "latency_ms_p50_b8": 9.5, "throughput_b8": 840.0, "val_top1": 0.5}}}
    return data | changes


def test_import_results_refuses_another_models_and_malformed_files(kit: jetson_kit.KitResult, stage: CourseConfig,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from course_utils.cli import main

    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results(kit)))
    record = jetson_kit.import_results(stage, path)
    assert record.tensorrt == "8.5.2.2" and record.device.startswith("NVIDIA Jetson Xavier NX")
    assert record.metrics["tensorrt_fp16"] == {"device": "cuda", "latency_ms_p50_b1": 2.1, "latency_ms_p50_b8": 9.5,
                                               "throughput_b8": 840.0, "val_top1": 0.5}
    path.write_text(json.dumps(_results(kit, kit_onnx_sha256="a" * 64)))
    with pytest.raises(jetson_kit.KitError, match="another model"):
        jetson_kit.import_results(stage, path)
    bad_rows = {"tensorrt_fp16": {"device": "cuda", "val_top1": 1.5}}
    for broken, words in ((json.dumps(_results(kit, metrics=bad_rows)), "val_top1"),
                          (json.dumps(_results(kit, metrics={"tensorrt_fp16": {"device": "cuda", "speed": 3}})),
                           "unknown figure"),
                          ("{not json", "is not JSON")):
        path.write_text(broken)
        with pytest.raises(jetson_kit.KitError, match=words):
            jetson_kit.import_results(stage, path)
    argv = ["import-results", str(path), "--spec", "smoke", "--set", f"workspace={stage.workspace}",
            "--set", f"dataset.name={stage.dataset.name}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is not JSON" in err[0]


def test_the_cli_has_the_kit_commands() -> None:
    from course_utils.cli import build_parser, cmd_import_results, cmd_jetson_kit

    args = build_parser().parse_args(["jetson-kit", "--out", "kits"])
    assert args.func is cmd_jetson_kit and args.out == "kits"
    assert build_parser().parse_args(["import-results", "r.json"]).func is cmd_import_results
