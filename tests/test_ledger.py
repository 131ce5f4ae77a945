import json
from pathlib import Path

import pytest

from course_utils.core.atomic import atomic_path
from course_utils.core.ledger import Ledger, LedgerError
from course_utils.core.report import render_html, render_markdown, write_report


def test_record_merges_and_stamps(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.record("finetune", {"val_top1": 0.9, "epochs": 3})
    ledger.record("finetune", {"train_seconds": 12.5})
    entry = ledger.stage("finetune")
    assert entry["val_top1"] == 0.9 and entry["train_seconds"] == 12.5 and "recorded_at" in entry
    ledger.record("finetune", {"val_top1": 0.5}, replace=True)
    assert "epochs" not in ledger.stage("finetune")
    assert json.loads((tmp_path / "results.json").read_text())["finetune"]["val_top1"] == 0.5


@pytest.mark.parametrize("metrics", [{"val_top1": 93.0}, {"block_rate": -0.1}, {"latency_ms": float("nan")},
                                     {"per_class": {"bees_top1": 2.0}}])
def test_conventions_are_enforced(tmp_path: Path, metrics: dict) -> None:
    with pytest.raises(LedgerError):
        Ledger(tmp_path).record("x", metrics)
    assert not (tmp_path / "results.json").exists()


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
    results = {"onnx": {"nodes_raw": 10}, "finetune": {"val_top1": 0.95, "recorded_at": "t"}, "extra": {"a": {"b": 1}}}
    markdown = render_markdown(results)
    assert markdown.index("Fine-tuning") < markdown.index("ONNX") < markdown.index("extra")
    assert "| a.b | 1 |" in markdown and "recorded_at" not in markdown
    assert "<td>val_top1</td><td>0.95</td>" in render_html(results)
    md, page = write_report(results, tmp_path)
    assert md.read_text() == markdown and page.exists()
