"""atomic_directory: a folder is replaced whole when its block succeeds, and left alone when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from course_utils.core.atomic import atomic_directory


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir())


def test_success_creates_the_folder_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "built"
    with atomic_directory(target) as tmp:
        assert tmp.is_dir() and tmp.parent == target.parent and not any(tmp.iterdir())
        assert not target.exists()  # nothing is visible before the block succeeds
        (tmp / "data.txt").write_text("new")
        (tmp / "sub").mkdir()
    assert (target / "data.txt").read_text() == "new" and (target / "sub").is_dir()
    assert _siblings(target) == ["built"]


def test_a_failure_keeps_the_old_folder_and_removes_the_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "built"
    target.mkdir()
    (target / "data.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half way"), atomic_directory(target) as tmp:
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("half way")
    assert (target / "data.txt").read_text() == "old"
    assert _siblings(target) == ["built"]
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "never"):
        raise KeyboardInterrupt
    assert _siblings(target) == ["built"]


def test_a_rerun_replaces_an_existing_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "built"
    with atomic_directory(target) as tmp:
        (tmp / "stale.txt").write_text("first run")
        (tmp / "kept.txt").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "kept.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt"]  # no file of the first run survives
    assert (target / "kept.txt").read_text() == "2"
    assert _siblings(target) == ["built"]


def test_a_file_in_the_way_is_replaced_too(tmp_path: Path) -> None:
    target = tmp_path / "built"
    target.write_text("not a folder")
    with atomic_directory(target) as tmp:
        (tmp / "data.txt").write_text("new")
    assert (target / "data.txt").read_text() == "new" and _siblings(target) == ["built"]


def test_files_and_folders_get_the_usual_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from course_utils.core.atomic import write_text_atomic

    previous = os.umask(0o022)
    try:
        report = write_text_atomic(tmp_path / "report.html", "<p>shared with the class</p>")
        with atomic_directory(tmp_path / "kit") as folder:
            (folder / "README.md").write_text("copy me")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(report.stat().st_mode) == 0o644  # mkstemp alone gives 0o600: nobody else could read it
    assert stat.S_IMODE((tmp_path / "kit").stat().st_mode) == 0o755
