"""The ledger figures at the end of every notebook (``core.report.stage_markdown``): folded, readable, traces apart."""

from __future__ import annotations

from pathlib import Path

from course_utils.core.artifacts import EnvironmentRecord, FileRef, PtqRecord
from course_utils.core.report import split_traces, stage_markdown

SHA = "3f2a9c1b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c"


def _ptq(workspace: Path) -> PtqRecord:
    path = workspace / "int8" / f"model_ort-u8s8-minmax-{SHA[:16]}.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"onnx")
    return PtqRecord(cpu_int8=FileRef.of(path, workspace), made_from={"onnx": SHA}, metrics={
        "best_cpu_variant": "ort-u8s8-minmax", "best_cpu_speedup_b8": 2.38, "best_cpu_top1_drop_vs_fp32": 0.0,
        "calibration_sha256": SHA[:16], "calibration_images": 244,
        "variants": {"ort-u8s8-minmax": {"val_top1": 0.9477, "latency_ms_b8": 31.6, "path": str(path)},
                     "ort-u8s8-entropy": {"val_top1": 0.9477, "latency_ms_b8": 31.0, "path": str(path)}}})


def _main_view(markdown: str) -> str:
    """What an open summary shows before its inner ``Files and hashes`` block is opened."""
    return markdown.split("<details><summary>Files and hashes</summary>")[0]


def test_the_summary_is_folded_with_its_headline_figures_on_one_line(tmp_path: Path) -> None:
    markdown = stage_markdown(_ptq(tmp_path))
    first_line = markdown.splitlines()[0]
    assert first_line == ("<details><summary><b>06 · INT8 post-training quantization</b> · best cpu variant "
                          "ort-u8s8-minmax · best cpu speedup batch 8 2.38× · best cpu top-1 drop vs fp32 "
                          "0.0 points</summary>")
    assert markdown.rstrip().endswith("</details>") and markdown.count("<details>") == markdown.count("</details>")
    assert "<details open" not in markdown
    assert "| calibration images | 244 |" in markdown and "| ort-u8s8-minmax | 94.8% | 31.6 ms |" in markdown


def test_no_path_or_hash_is_in_the_main_view_and_every_one_is_in_the_folded_traces(tmp_path: Path) -> None:
    markdown = stage_markdown(_ptq(tmp_path))
    main, traces = _main_view(markdown), markdown.split("<summary>Files and hashes</summary>")[1]
    assert SHA[:12] not in main and str(tmp_path) not in main and "/int8/" not in main
    assert "| of | file, path or hash |" in traces and f"| calibration sha256 | {SHA[:16]} |" in traces
    assert f"| file: cpu int8 | model_ort-u8s8-minmax-{SHA[:16]}.onnx |" in traces
    assert "| variants · ort-u8s8-minmax · path | …/model_ort-u8s8-minmax-" in traces
    assert str(tmp_path) not in traces  # machine paths scrubbed even there


def test_plain_figures_and_an_empty_ledger_read_as_well() -> None:
    markdown = stage_markdown({"val_top1": 0.9, "source": "/home/someone/data/ants"})
    assert markdown.startswith("<details><summary><b>Figures</b></summary>")
    assert "| val top-1 | 90% |" in _main_view(markdown) and "ants" not in _main_view(markdown)
    assert stage_markdown(None) == "_(nothing recorded yet)_"
    assert "_(no figures)_" in stage_markdown(EnvironmentRecord())


def test_traces_are_split_by_key_and_by_value_at_any_depth() -> None:
    measured, traces = split_traces({"a": {"sha256": "x", "top1": 0.5}, "names": ["lite0", "/tmp/x/y"],
                                     "model": "deadbeefcafe", "run": f"run-{SHA[:12]}",
                                     "course_path": "CPU path: PyTorch and ONNX Runtime on the CPU"})
    assert measured == {"a": {"top1": 0.5}, "model": "deadbeefcafe",
                        "course_path": "CPU path: PyTorch and ONNX Runtime on the CPU"}
    assert traces == {"a.sha256": "x", "names": ["lite0", "/tmp/x/y"], "run": f"run-{SHA[:12]}"}
