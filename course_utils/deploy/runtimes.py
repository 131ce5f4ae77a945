"""One interface for every runtime the course compares, and one benchmark for all of them.

A ``Runner`` takes a float32 NCHW batch as a NumPy array on the host and returns float32 logits as
a NumPy array; ``synchronize()`` waits for queued GPU work. That contract is all the benchmark, the
accuracy check, the INT8 stage and the app rely on::

    with OrtRunner(path, threads=1) as runner:
        logits = runner.run(images)

Runners: ``TorchRunner`` (PyTorch eager, CPU or CUDA; in ``course_utils.vision.inference``), ``OrtRunner``
(ONNX Runtime: CPU, or the CUDA and TensorRT execution providers of onnxruntime-gpu) and ``TensorRTRunner``
(an engine through Polygraphy's ``TrtRunner``). Every runner copies its input in and its output out, so all
are timed end to end alike. ``Runner``, ``Latency`` and the one timer, ``measure_latency``, live in
``course_utils.core.timing``: the zoo, the ONNX stage, this benchmark and the INT8 stage all time with it.

``run_benchmark(config, precisions)`` times and checks, on the validation split, every runner of the model
that ships (``deployed_model``) whose artifact exists, limited to the precisions asked for: notebook 05 asks
for FP32 and FP16; the final benchmark (``course_utils.deploy.final_benchmark``, notebook 07 and
``python -m course_utils benchmark``) asks for all of them and records the result. Engine build times are in
the engines record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from course_utils.core.artifacts import file_sha256
from course_utils.core.config import CourseConfig
from course_utils.core.lazy import lazy_import
from course_utils.core.timing import (
    Latency,
    Runner,
    RuntimeUnavailableError,
    compare_threads,
    measure_latency,
)
from course_utils.deploy.tensorrt_engines import BatchProfile, ort_tensorrt_options
from course_utils.vision.inference import TorchRunner

ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtRunner(Runner):
    """ONNX Runtime with every graph optimization. ``threads``: intra-op threads (None: ORT's default).

    ``precision`` labels the model (an INT8 ONNX is ``"int8"``). With ``device="tensorrt"`` the TensorRT
    provider builds for ``profile`` (batch min/opt/max at ``input_size``) in that precision, and ``cache_dir``
    keeps its engines and timing cache per GPU, TensorRT and CUDA (``ort_tensorrt_options``). A provider that
    ONNX Runtime could not start (it falls back silently) raises ``RuntimeUnavailableError``.
    """

    runtime = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, precision: str = "fp32",
                 cache_dir: Path | None = None, profile: BatchProfile | None = None, input_size: int = 224,
                 workspace_mb: int = 2048) -> None:
        import onnxruntime as ort

        if device not in ORT_PROVIDERS:
            raise RuntimeUnavailableError(f"Unknown device {device!r}: choose {', '.join(ORT_PROVIDERS)}.")
        wanted = ORT_PROVIDERS[device][0]
        if wanted not in ort.get_available_providers():
            available = ", ".join(ort.get_available_providers())
            raise RuntimeUnavailableError(f"ONNX Runtime here has no {wanted} (it has {available}): install "
                                          "onnxruntime-gpu for CUDA/TensorRT, or use device='cpu'.")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        providers: list[Any] = list(ORT_PROVIDERS[device])
        if device == "tensorrt":
            import onnx

            input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name  # options come first
            providers[0] = (providers[0], ort_tensorrt_options(input_name, input_size, profile or BatchProfile(1, 4, 8),
                                                               precision, workspace_mb, cache_dir))
        self.device, self.precision, self._threads = device, precision, threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        active = self.session.get_providers()[0]
        if active != wanted:
            raise RuntimeUnavailableError(f"ONNX Runtime could not start {wanted} for {Path(path).name} and fell "
                                          f"back to {active}: these would not be {device} figures. Check the "
                                          "CUDA/TensorRT libraries onnxruntime-gpu needs (its log says which).")
        self.input_name = self.session.get_inputs()[0].name

    @property
    def threads(self) -> int | None:
        return self._threads if self.device == "cpu" else None

    def run(self, images: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.float32)})
        return np.asarray(outputs[0], dtype=np.float32)


class TensorRTRunner(Runner):
    """A serialized TensorRT engine run by Polygraphy's ``TrtRunner`` on optimization ``profile``."""

    runtime = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: Path, precision: str, profile: int = 0,
                 max_batch: int | None = None) -> None:
        BytesFromPath = lazy_import("polygraphy.backend.common", "deploy", "A TensorRT runner").BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.precision, self.max_batch = precision, max_batch
        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), optimization_profile=profile)
        self._runner.activate()
        self.input_name = next(iter(self._runner.get_input_metadata()))

    def run(self, images: np.ndarray) -> np.ndarray:
        outputs = self._runner.infer({self.input_name: np.ascontiguousarray(images, np.float32)})
        # Polygraphy reuses one host buffer per output across calls: copy, or the next run overwrites this one.
        return np.array(next(iter(outputs.values())), dtype=np.float32, copy=True)

    def close(self) -> None:
        if self._runner.is_active:
            self._runner.deactivate()


def ptq_cpu_model(config: CourseConfig, onnx_sha256: str) -> Path | None:
    """The quantization stage's INT8 ONNX for ONNX Runtime CPU, when it was made from the FP32 ONNX ``onnx_sha256``."""
    from course_utils.core.artifacts import PtqRecord
    from course_utils.core.ledger import Ledger

    record = Ledger(config.workspace).current(PtqRecord, made_from={"onnx": onnx_sha256})
    return record.cpu_int8.resolve(config.workspace) if record is not None and record.cpu_int8 else None


def qat_cpu_model(config: CourseConfig, model_sha256: str) -> Path | None:
    """The QAT stage's Q/DQ ONNX (notebook 07), when it was made from the deployed model ``model_sha256``."""
    from course_utils.core.artifacts import QatRecord
    from course_utils.core.ledger import Ledger

    record = Ledger(config.workspace).current(QatRecord, made_from={"model": model_sha256})
    return record.onnx.resolve(config.workspace) if record is not None else None


def course_runners(model: Any, onnx_path: Path, threads: int, int8_path: Path | None = None,
                   engines: Mapping[str, Path] | None = None,
                   engine_max_batch: int | None = None, qat_path: Path | None = None) -> list[Runner]:
    """PyTorch and ONNX Runtime FP32 on the CPU, ONNX Runtime INT8 PTQ (``ptq_cpu_model``) and QAT
    (``qat_cpu_model``, precision ``int8-qat``) when given, TensorRT engines.

    ``engines`` maps a precision to an engine file, run on profile 0 with up to ``engine_max_batch`` images.
    """
    runners: list[Runner] = [TorchRunner(model, threads=threads), OrtRunner(onnx_path, threads=threads)]
    if (int8 := int8_path) is not None:
        runners.append(OrtRunner(int8, threads=threads, precision="int8"))
    if qat_path is not None:
        runners.append(OrtRunner(qat_path, threads=threads, precision="int8-qat"))
    runners += [TensorRTRunner(path, precision, max_batch=engine_max_batch)
                for precision, path in (engines or {}).items()]
    return runners


def validation_arrays(samples: Sequence[tuple[Path, int]], transform: Any) -> tuple[np.ndarray, np.ndarray]:
    """The validation images preprocessed once (the model's own ``eval_transform``) and their labels."""
    from course_utils.vision.data import load_rgb

    images = np.stack([transform(load_rgb(path)).numpy() for path, _ in samples]).astype(np.float32)
    return images, np.array([label for _, label in samples])


def top1(runner: Runner, images: np.ndarray, labels: np.ndarray, batch_size: int = 8) -> float:
    """The fraction of ``images`` whose highest logit is the label."""
    batch_size = min(batch_size, runner.max_batch or batch_size)
    predictions = np.concatenate([runner.run(images[i:i + batch_size]).argmax(-1)
                                  for i in range(0, len(images), batch_size)])
    return float((predictions == labels).mean())


def engines_top1(engines: Mapping[str, Path], images: np.ndarray, labels: np.ndarray,
                 max_batch: int | None = None) -> dict[str, float]:
    """The validation top-1 of every engine (name -> file), each run by ``TensorRTRunner`` on profile 0."""
    scores = {}
    for name, path in engines.items():
        with TensorRTRunner(path, "int8" if "int8" in name else name, max_batch=max_batch) as runner:
            scores[name] = top1(runner, images, labels)
    return scores


@dataclass
class RuntimeResult:
    """One runner's row of the benchmark: who it is, its latencies per batch, its validation top-1."""

    key: str
    runtime: str
    precision: str
    device: str
    threads: int | None
    latencies: dict[int, Latency]
    val_top1: float | None = None


def benchmark(runners: Sequence[Runner], batch_sizes: Sequence[int], input_size: int, warmup: int,
              iterations: int, images: np.ndarray | None = None, labels: np.ndarray | None = None,
              clock: Callable[[], float] = time.perf_counter) -> list[RuntimeResult]:
    """The course's one benchmark: latency per batch size for every runner, and top-1 when images are given.

    Batches beyond a runner's ``max_batch`` are skipped for that runner.
    """
    results = []
    for runner in runners:
        latencies = {batch: measure_latency(runner, batch, input_size, warmup, iterations, clock)
                     for batch in batch_sizes if runner.max_batch is None or batch <= runner.max_batch}
        accuracy = None if images is None or labels is None else top1(runner, images, labels, max(batch_sizes))
        results.append(RuntimeResult(runner.key, runner.runtime, runner.precision, runner.device,
                                     runner.threads, latencies, accuracy))
    return results


def results_rows(results: Sequence[RuntimeResult]) -> list[Mapping[str, Any]]:
    """One row per runner and batch size, for a table."""
    return [{"runtime": r.runtime, "precision": r.precision, "device": r.device,
             "threads": "-" if r.threads is None else r.threads, "batch": batch, "p50 ms": lat.p50_ms,
             "p90 ms": lat.p90_ms, "p99 ms": lat.p99_ms, "images/s": lat.throughput,
             "val top-1": "-" if r.val_top1 is None else r.val_top1}
            for r in results for batch, lat in r.latencies.items()]


def results_markdown(results: Sequence[RuntimeResult]) -> str:
    """The benchmark as a Markdown table."""
    from course_utils.core.report import markdown_table

    return markdown_table(results_rows(results))


def benchmark_metrics(results: Sequence[RuntimeResult]) -> dict[str, dict[str, Any]]:
    """The benchmark record's figures per runtime: device, threads, p50 at batch 1 and 8, throughput, top-1.

    TensorRT build times live in the engines record (``tensorrt_engines.build_metrics``), not here.
    """
    metrics: dict[str, dict[str, Any]] = {}
    for result in results:
        entry: dict[str, Any] = {"device": result.device, "threads": result.threads}
        for batch in (1, 8):
            if batch in result.latencies:
                entry[f"latency_ms_p50_b{batch}"] = round(result.latencies[batch].p50_ms, 3)
        if 8 in result.latencies:
            entry["throughput_b8"] = round(result.latencies[8].throughput, 2)
        if result.val_top1 is not None:
            entry["val_top1"] = result.val_top1
        metrics[result.key] = entry
    return metrics


def speedup(results: Sequence[RuntimeResult], faster: str, baseline: str, batch: int = 8) -> float:
    """How many times the throughput of runner ``faster`` is that of ``baseline`` at ``batch``."""
    by_key = {r.key: r for r in results}
    return by_key[faster].latencies[batch].throughput / by_key[baseline].latencies[batch].throughput


@dataclass
class BenchmarkResult:
    """What ``run_benchmark`` measured: one row per runtime, the thread comparison, and what it was made from.

    ``made_from`` names every measured file by role (``model``, ``onnx``, ``int8``, ``int8-qat``,
    ``tensorrt_<precision>``) and its sha256.
    """

    results: list[RuntimeResult]
    threads: dict[int, Latency]
    made_from: dict[str, str]


def run_benchmark(config: CourseConfig, precisions: Sequence[str] = ("fp32", "fp16", "int8"),
                  thread_counts: Sequence[int] = (1, 2)) -> BenchmarkResult:
    """Every runtime of the model that ships, in the given ``precisions``, on the validation split, side by side.

    PyTorch and ONNX Runtime FP32 always (the baseline); with ``int8``, ONNX Runtime INT8 when notebook 06
    made it from this ONNX and the QAT Q/DQ ONNX when notebook 07 made it from this model; TensorRT engines
    of these precisions when this machine built them. Also times ONNX Runtime at each of ``thread_counts``.
    Nothing is built or trained here, and nothing is recorded (``final_benchmark.run`` records);
    runners are closed whatever happens.
    """
    from course_utils.deploy.tensorrt_engines import engines_here, onnx_model
    from course_utils.vision.data import resolve_dataset
    from course_utils.vision.deployment import load_deployed

    bench = config.benchmark
    model, deployed = load_deployed(config)
    onnx = onnx_model(config)
    images, labels = validation_arrays(resolve_dataset(config).samples["val"], model.preprocessing.eval_transform())
    int8 = ptq_cpu_model(config, onnx.sha256) if "int8" in precisions else None
    qat = qat_cpu_model(config, deployed.sha256) if "int8" in precisions else None
    engines = {p: path for p, path in engines_here(config, onnx).items() if p in precisions}
    runners = course_runners(model, onnx.path, bench.threads, int8, engines, config.engine.batch_max, qat)
    try:
        results = benchmark(runners, bench.batch_sizes, onnx.input_size, bench.warmup, bench.iterations, images, labels)
    finally:
        for runner in runners:
            runner.close()
    threads = compare_threads(lambda n: OrtRunner(onnx.path, threads=n), thread_counts, batch=max(bench.batch_sizes),
                              input_size=onnx.input_size, warmup=bench.warmup, iterations=bench.iterations)
    files = {"int8": int8, "int8-qat": qat, **{f"tensorrt_{p}": path for p, path in engines.items()}}
    made_from = {"model": deployed.sha256, "onnx": onnx.sha256,
                 **{role: file_sha256(path) for role, path in files.items() if path is not None}}
    return BenchmarkResult(results, threads, made_from)
