"""Runners on the CPU (PyTorch and ONNX Runtime agree), the one timer and the benchmark's statistics."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from course_utils.core import timing
from course_utils.core.artifacts import BenchmarkRecord
from course_utils.core.config import CourseConfig, load_config
from course_utils.core.ledger import Ledger
from course_utils.core.timing import Latency, Runner, RuntimeUnavailableError
from course_utils.deploy import runtimes as rt
from course_utils.deploy.onnx_export import exporter_options
from course_utils.deploy.runtimes import OrtRunner, RuntimeResult
from course_utils.lessons import exercises
from course_utils.vision.inference import TorchRunner

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A small conv net and its ONNX export with a dynamic batch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(net, torch.randn(2, 3, 32, 32), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                      **exporter_options("torchscript"))
    return net, path


class FakeRunner(Runner):
    """Each run 'takes' the next duration (ms) of a cycle, on a fake clock; logits come from a table."""

    runtime = "fake"

    def __init__(self, durations_ms: list[float], clock: list[float], max_batch: int | None = None,
                 precision: str = "fp32", answers: np.ndarray | None = None) -> None:
        self.durations = itertools.cycle(durations_ms)
        self.clock, self.max_batch, self.precision, self.answers = clock, max_batch, precision, answers
        self.runs = self.syncs = 0
        self.closed = False
        self.batches: list[int] = []

    def run(self, images: np.ndarray) -> np.ndarray:
        self.runs += 1
        self.batches.append(len(images))
        self.clock[0] += next(self.durations) / 1000
        if self.answers is None:
            return np.zeros((len(images), 3), np.float32)
        index = np.clip(images[:, 0, 0, 0].astype(int), 0, len(self.answers) - 1)  # image i carries i
        return np.eye(3, dtype=np.float32)[self.answers[index]]

    def synchronize(self) -> None:
        self.syncs += 1

    def close(self) -> None:
        self.closed = True


def test_pytorch_and_onnxruntime_agree_on_cpu(tiny: tuple[torch.nn.Module, Path]) -> None:
    net, path = tiny
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with TorchRunner(net, threads=1) as eager, OrtRunner(path, threads=1) as onnx:
        np.testing.assert_allclose(onnx.run(images), eager.run(images), atol=1e-5)
        assert onnx.run(images[:1]).shape == (1, 3)
        assert (eager.key, onnx.key, eager.threads, onnx.threads) == ("pytorch_fp32", "onnxruntime_fp32", 1, 1)


def test_unavailable_devices_say_what_to_do(tiny: tuple[torch.nn.Module, Path]) -> None:
    net, path = tiny
    with pytest.raises(RuntimeUnavailableError, match="choose cpu, cuda, tensorrt"):
        OrtRunner(path, device="npu")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(RuntimeUnavailableError, match="onnxruntime-gpu"):
            OrtRunner(path, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeUnavailableError, match="device='cpu'"):
            TorchRunner(net, device="cuda")


class ProviderStandIn:
    """ONNX Runtime's InferenceSession as onnxruntime-gpu behaves: it records the providers it was given and
    reports the one it really started (``started``), which is not the first asked for when that one failed."""

    def __init__(self, started: str) -> None:
        self.started, self.providers = started, []

    def __call__(self, path: str, options: object = None, providers: list[object] | None = None) -> ProviderStandIn:
        self.providers.append(providers)
        return self

    def get_providers(self) -> list[str]:
        return [self.started, "CPUExecutionProvider"]

    def get_inputs(self) -> list[object]:
        return [type("Input", (), {"name": "images"})()]


def test_the_tensorrt_provider_gets_profiles_and_caches_and_no_silent_fallback(
        tiny: tuple[torch.nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from course_utils.deploy import tensorrt_engines as te

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["TensorrtExecutionProvider",
                                                                         "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(te, "detect_gpu", lambda: te.Gpu("NVIDIA Jetson Orin Nano", "8.7"))
    monkeypatch.setattr(te, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(te, "cuda_version", lambda: "12.6")
    fell_back = ProviderStandIn("CUDAExecutionProvider")
    monkeypatch.setattr(onnxruntime, "InferenceSession", fell_back)
    with pytest.raises(RuntimeUnavailableError, match="fell back to CUDAExecutionProvider"):
        OrtRunner(tiny[1], device="tensorrt", precision="fp16", cache_dir=tmp_path)
    started = ProviderStandIn("TensorrtExecutionProvider")
    monkeypatch.setattr(onnxruntime, "InferenceSession", started)
    OrtRunner(tiny[1], device="tensorrt", precision="fp16", cache_dir=tmp_path, input_size=32)
    name, options = started.providers[-1][0]
    assert name == "TensorrtExecutionProvider" and options["trt_fp16_enable"] and not options["trt_int8_enable"]
    assert (options["trt_profile_min_shapes"], options["trt_profile_opt_shapes"], options["trt_profile_max_shapes"]) \
        == ("images:1x3x32x32", "images:4x3x32x32", "images:8x3x32x32")
    assert options["trt_timing_cache_enable"] and options["trt_engine_cache_enable"]
    folder = Path(options["trt_engine_cache_path"])
    assert folder.parent == tmp_path and folder.name == "nvidia-jetson-orin-nano-sm87_trt10.3.0_cu12.6"
    monkeypatch.setattr(te, "cuda_version", lambda: "13")
    other = te.ort_tensorrt_options("images", 32, te.BatchProfile(1, 4, 8), "fp16", 2048, tmp_path)
    assert other["trt_engine_cache_path"] != str(folder)  # another CUDA never reads these engines


def test_runner_keys() -> None:
    runner = FakeRunner([1.0], [0.0], precision="int8")
    runner.runtime, runner.device = "onnxruntime", "tensorrt"
    assert runner.key == "onnxruntime_int8_tensorrt"
    runner.runtime, runner.device = "tensorrt", "cuda"
    assert runner.key == "tensorrt_int8"


def test_latency_statistics_on_a_fake_clock() -> None:
    clock = [0.0]
    runner = FakeRunner([float(ms) for ms in range(1, 11)], clock)
    latency = timing.measure_latency(runner, batch=4, input_size=8, warmup=10, iterations=10,
                                     clock=lambda: clock[0])
    assert runner.runs == runner.syncs == 20 and set(runner.batches) == {4}
    assert latency.p50_ms == pytest.approx(5.5)
    assert latency.p90_ms == pytest.approx(9.1)
    assert latency.p99_ms == pytest.approx(9.91)
    assert latency.mean_ms == pytest.approx(5.5)
    assert latency.throughput == pytest.approx(4 / 0.0055)


def test_benchmark_rows_accuracy_and_ledger(tmp_path: Path) -> None:
    clock = [0.0]
    answers = np.array([0, 1, 2, 2, 1])  # the fake's prediction for image i
    fast = FakeRunner([2.0], clock, answers=answers)
    capped = FakeRunner([4.0], clock, max_batch=4, precision="int8", answers=answers)
    images = np.zeros((5, 3, 8, 8), np.float32)
    images[:, 0, 0, 0] = np.arange(5)
    labels = np.array([0, 1, 2, 0, 0])
    results = rt.benchmark([fast, capped], [1, 4, 8], 8, warmup=1, iterations=3, images=images, labels=labels,
                           clock=lambda: clock[0])
    assert list(results[0].latencies) == [1, 4, 8] and list(results[1].latencies) == [1, 4]
    assert max(capped.batches) == 4  # accuracy batches respect max_batch too
    assert results[0].val_top1 == pytest.approx(0.6)
    metrics = rt.benchmark_metrics(results)
    assert metrics["fake_fp32"]["latency_ms_p50_b8"] == 2.0 and metrics["fake_fp32"]["throughput_b8"] == 4000.0
    assert "throughput_b8" not in metrics["fake_int8"]
    Ledger(tmp_path).save(BenchmarkRecord(metrics=metrics))
    recorded = Ledger(tmp_path).load(BenchmarkRecord)
    assert recorded is not None and recorded.metrics["fake_fp32"]["val_top1"] == pytest.approx(0.6)
    assert "| fake | int8 | cpu |" in rt.results_markdown(results)


def result(key: str, p50_ms: float) -> RuntimeResult:
    runtime, precision = key.split("_")
    return RuntimeResult(key, runtime, precision, "cpu", 1, {8: Latency(8, 3, p50_ms, p50_ms, p50_ms, p50_ms)})


def test_speedup_and_its_exercise() -> None:
    results = [result("pytorch_fp32", 250.0), result("onnxruntime_fp32", 100.0)]
    assert rt.speedup(results, "onnxruntime_fp32", "pytorch_fp32") == pytest.approx(2.5)
    assert exercises.check_speedup(2.5, results).passed
    assert not exercises.check_speedup(0.4, results).passed
    assert not exercises.check_speedup(None, results).passed
    with pytest.raises(AssertionError):
        exercises.check_speedup(1.0, results, strict=True)


def test_compare_threads_closes_each_runner() -> None:
    clock = [0.0]
    made: dict[int, FakeRunner] = {}

    def make(threads: int) -> FakeRunner:
        made[threads] = FakeRunner([10.0 * threads], clock)
        return made[threads]

    timings = timing.compare_threads(make, [1, 2], batch=1, input_size=8, warmup=0, iterations=2)
    assert all(runner.closed for runner in made.values()) and set(timings) == {1, 2}


def test_compare_thread_counts_times_each_count_and_restores_threads() -> None:
    from course_utils.vision.inference import compare_thread_counts

    original = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        timings = compare_thread_counts((1, 2), repeats=2)
        assert torch.get_num_threads() == 3, "the previous thread count is restored"
    finally:
        torch.set_num_threads(original)
    assert list(timings) == [1, 2] and all(isinstance(ms, float) and ms > 0 for ms in timings.values())


def test_validation_arrays_use_the_given_transform(tmp_path: Path) -> None:
    from PIL import Image

    samples = []
    for label in range(2):
        path = tmp_path / f"{label}.png"
        Image.new("RGB", (10, 10), (200 * label, 0, 0)).save(path)
        samples.append((path, label))
    images, labels = rt.validation_arrays(
        samples, lambda image: torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1).copy()))
    assert images.shape == (2, 3, 10, 10) and images.dtype == np.float32
    assert images[1, 0, 0, 0] == 200.0 and labels.tolist() == [0, 1]


def test_course_runners_add_the_int8_model_of_this_onnx_only(tiny: tuple[torch.nn.Module, Path],
                                                              config: CourseConfig) -> None:
    from course_utils.core.artifacts import FileRef, PtqRecord
    from course_utils.core.downloads import sha256_file

    net, path = tiny
    assert rt.ptq_cpu_model(config, sha256_file(path)) is None
    keys = [r.key for r in rt.course_runners(net, path, 1)]
    assert keys == ["pytorch_fp32", "onnxruntime_fp32"]
    int8 = config.workspace / "int8.onnx"
    int8.parent.mkdir(parents=True, exist_ok=True)
    int8.write_bytes(path.read_bytes())  # any ONNX stands in for the INT8 model
    Ledger(config.workspace).save(PtqRecord(cpu_int8=FileRef.of(int8, config.workspace),
                                            made_from={"onnx": sha256_file(path)}))
    assert rt.ptq_cpu_model(config, "another export") is None
    assert rt.ptq_cpu_model(config, sha256_file(path)) == int8
    runners = rt.course_runners(net, path, 1, rt.ptq_cpu_model(config, sha256_file(path)))
    assert [r.key for r in runners] == ["pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"]


def test_every_stage_latency_comes_from_the_one_timer(tiny: tuple[torch.nn.Module, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo and pruning (``cpu_latency_ms``), the ONNX stage, the INT8 stage and the runtime benchmark
    all report what ``core.timing.measure_latency`` measured, with the spec's warm-up and iterations."""
    from course_utils.deploy import onnx_export, ptq
    from course_utils.vision import zoo

    net, path = tiny
    assert rt.measure_latency is timing.measure_latency  # the benchmark (notebook 05) calls the same function
    calls: list[tuple[Runner, int, int, int, int]] = []

    def spy(runner: Runner, batch: int, input_size: int, warmup: int, iterations: int, clock: object = None
            ) -> Latency:
        calls.append((runner, batch, input_size, warmup, iterations))
        return Latency(batch, iterations, 100.0 + batch, 200.0, 300.0, 150.0)  # no figure any other way

    monkeypatch.setattr(timing, "measure_latency", spy)
    config = load_config("smoke", {"workspace": str(tmp_path), "benchmark.warmup": 1,
                                   "benchmark.iterations": 2, "benchmark.threads": 1}, environ={})

    assert zoo.cpu_latency_ms(net, 32, batch=4, warmup=1, iterations=2) == 104.0
    assert isinstance(calls[-1][0], TorchRunner) and calls[-1][1:] == (4, 32, 1, 2)

    onnx_batches = onnx_export.LATENCY_BATCHES
    assert onnx_export.onnx_latency_ms(path, 32, config) == {b: 100.0 + b for b in onnx_batches}
    assert all(isinstance(c[0], OrtRunner) and c[2:] == (32, 1, 2) for c in calls[-len(onnx_batches):])

    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    _, p50 = ptq._measure(path, "fp32", images, config, latency=True)
    assert p50 == {b: 100.0 + b for b in ptq.LATENCY_BATCHES}
    assert all(isinstance(c[0], OrtRunner) and c[2:] == (32, 1, 2) for c in calls[-len(ptq.LATENCY_BATCHES):])


def test_course_runners_add_the_qat_model_of_the_deployed_model_only(tiny: tuple[torch.nn.Module, Path],
                                                                      config: CourseConfig) -> None:
    from course_utils.core.artifacts import FileRef, QatRecord

    net, path = tiny
    qat = config.workspace / "int8" / "qat.onnx"
    qat.parent.mkdir(parents=True, exist_ok=True)
    qat.write_bytes(path.read_bytes())  # any ONNX stands in for the Q/DQ model
    Ledger(config.workspace).save(QatRecord(onnx=FileRef.of(qat, config.workspace), made_from={"model": "deployed"}))
    assert rt.qat_cpu_model(config, "another model") is None
    assert rt.qat_cpu_model(config, "deployed") == qat
    runners = rt.course_runners(net, path, 1, qat_path=rt.qat_cpu_model(config, "deployed"))
    assert [r.key for r in runners] == ["pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8-qat"]
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(runners[2].run(images), runners[1].run(images), rtol=1e-5, atol=1e-5)
