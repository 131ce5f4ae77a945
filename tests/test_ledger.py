import json
from pathlib import Path

import pytest

from course_utils.core.artifacts import CourseRunRecord, EnvironmentRecord, OnnxRecord, StageRecord, ZooRecord
from course_utils.core.atomic import atomic_path
from course_utils.core.ledger import Ledger, LedgerError
from course_utils.core.report import render_html, render_markdown, write_report


def test_save_replaces_the_stage_and_stamps_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.save(ZooRecord(metrics={"val_top1": 0.9, "epochs": 3}))
    ledger.save(ZooRecord(metrics={"val_top1": 0.5}))
    loaded = ledger.load(ZooRecord)
    assert loaded is not None and loaded.metrics == {"val_top1": 0.5} and loaded.recorded_at
    assert json.loads((tmp_path / "results.json").read_text())["zoo"]["metrics"]["val_top1"] == 0.5
    assert ledger.load(EnvironmentRecord) is None


@pytest.mark.parametrize("metrics", [{"val_top1": 93.0}, {"block_rate": -0.1}, {"latency_ms": float("nan")},
                                     {"per_class": {"bees_top1": 2.0}}])
def test_conventions_are_enforced(tmp_path: Path, metrics: dict) -> None:
    with pytest.raises(LedgerError):
        Ledger(tmp_path).save(ZooRecord(metrics=metrics))
    assert not (tmp_path / "results.json").exists()


def test_a_record_of_no_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="names no stage"):
        Ledger(tmp_path).save(StageRecord())


def test_a_record_an_older_course_wrote_reads_as_missing(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"onnx": {"optimized_path": "/old/layout.onnx"}}))
    assert Ledger(tmp_path).load(OnnxRecord) is None


def test_concurrent_writers_lose_no_record(tmp_path: Path) -> None:
    """The app and a notebook may record at once: the file lock serialises read-modify-write."""
    import threading

    kinds = [ZooRecord, EnvironmentRecord, CourseRunRecord]

    def write(kind: type[StageRecord]) -> None:
        for step in range(15):
            Ledger(tmp_path).save(kind(metrics={"step": step}))

    threads = [threading.Thread(target=write, args=(kind,)) for kind in kinds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = Ledger(tmp_path).read()
    assert {kind.stage for kind in kinds} <= set(stored)
    assert all(stored[kind.stage]["metrics"]["step"] == 14 for kind in kinds)


def test_corrupt_ledger_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(LedgerError, match="move it aside"):
        Ledger(tmp_path).read()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".bin" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_report_lists_stages_in_course_order(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.save(CourseRunRecord(metrics={"notebooks": {"00": 1.5}}))
    ledger.save(ZooRecord(metrics={"val_top1": 0.95, "nested": {"a": 1}}))
    ledger.save(EnvironmentRecord(metrics={"online": False}))
    markdown = render_markdown(ledger)
    assert (markdown.index("Machine and assets") < markdown.index("Pretrained model zoo")
            < markdown.index("Wall time per notebook"))  # the main job's record is provenance, at the end
    assert "| val top-1 | 95% |" in markdown and "| nested · a | 1 |" in markdown and "recorded_at" not in markdown
    assert "<td>val top-1</td><td class=num>95%</td>" in render_html(ledger)
    md, page = write_report(ledger, tmp_path)
    assert md.read_text() == markdown and page.exists()
