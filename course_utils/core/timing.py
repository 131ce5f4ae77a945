"""The course's one latency timer, over the one interface every runtime implements.

A ``Runner`` takes a float32 NCHW batch as a NumPy array on the host and returns float32 logits as
a NumPy array; ``synchronize()`` waits for queued GPU work. ``measure_latency`` times any runner the
same way (random batch, untimed warm-up, every run synchronized, percentiles over the timed runs), so
the zoo's, the ONNX stage's, the runtimes' and the INT8 stage's figures are comparable.

The runners live where their runtime does: ``course_utils.vision.inference.TorchRunner`` (PyTorch),
``course_utils.deploy.runtimes`` (ONNX Runtime, TensorRT). This module needs NumPy only.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from typing_extensions import Self

from course_utils.core.errors import CourseError


class RuntimeUnavailableError(CourseError, RuntimeError):
    """A runtime or device this machine does not have; the message says what to install or choose."""


class Runner(abc.ABC):
    """A model behind one runtime: ``run(images) -> logits``, both float32 NumPy arrays.

    ``runtime``: pytorch, onnxruntime or tensorrt; ``precision``: fp32, fp16 or int8; ``device``: cpu,
    cuda or tensorrt (ONNX Runtime's TensorRT provider); ``max_batch``: the largest batch accepted
    (None: any). Use it as a context manager, or call ``close()``, to free its resources.
    """

    runtime: str = ""
    precision: str = "fp32"
    device: str = "cpu"
    max_batch: int | None = None

    @property
    def threads(self) -> int | None:
        """CPU intra-op threads the runner computes with (None where the GPU computes)."""
        return None

    @property
    def key(self) -> str:
        """Its key in the benchmark record: ``onnxruntime_fp32``, ``tensorrt_int8``, ``pytorch_fp32_cuda``."""
        suffix = "" if self.device == "cpu" or self.runtime == "tensorrt" else f"_{self.device}"
        return f"{self.runtime}_{self.precision}{suffix}"

    @abc.abstractmethod
    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch."""

    def synchronize(self) -> None:
        """Wait until queued device work is done (timing calls this after every run)."""

    def close(self) -> None:
        """Free the runner's resources."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class Latency:
    """Latency percentiles (milliseconds) of one runner at one batch size."""

    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def throughput(self) -> float:
        """Images per second over all timed runs."""
        return self.batch * 1000.0 / self.mean_ms


def measure_latency(runner: Runner, batch: int, input_size: int, warmup: int, iterations: int,
                    clock: Callable[[], float] = time.perf_counter) -> Latency:
    """Time ``iterations`` runs on a random batch after ``warmup`` untimed ones (each run synchronized)."""
    images = np.random.default_rng(batch).standard_normal((batch, 3, input_size, input_size), dtype=np.float32)
    for _ in range(warmup):
        runner.run(images)
        runner.synchronize()
    samples = []
    for _ in range(iterations):
        started = clock()
        runner.run(images)
        runner.synchronize()
        samples.append((clock() - started) * 1000.0)
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return Latency(batch, iterations, float(p50), float(p90), float(p99), float(np.mean(samples)))


def compare_threads(make_runner: Callable[[int], Runner], counts: Sequence[int], batch: int, input_size: int,
                    warmup: int, iterations: int) -> dict[int, Latency]:
    """Latency of the same model at each intra-op thread count (one runner per count, closed after use)."""
    timings = {}
    for count in counts:
        with make_runner(count) as runner:
            timings[count] = measure_latency(runner, batch, input_size, warmup, iterations)
    return timings
