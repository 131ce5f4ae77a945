"""The CLI: the course's own errors print one line (``--debug``: the traceback); any other error keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from course_utils import cli
from course_utils.core.errors import CourseError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network probe, a throwaway workspace, no spec or setting from the caller's environment."""
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    monkeypatch.setenv("COURSE_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.delenv("COURSE_SPEC", raising=False)
    monkeypatch.delenv("COURSE_DATA_CACHE", raising=False)


def test_folder_without_class_folders_prints_one_line(tmp_path: Path, offline: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    _image(folder / "a.jpg"), _image(folder / "b.jpg")
    assert cli.main(["data", "--set", f"dataset.name={folder}"]) == 2
    assert "No class folders in" in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path: Path, offline: None) -> None:
    from course_utils.vision.data import DatasetError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No class folders"):
        cli.main(["data", "--debug", "--set", f"dataset.name={tmp_path / 'empty'}"])


def test_unknown_backbone_stops_train_before_any_training(tmp_path: Path, offline: None,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from course_utils.vision import finetune

    monkeypatch.setattr(finetune, "fit", lambda *a, **k: pytest.fail("training started"))
    root = tmp_path / "set"
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            _image(root / split / name / f"{name}.jpg")
    assert cli.main(["train", "--set", f"dataset.name={root}", "--set", "model.backbone=resnet-5O"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: Unknown model 'resnet-5O'.") and "course_utils zoo" in line
    assert not line.startswith("error: \"")  # a KeyError, but its message is not wrapped in quotes


def test_config_errors_print_one_line(offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "--set", "no_equals_sign"]) == 2
    assert "--set expects key=value" in _one_error_line(capsys)


def test_other_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "zoo", (broken, "broken"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["zoo"])


def _error_classes() -> list[tuple[type[BaseException], type[BaseException]]]:
    from course_utils.app.catalog import AppError
    from course_utils.core.config import ConfigError
    from course_utils.core.downloads import DownloadError, HashMismatchError
    from course_utils.core.ledger import LedgerError
    from course_utils.deploy.calibration import CalibrationError
    from course_utils.deploy.graph_optimize import ParityError
    from course_utils.deploy.onnx_export import ExportError
    from course_utils.deploy.ptq import QuantizationError
    from course_utils.deploy.runtimes import RuntimeUnavailableError
    from course_utils.deploy.tensorrt_engines import EngineBuildError
    from course_utils.genai.imagegen import BlockedStoryError, ImageGenError
    from course_utils.genai.llm import LLMEndpointError
    from course_utils.genai.speech import AudioError, SpeechError
    from course_utils.vision.compat import UnsafeCheckpointError
    from course_utils.vision.data import DatasetError, DatasetIntegrityError
    from course_utils.vision.prune import PruningError
    from course_utils.vision.zoo import UnknownModelError, WeightsUnavailableError

    return [(AppError, RuntimeError), (ConfigError, ValueError), (DownloadError, RuntimeError),
            (HashMismatchError, RuntimeError), (LedgerError, ValueError), (CalibrationError, ValueError),
            (ParityError, AssertionError), (ExportError, RuntimeError), (QuantizationError, RuntimeError),
            (RuntimeUnavailableError, RuntimeError), (EngineBuildError, RuntimeError),
            (ImageGenError, RuntimeError), (BlockedStoryError, RuntimeError), (LLMEndpointError, RuntimeError),
            (SpeechError, RuntimeError), (AudioError, ValueError), (UnsafeCheckpointError, RuntimeError),
            (DatasetError, ValueError), (DatasetIntegrityError, ValueError), (PruningError, ValueError),
            (UnknownModelError, KeyError), (WeightsUnavailableError, RuntimeError)]


def test_the_course_errors_are_course_errors_and_keep_their_builtin_base() -> None:
    for error_class, builtin in _error_classes():
        error = error_class("Set x to y.")
        assert isinstance(error, CourseError) and isinstance(error, builtin), error_class
        assert str(error) == "Set x to y.", error_class


def test_a_stage_without_its_upstream_names_the_notebook_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURSE_WORKSPACE", str(tmp_path / "workspace"))
    assert cli.main(["export", "--spec", "smoke"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: No finetune artifacts") and "notebook 02" in line
    assert not (tmp_path / "workspace" / "train").exists()  # nothing was trained on the way


def test_build_engine_builds_the_precisions_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.deploy import tensorrt_engines

    asked: list[object] = []

    def run(config: object, plan_for: str | None = None, precisions: object = None) -> None:
        asked.append(precisions)
        raise CourseError("stopped before planning")  # what was asked is all this test needs

    monkeypatch.setattr(tensorrt_engines, "run", run)
    assert cli.main(["build-engine", "--spec", "smoke", "--precisions", "fp32", "fp16"]) == 2
    assert cli.main(["build-engine", "--spec", "smoke"]) == 2
    assert asked == [["fp32", "fp16"], None]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["build-engine", "--precisions", "int4"])
