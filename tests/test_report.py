"""The instructor's report: headline, pictures, folded details, provenance, ``--compare``, and Chromium renders it.

Every test builds a fake ledger (records with a few bytes of stand-in files, figures shaped as the stages
write them): no stage runs, so the whole file takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from course_utils import cli
from course_utils.core.artifacts import (
    AppRecord,
    BenchmarkRecord,
    CourseRunRecord,
    DeviceRunRecord,
    EnginesRecord,
    EnvironmentRecord,
    FileRef,
    FinetuneRecord,
    ImagegenRecord,
    OnnxRecord,
    PruneRecord,
    PtqRecord,
    QatRecord,
    SpeechRecord,
    StoryRecord,
)
from course_utils.core.ledger import Ledger
from course_utils.core.report import (
    detail_tables,
    label,
    load_run,
    readable,
    render_html,
    render_markdown,
    summarize,
    write_comparison,
    write_report,
)
from course_utils.core.showcase import keep_app_run, last_run_images

CHROMIUM = shutil.which("chromium")
CLASSES = ["brick", "grass", "stars"]


def _file(workspace: Path, name: str, size: int) -> FileRef:
    path = workspace / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(name.encode() * (size // len(name)))
    return FileRef.of(path, workspace)


def _runtime(b1: float, b8: float, top1: float, device: str = "cpu", threads: int | None = 1) -> dict[str, Any]:
    return {"device": device, "threads": threads, "latency_ms_p50_b1": b1, "latency_ms_p50_b8": b8,
            "throughput_b8": round(8000 / b8, 2), "val_top1": top1}


def make_run(workspace: Path, onnx_b8_ms: float = 269.0, overrides: dict[str, Any] | None = None) -> Ledger:
    """A whole course run as the stages record it, on stand-in files (what the report reads, nothing more)."""
    ledger = Ledger(workspace)
    ledger.save(EnvironmentRecord(metrics={
        "course_path": "CPU path: PyTorch and ONNX Runtime on the CPU", "dataset": "package-textures",
        "dataset_source": "built offline from package images", "online": False, "val_images": 30,
        "dataset_fallback": f"hymenoptera: hymenoptera is not cached in {workspace}/cache/hymenoptera.",
        "offline_assets_present": ["efficientnet-lite0 weights"]}))
    finetuned = ledger.save(FinetuneRecord(
        checkpoint=_file(workspace, "models/finetuned.pt", 13_800_000), backbone="efficientnet-lite0",
        dataset="package-textures", classes=CLASSES, weights="pretrained: efficientnet-lite0-57934424.pth",
        tools={"torch": "2.14.1"}, metrics={
            "val_top1": 0.9, "per_class_top1": {"brick": 1.0, "grass": 0.9, "stars": 0.8}, "train_seconds": 245.0,
            "history": [{"epoch": e, "phase": "head" if e < 2 else "finetune", "train_loss": 1.0 / (e + 1),
                         "val_loss": 1.1 / (e + 1), "train_top1": 0.5 + 0.1 * e, "val_top1": 0.45 + 0.1 * e}
                        for e in range(4)],
            "confusion": [[10, 0, 0], [1, 9, 0], [0, 2, 8]]}))
    ledger.save(PruneRecord(
        model=_file(workspace, "models/pruned.pt", 7_500_000), meets_target=False, macs_reduction=0.44,
        top1_drop=0.3, target="≥ 40% fewer MACs within 1 point(s) of the unpruned top-1",
        made_from={"finetuned": finetuned.checkpoint.sha256},
        settings={"prune": {"target_macs_reduction": 0.4, "max_top1_drop": 0.01}},
        metrics={"macs_before": 372_517_733, "val_top1_unpruned": 0.9, "ratio": 0.25, "macs_reduction": 0.44,
                 "sweep": {"ratio_0": {"macs": 372_517_733, "val_top1_after_retrain": 0.9, "val_top1_before_retrain": 0.9},
                           "ratio_0.25": {"macs": 210_197_949, "val_top1_after_retrain": 0.6,
                                          "val_top1_before_retrain": 0.2}}}))
    onnx_file = _file(workspace, "onnx/optimized.onnx", 13_460_000)
    onnx = ledger.save(OnnxRecord(raw=onnx_file, optimized=onnx_file, source="finetuned", backbone="efficientnet-lite0",
                                  input_name="images", output_name="logits", input_size=224,
                                  made_from={"model": finetuned.checkpoint.sha256},
                                  tools={"onnxruntime": "1.31.1"}, metrics={"parity_max_rel_diff": 6.7e-7}))
    upstream = {"model": finetuned.checkpoint.sha256, "onnx": onnx.optimized.sha256}
    ledger.save(EnginesRecord(made_from={"onnx": onnx.optimized.sha256}, settings={"planned_for_tensorrt": "10.3.0"}))
    ledger.save(BenchmarkRecord(made_from=upstream, settings={"benchmark": {"threads": 1}}, metrics={
        "pytorch_fp32": _runtime(93.5, 873.0, 0.9), "onnxruntime_fp32": _runtime(19.4, onnx_b8_ms, 0.9),
        "onnxruntime_vs_pytorch_b8": 3.2, "onnxruntime_threads_p50_ms": {"1": 153.5, "2": 388.3}}))
    ledger.save(DeviceRunRecord(device="Jetson Orin Nano 8 GB (JetPack 6.1, power mode 15W)",
                                made_from={"onnx": onnx.optimized.sha256}, tensorrt="10.3.0",
                                tools={"onnxruntime": "1.16.0", "tensorrt": "10.3.0"}, metrics={
        "tensorrt_fp16": _runtime(2.1, 9.8, 0.9, device="cuda", threads=None),
        "onnxruntime_fp32": _runtime(41.0, 300.0, 0.9, threads=6)}))
    variants = {"ort-u8s8-entropy": {"target": "cpu", "val_top1": 0.883, "latency_ms_b1": 11.9, "latency_ms_b8": 70.5,
                                     "size_mb": 3.6, "agreement_with_fp32": 0.98, "top1_drop_vs_fp32": 0.016667},
                "modelopt-entropy": {"target": "tensorrt", "val_top1": 0.7, "latency_ms_b1": 51.9, "latency_ms_b8": 509.4,
                                     "size_mb": 13.0, "agreement_with_fp32": 0.72, "top1_drop_vs_fp32": 0.2}}
    ledger.save(PtqRecord(cpu_int8=_file(workspace, "int8/cpu.onnx", 3_800_000), made_from={"onnx": onnx.optimized.sha256},
                          metrics={"best_cpu_variant": "ort-u8s8-entropy", "variants": variants,
                                   "fp32": {"val_top1": 0.9, "latency_ms_b1": 17.1, "latency_ms_b8": 139.5}}))
    ledger.save(QatRecord(onnx=_file(workspace, "int8/qat.onnx", 14_000_000), made_from={"model": finetuned.checkpoint.sha256},
                          metrics={"val_top1": 0.9, "onnx_parity_ok": True, "onnx_parity_agreement": 1.0}))
    ledger.save(StoryRecord(metrics={
        "endpoint": "local:smollm2@http://127.0.0.1:60895/v1", "rails": "guarded", "block_rate": 0.8,
        "redteam": {"none": {"block_rate": 0.0, "false_positive_rate": 0.0, "prompts": 24, "by_category": {
                        "violence": 0.0, "jailbreak": 0.0}},
                    "guarded": {"block_rate": 0.8, "false_positive_rate": 0.1, "prompts": 24, "by_category": {
                        "violence": 1.0, "jailbreak": 0.6}}}}))
    ledger.save(ImagegenRecord(metrics={"model": "tiny-random-sd", "real_weights": False, "round_trip_subject": "brick",
                                        "round_trip_top1": "grass", "subject_survived": False}))
    photos = [(f"{name}.png", Image.new("RGB", (300, 200), color)) for name, color in
              (("brick", (180, 60, 40)), ("grass", (40, 160, 60)))]
    top5 = [[("brick", 0.9), ("grass", 0.05), ("stars", 0.05)], [("grass", 0.7), ("brick", 0.2), ("stars", 0.1)]]
    ledger.save(AppRecord(metrics={"demo_ready": {"ONNX export": "ready", "TensorRT engines": "skipped"},
                                   "last_run": keep_app_run(workspace, photos, top5, "Once upon a time, a brick…", False,
                                                            Image.new("RGB", (512, 512), (90, 90, 200)), True)}))
    ledger.save(SpeechRecord(metrics={"tts_model": "piper/en_US-joe-medium", "story_source": "/home/someone/story.wav",
                                      "wer_clips": 0.0857}))
    ledger.save(CourseRunRecord(settings={"spec": "smoke", "overrides": overrides or {}}, tools={"torch": "2.14.1"},
                                metrics={"notebooks": {"00_setup_and_doctor": 12.0, "02_fine_tuning": 95.5},
                                         "total_seconds": 107.5, "machine": {"cpu": "Test CPU · 2 cores"}}))
    return ledger


@pytest.fixture
def run(tmp_path: Path) -> Ledger:
    return make_run(tmp_path / "team-a")


def test_the_headline_names_every_runtime_with_its_device(run: Ledger) -> None:
    summary = summarize(run)
    rows = {row.key: row for row in summary.pipeline}
    here = "this machine · CPU, 1 thread"
    assert list(rows) == [f"PyTorch FP32 · {here}", f"ONNX Runtime FP32 · {here}", f"ONNX Runtime INT8 PTQ · {here}",
                          "QAT INT8 (Q/DQ ONNX) · this machine · ONNX Runtime CPU (accuracy only)",
                          "ONNX Runtime FP32 · Jetson Orin Nano 8 GB (JetPack 6.1, power mode 15W) · CPU, 6 threads",
                          "TensorRT FP16 · Jetson Orin Nano 8 GB (JetPack 6.1, power mode 15W) · GPU"]
    pytorch, int8 = rows[f"PyTorch FP32 · {here}"], rows[f"ONNX Runtime INT8 PTQ · {here}"]
    assert (pytorch.size_mb, pytorch.latency_b8_ms, int8.size_mb) == (13.8, 873.0, 3.8)
    assert int8.throughput_b8 == pytest.approx(8000 / 70.5, abs=0.01)
    assert any("notebook 06's own timing" in note for note in summary.pipeline_notes)
    assert any("TensorRT 10.3.0" in note for note in summary.pipeline_notes)
    assert [(t.what.split()[0], t.met) for t in summary.targets] == [
        ("Pruning", False), ("QAT", True), ("The", None), ("Ready", True)]
    markdown = render_markdown(run)
    assert markdown.startswith("# efficientnet-lite0 on package-textures")
    assert markdown.index("Model shipped: the finetuned efficientnet-lite0 (finetuned.pt), because the pruned model "
                          "misses its target") < markdown.index("## The deployed model") < markdown.index("## Targets")
    assert ("| TensorRT FP16 | Jetson Orin Nano 8 GB (JetPack 6.1, power mode 15W) · GPU | 90% | — | 2.1 ms | 9.8 ms "
            "| 816.3 images/s |") in markdown


def test_the_final_benchmarks_qat_row_replaces_the_accuracy_only_one(run: Ledger) -> None:
    benchmark = run.load(BenchmarkRecord)
    assert benchmark is not None
    measured = {"onnxruntime_int8-qat": _runtime(60.0, 480.0, 0.9), "onnxruntime_int8": _runtime(11.0, 70.0, 0.883)}
    run.save(benchmark.model_copy(update={"metrics": {**benchmark.metrics, **measured}}))
    rows = {row.label: row for row in summarize(run).pipeline}
    assert "QAT INT8 (Q/DQ ONNX)" not in rows
    assert [label for label in rows if label.startswith("ONNX Runtime INT8")] == [
        "ONNX Runtime INT8 PTQ", "ONNX Runtime INT8 QAT"]
    assert (rows["ONNX Runtime INT8 QAT"].size_mb, rows["ONNX Runtime INT8 QAT"].latency_b8_ms) == (14.0, 480.0)
    assert not any("notebook 06's own timing" in note for note in summarize(run).pipeline_notes)


def test_figures_are_in_readable_units() -> None:
    assert [readable(0.983, "val_top1"), readable(1.0, "block_rate"), readable(0.016667, "top1_drop_vs_fp32")] == [
        "98.3%", "100%", "1.7 points"]
    assert [readable(12.345, "latency_ms_b1"), readable(0.25, "p50_latency_s"), readable(245.0, "train_seconds")] == [
        "12.3 ms", "250 ms", "4 min 05 s"]
    assert [readable(372_517_733, "macs_before"), readable(3_377_413, "params"), readable(13.46, "size_optimized_mb"),
            readable(3.23, "onnxruntime_vs_pytorch_b8"), readable(None, "x"), readable(True, "ok")] == [
        "373 M MACs", "3.38 M", "13.5 MB", "3.23×", "—", "yes"]
    assert label("latency_ms_b1_after") == "latency batch 1 after" and label("per_class_top1.brick") == "per class top-1 · brick"


def test_details_group_same_shaped_figures_into_small_tables() -> None:
    tables = detail_tables({"best_cpu_variant": "a", "fp32": {"val_top1": 0.9, "size_mb": 12.8},
                            "variants": {"a": {"val_top1": 0.88, "latency_ms_b8": 70.5},
                                         "b": {"val_top1": 0.7, "latency_ms_b8": 509.4}}})
    main, variants = tables
    assert main.rows == [["best cpu variant", "a"], ["fp32 · val top-1", "90%"], ["fp32 · size", "12.8 MB"]]
    assert (variants.title, variants.header, variants.rows) == (
        "variants", ["", "val top-1", "latency batch 8"], [["a", "88%", "70.5 ms"], ["b", "70%", "509 ms"]])


def test_the_page_names_stand_ins_and_shows_no_machine_path(run: Ledger) -> None:
    page, markdown = render_html(run), render_markdown(run)
    for text in (page, markdown):
        assert str(run.workspace) not in text and "/home/someone" not in text
        assert "pictures are noise: no image model offline" in text
        assert "instead of hymenoptera" in text and "smollm2 served locally by llama.cpp" in text
    assert "Test CPU · 2 cores" in page and "<td>spec</td><td>smoke</td>" in page
    assert summarize(run).versions == {"onnxruntime": "1.31.1", "onnxruntime (on the device)": "1.16.0",
                                       "tensorrt (on the device)": "10.3.0", "torch": "2.14.1"}
    assert page.count("<details class='stage'") == 13 and "<details class='stage' open" not in page


def test_a_row_made_from_an_older_model_says_it_is_stale(run: Ledger) -> None:
    onnx = run.load(OnnxRecord)
    assert onnx is not None
    exported_again = _file(run.workspace, "onnx/optimized.onnx", 100)  # the benchmark timed the old export
    run.save(onnx.model_copy(update={"raw": exported_again, "optimized": exported_again}))
    summary = summarize(run)
    assert all(row.note == "⚠ stale" for row in summary.pipeline if row.label != "QAT INT8 (Q/DQ ONNX)")
    assert any(note.startswith("⚠ stale benchmark rows") and "notebook 07" in note for note in summary.pipeline_notes)


def test_the_app_run_is_kept_small_and_read_back_only_from_the_workspace(run: Ledger, tmp_path: Path) -> None:
    last_run = run.load(AppRecord).metrics["last_run"]  # type: ignore[union-attr]
    assert last_run["photos"][0] == {"name": "brick.png", "image": "app/last_run/photo_0.png",
                                     "top5": [["brick", 0.9], ["grass", 0.05], ["stars", 0.05]]}
    images = last_run_images(run.workspace, last_run)
    assert sorted(images) == ["app/last_run/photo_0.png", "app/last_run/photo_1.png", "app/last_run/picture.png"]
    assert max(Image.open(run.workspace / "app/last_run/photo_0.png").size) == 160
    (tmp_path / "secret.png").write_bytes(b"not for the report")
    assert last_run_images(run.workspace, {"photos": [{"image": "../secret.png"}]}) == {}


def test_a_report_folder_reads_back_as_the_run_it_was(run: Ledger, tmp_path: Path) -> None:
    markdown, page = write_report(run, tmp_path / "runs" / "20261201-120000")
    assert markdown.read_text() == render_markdown(run) and page.read_text().startswith("<!doctype html>")
    again = load_run(markdown.parent)
    assert again.label == f"{tmp_path.name} 20261201-120000"
    assert again.model_dump(exclude={"label"}) == summarize(run).model_dump(exclude={"label"})
    assert json.loads((markdown.parent / "report.json").read_text())["shipped_kind"] == "finetuned"


def test_compare_puts_two_runs_side_by_side(run: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    other = make_run(tmp_path / "team-b", onnx_b8_ms=135.0, overrides={"train.epochs_head": 2})
    markdown, page = write_comparison(load_run(run.workspace), load_run(other.workspace), tmp_path / "out")
    text = markdown.read_text()
    assert text.startswith("# team-a vs team-b")
    assert "| overrides | none | train.epochs_head=2 |" in text
    assert ("| ONNX Runtime FP32 · this machine · CPU, 1 thread | 90% | 90% | 13.5 MB | 13.5 MB | 19.4 ms | 19.4 ms "
            "| 269 ms | 135 ms |") in text
    html = page.read_text()
    assert html.count("<tr class=differs>") >= 2 and html.count("<img src='data:image/png;base64,") == 3
    monkeypatch.setenv("COURSE_WORKSPACE", str(tmp_path / "unused"))
    assert cli.main(["report", "--compare", str(run.workspace), str(other.workspace), "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "cli" / "compare.md"), str(tmp_path / "cli" / "compare.html")]
    assert cli.main(["report", "--compare", str(run.workspace), str(tmp_path / "nowhere")]) == 2
    assert "is neither a workspace (no results.json) nor a report folder" in capsys.readouterr().err


def test_an_empty_workspace_says_what_to_run(tmp_path: Path) -> None:
    assert "Nothing was recorded yet" in render_html(Ledger(tmp_path)) and "make course" in render_markdown(Ledger(tmp_path))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: `apt-get install -y chromium`")
def test_chromium_renders_the_report_loads_every_image_and_fetches_nothing(run: Ledger, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="`pip install -e .[dev]` installs playwright")
    from course_utils.app.server import CHROMIUM_FLAGS

    _, page_path = write_report(run, tmp_path / "report")
    requests: list[str] = []
    console: list[str] = []
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_FLAGS))
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", lambda route: (requests.append(route.request.url),
                                                 route.continue_() if route.request.url.startswith("file:")
                                                 else route.abort()))
            page = context.new_page()
            page.on("console", lambda message: console.append(message.text))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("h1").inner_text() == "efficientnet-lite0 on package-textures"
            assert page.locator("table.headline tr").count() == 7  # a header and six runtime rows
            assert page.locator("table.headline").is_visible() and page.locator(".shipped").is_visible()
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            assert len(images) == 9 and all(complete and width > 0 for complete, width, _ in images), images
            assert page.locator(".pictures figure").count() == 8  # six plots, the photos, the story and its picture
            assert not page.locator("details.stage table").first.is_visible()  # the details start folded
            page.locator("details.stage summary").first.click()
            assert page.locator("details.stage table").first.is_visible()
        finally:
            browser.close()
    assert requests == [page_path.as_uri()], requests
    assert console == [], console  # a blocked fetch or a broken image would be logged here
