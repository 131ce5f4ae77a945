"""The final benchmark: every runtime and precision of the model that ships, side by side, without rerunning a stage.

Each precision is made by the notebook that teaches it: FP32 and FP16 engines in 05, the INT8 models and
engines in 06, the QAT model in 07. ``run(config)`` reads the ledger, measures every artifact that exists
with the course's one benchmark (``runtimes.run_benchmark``: latency, throughput and validation top-1), and
saves the ``BenchmarkRecord`` that the report's headline table reads. It builds, calibrates and trains
nothing: a row that is missing says which notebook (or machine) makes it. Figures measured on a Jetson
(``import-results``) are shown beside this machine's. Notebook 07's last section and
``python -m course_utils benchmark`` call it; ``make course`` runs 07, so its report ends with these rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from course_utils.core.artifacts import BenchmarkRecord, DeviceRunRecord
from course_utils.core.config import CourseConfig
from course_utils.core.environment import package_version, tensorrt_version
from course_utils.core.ledger import Ledger
from course_utils.deploy.runtimes import benchmark_metrics, speedup

# (runtime, precision key) -> the row's words, in the order of the table.
ROWS: dict[tuple[str, str], str] = {
    ("pytorch", "fp32"): "PyTorch FP32", ("onnxruntime", "fp32"): "ONNX Runtime FP32",
    ("onnxruntime", "int8"): "ONNX Runtime INT8 PTQ", ("onnxruntime", "int8-qat"): "ONNX Runtime INT8 QAT",
    ("tensorrt", "fp32"): "TensorRT FP32", ("tensorrt", "fp16"): "TensorRT FP16",
    ("tensorrt", "int8"): "TensorRT INT8 PTQ",
}
MADE_BY = {"int8": "notebook 06 (`python -m course_utils quantize`)",
           "int8-qat": "notebook 07 (`python -m course_utils qat`)"}
COLUMNS = ["runtime", "ran on", "val top-1", "p50 ms b1", "p50 ms b8", "images/s b8", "note"]


def row_key(runtime: str, precision: str) -> str:
    """The runtime's key in the record (``Runner.key`` of a CPU or TensorRT runner): ``onnxruntime_int8-qat``."""
    return f"{runtime}_{precision}"


def missing_reason(runtime: str, precision: str, tensorrt: str | None, skipped: Mapping[str, str]) -> str:
    """Why a row has no figures on this machine, naming what makes it."""
    if runtime != "tensorrt":
        return f"not made yet: run {MADE_BY.get(precision, 'notebook 04')}"
    if tensorrt is None:
        return "no TensorRT here: the Jetson deploy kit (notebook 05) measures it on the device"
    if precision in skipped:
        return str(skipped[precision])
    return f"not built: run notebook {'06' if precision == 'int8' else '05'} on this machine"


def ran_on(where: str, entry: Mapping[str, Any]) -> str:
    """``this machine · CPU, 1 thread(s)``, ``this machine · GPU``, or the device's own words."""
    if where != "this machine":
        return where
    return f"{where} · CPU, {entry.get('threads')} thread(s)" if entry.get("device", "cpu") == "cpu" else f"{where} · GPU"


@dataclass
class FinalBenchmark:
    """The final benchmark: this machine's record, the imported device run, and why rows are missing."""

    record: BenchmarkRecord
    device: DeviceRunRecord | None
    missing: dict[str, str]  # row words -> why it has no figures here

    def rows(self) -> list[dict[str, Any]]:
        """One row per runtime and precision: measured here, on the device, or missing (with why)."""
        rows = []
        sources = [("this machine", self.record.metrics)]
        if self.device is not None:
            sources.append((self.device.device, self.device.metrics))
        for (runtime, precision), words in ROWS.items():
            for where, metrics in sources:
                entry = metrics.get(row_key(runtime, precision))
                if isinstance(entry, Mapping):
                    rows.append({"runtime": words, "ran on": ran_on(where, entry), "val top-1": entry.get("val_top1", "-"),
                                 "p50 ms b1": entry.get("latency_ms_p50_b1", "-"),
                                 "p50 ms b8": entry.get("latency_ms_p50_b8", "-"),
                                 "images/s b8": entry.get("throughput_b8", "-"), "note": ""})
            if words in self.missing:
                rows.append({"runtime": words, "ran on": "-", "val top-1": "-", "p50 ms b1": "-", "p50 ms b8": "-",
                             "images/s b8": "-", "note": self.missing[words]})
        return rows

    def markdown(self) -> str:
        """The side-by-side table as Markdown (validation split)."""
        from course_utils.core.report import markdown_table

        return markdown_table(self.rows(), COLUMNS)


def run(config: CourseConfig) -> FinalBenchmark:
    """Measure every runtime and precision whose artifact exists (nothing is rebuilt) and record it.

    Needs notebook 04's ONNX of the model that ships (else the error names it); the INT8 PTQ, INT8 QAT and
    TensorRT rows appear when their notebooks made them from this very model and ONNX.
    """
    from course_utils.core.artifacts import EnginesRecord
    from course_utils.deploy.runtimes import run_benchmark

    measured = run_benchmark(config, thread_counts=())
    metrics: dict[str, Any] = benchmark_metrics(measured.results)
    if 8 in config.benchmark.batch_sizes:
        metrics["onnxruntime_vs_pytorch_b8"] = round(speedup(measured.results, "onnxruntime_fp32", "pytorch_fp32"), 3)
    ledger = Ledger(config.workspace)
    record = ledger.save(BenchmarkRecord(
        made_from=measured.made_from, settings={"benchmark": config.benchmark.model_dump()},
        tools={"onnxruntime": package_version("onnxruntime"), "torch": package_version("torch"),
               "tensorrt": tensorrt_version()}, metrics=metrics))
    engines = ledger.current(EnginesRecord, made_from={"onnx": measured.made_from["onnx"]})
    skipped = engines.metrics.get("skipped_engines", {}) if engines is not None else {}
    missing = {words: missing_reason(runtime, precision, tensorrt_version(), skipped)
               for (runtime, precision), words in ROWS.items() if row_key(runtime, precision) not in metrics}
    device = ledger.current(DeviceRunRecord, made_from={"onnx": measured.made_from["onnx"]})
    return FinalBenchmark(record, device, missing)
