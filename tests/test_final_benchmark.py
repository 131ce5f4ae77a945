"""The final benchmark: every runtime and precision that exists, side by side, recorded; nothing rebuilt."""

from __future__ import annotations

from typing import Any

import pytest

from course_utils.core.artifacts import BenchmarkRecord, DeviceRunRecord
from course_utils.core.config import CourseConfig
from course_utils.core.ledger import Ledger
from course_utils.core.timing import Latency
from course_utils.deploy import final_benchmark, runtimes
from course_utils.deploy.runtimes import BenchmarkResult, RuntimeResult


def _result(key: str, p50_ms: float, top1: float) -> RuntimeResult:
    runtime, precision = key.split("_", 1)
    latency = {batch: Latency(batch, 3, p50_ms * batch, p50_ms * batch, p50_ms * batch, p50_ms * batch)
               for batch in (1, 8)}
    return RuntimeResult(key, runtime, precision, "cpu", 1, latency, top1)


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """``runtimes.run_benchmark`` replaced by four CPU rows (no model is loaded); the calls it got."""
    calls: list[tuple[Any, ...]] = []
    results = [_result("pytorch_fp32", 100.0, 0.9), _result("onnxruntime_fp32", 40.0, 0.9),
               _result("onnxruntime_int8", 10.0, 0.88), _result("onnxruntime_int8-qat", 80.0, 0.89)]

    def fake(config: CourseConfig, precisions: Any = ("fp32", "fp16", "int8"), thread_counts: Any = (1, 2)
             ) -> BenchmarkResult:
        calls.append((tuple(precisions), tuple(thread_counts)))
        return BenchmarkResult(results, {}, {"model": "m" * 64, "onnx": "o" * 64, "int8": "i" * 64})

    monkeypatch.setattr(runtimes, "run_benchmark", fake)
    return calls


def test_every_precision_is_measured_and_recorded_and_missing_rows_say_why(
        config: CourseConfig, measured: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(final_benchmark, "tensorrt_version", lambda: None)
    final = final_benchmark.run(config)
    assert measured == [(("fp32", "fp16", "int8"), ())]  # every precision, and no thread comparison
    recorded = Ledger(config.workspace).load(BenchmarkRecord)
    assert recorded is not None and recorded.made_from["int8"] == "i" * 64
    assert recorded.metrics["onnxruntime_int8-qat"]["val_top1"] == 0.89
    assert recorded.metrics["onnxruntime_vs_pytorch_b8"] == pytest.approx(2.5)
    rows = {row["runtime"]: row for row in final.rows()}
    assert list(rows) == ["PyTorch FP32", "ONNX Runtime FP32", "ONNX Runtime INT8 PTQ", "ONNX Runtime INT8 QAT",
                          "TensorRT FP32", "TensorRT FP16", "TensorRT INT8 PTQ"]
    assert rows["ONNX Runtime INT8 PTQ"]["p50 ms b8"] == 80.0 and rows["ONNX Runtime INT8 PTQ"]["ran on"] == (
        "this machine · CPU, 1 thread(s)")
    assert all("no TensorRT here" in rows[name]["note"] for name in ("TensorRT FP32", "TensorRT FP16"))
    assert "| ONNX Runtime INT8 QAT | this machine · CPU, 1 thread(s) | 0.89 |" in final.markdown()


def test_a_jetsons_rows_stand_beside_this_machines(config: CourseConfig) -> None:
    record = BenchmarkRecord(metrics={"onnxruntime_fp32": {"device": "cpu", "threads": 2, "val_top1": 0.9}})
    device = DeviceRunRecord(device="Jetson Orin Nano (JetPack 6.1)", metrics={
        "tensorrt_int8": {"device": "cuda", "latency_ms_p50_b1": 1.5, "val_top1": 0.88}})
    missing = {"TensorRT INT8 PTQ": "no TensorRT here: the Jetson deploy kit (notebook 05) measures it on the device"}
    rows = final_benchmark.FinalBenchmark(record, device, missing).rows()
    assert [(r["runtime"], r["ran on"]) for r in rows] == [
        ("ONNX Runtime FP32", "this machine · CPU, 2 thread(s)"), ("TensorRT INT8 PTQ", "Jetson Orin Nano (JetPack 6.1)"),
        ("TensorRT INT8 PTQ", "-")]
    assert rows[1]["p50 ms b1"] == 1.5 and rows[1]["p50 ms b8"] == "-"


def test_missing_rows_name_the_notebook_or_machine_that_makes_them() -> None:
    assert "notebook 06" in final_benchmark.missing_reason("onnxruntime", "int8", None, {})
    assert "notebook 07" in final_benchmark.missing_reason("onnxruntime", "int8-qat", "10.3.0", {})
    assert final_benchmark.missing_reason("tensorrt", "int8", "10.3.0", {"int8": "int8 skipped: 3 images"}) == (
        "int8 skipped: 3 images")
    assert "notebook 06" in final_benchmark.missing_reason("tensorrt", "int8", "10.3.0", {})
    assert "notebook 05" in final_benchmark.missing_reason("tensorrt", "fp16", "10.3.0", {})

