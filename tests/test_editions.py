"""The learner and instructor editions, written from the one source in notebooks/ (course_utils.lessons.editions)."""

from __future__ import annotations

import ast
import subprocess
import symtable
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from course_utils.cli import main
from course_utils.core.config import REPO_ROOT
from course_utils.core.notebooks import course_notebooks
from course_utils.lessons import editions
from course_utils.lessons.editions import EditionError, build_editions, edition_dir

NOTEBOOKS = course_notebooks()


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _tagged(notebook: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if tag in cell.get("metadata", {}).get("tags", [])]


def _parameters(notebook: nbformat.NotebookNode) -> str:
    (cell,) = _tagged(notebook, "parameters")
    return cell.source


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("editions")
    build_editions(out)
    return out


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_learner_edition_holds_no_solution_code(built: Path, source: Path) -> None:
    original, learner = _read(source), _read(edition_dir(built, "en", "learner") / source.name)
    solutions = _tagged(original, "solution")
    others = "\n".join(cell.source for cell in original.cells if cell not in solutions)
    learner_text = "\n".join(cell.source for cell in learner.cells)
    assert not _tagged(learner, "solution")
    assert "if SHOW_SOLUTIONS" not in learner_text, "a solution hidden in the learner's own cell"
    for solution in solutions:
        assert solution.source.strip() not in learner_text
        for line in solution.source.splitlines():  # every line only a solution has, e.g. `answer = 2 * 3`
            if len(line.strip()) >= 8 and line.strip() not in others:
                assert line.strip() not in learner_text, f"{source.name}: solution line {line.strip()!r}"
    assert "SHOW_SOLUTIONS = False" in _parameters(learner)
    exercise_ids = [exercise.exercise.id for exercise in editions.exercises(original, source.name)]
    learner_cells = {cell.id: cell for cell in learner.cells}
    for exercise in editions.exercises(original, source.name):
        assert learner_cells[exercise.exercise.id].source == editions.LEARNER_NOTE + exercise.exercise.source
        assert learner_cells[exercise.check.id].source == exercise.check.source  # the check stays
    assert len(learner.cells) == len(original.cells) - len(solutions) and len(exercise_ids) == len(solutions)


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_solution_defines_nothing_a_later_cell_reads(source: Path) -> None:
    """Else the learner edition, which has no solution cells, would fail where the source runs."""
    notebook = _read(source)
    for exercise in editions.exercises(notebook, source.name):
        table = symtable.symtable(exercise.solution.source, exercise.solution.id, "exec")
        defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()} - {"answer"}
        later = notebook.cells[notebook.cells.index(exercise.solution) + 1:]
        read = {node.id for cell in later if cell.cell_type == "code" for node in ast.walk(ast.parse(cell.source))
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        assert not defined & read, f"{source.name}: only solution cell {exercise.solution.id} defines {defined & read}"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_an_instructor_edition_is_the_source_with_strict_checks(built: Path, source: Path) -> None:
    """So CI's run of the source with SHOW_SOLUTIONS=True is a run of the instructor edition."""
    original, instructor = _read(source), _read(edition_dir(built, "en", "instructor") / source.name)
    assert "SHOW_SOLUTIONS = True" in _parameters(instructor)
    assert [c.id for c in instructor.cells] == [c.id for c in original.cells]
    differ = [c.id for c, o in zip(instructor.cells, original.cells) if c.source != o.source]
    assert differ == [_tagged(original, "parameters")[0].id]
    assert _parameters(instructor) == _parameters(original).replace("SHOW_SOLUTIONS = False", "SHOW_SOLUTIONS = True")
    assert instructor.metadata["course_edition"]["source"] == f"notebooks/{source.name}"


def _notebook(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=[new_code_cell('SPEC = "smoke"\nSHOW_SOLUTIONS = False', metadata={"tags": ["parameters"]}),
                                   *cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def _exercise(answer: str = "answer = 4") -> list[nbformat.NotebookNode]:
    return [new_markdown_cell("### Exercise · two and two"),
            new_code_cell("answer = None  # your answer here", metadata={"tags": ["exercise"]}),
            new_code_cell(answer, metadata={"tags": ["solution"]}),
            new_code_cell("exercises.check_sum(answer, strict=SHOW_SOLUTIONS)")]


def _write_sources(folder: Path, **notebooks: nbformat.NotebookNode) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, notebook in notebooks.items():
        nbformat.write(notebook, folder / f"{name}.ipynb")


def test_editions_are_rewritten_only_when_their_source_changes(tmp_path: Path) -> None:
    sources, out = tmp_path / "notebooks", tmp_path / "editions"
    _write_sources(sources, **{"00_first": _notebook(*_exercise()), "01_second": _notebook(*_exercise())})
    first = build_editions(out, sources)
    assert sorted((f.edition, f.path.name, f.written) for f in first) == [
        ("instructor", "00_first.ipynb", True), ("instructor", "01_second.ipynb", True),
        ("learner", "00_first.ipynb", True), ("learner", "01_second.ipynb", True)]
    stamps = {f.path: f.path.stat().st_mtime_ns for f in first}
    assert not any(f.written for f in build_editions(out, sources))  # idempotent: nothing to rewrite
    assert {f.path: f.path.stat().st_mtime_ns for f in first} == stamps

    _write_sources(sources, **{"01_second": _notebook(*_exercise("answer = 2 + 2"))})
    (sources / "00_first.ipynb").unlink()
    again = build_editions(out, sources)
    assert sorted((f.edition, f.path.name) for f in again if f.written) == [
        ("instructor", "01_second.ipynb"), ("learner", "01_second.ipynb")]
    assert sorted(p.name for p in (out / "en").rglob("*.ipynb")) == ["01_second.ipynb", "01_second.ipynb"]
    assert "2 + 2" not in (edition_dir(out, "en", "learner") / "01_second.ipynb").read_text()


@pytest.mark.parametrize(("cells", "message"), [
    (_exercise()[2:], "must follow a cell tagged 'exercise'"),
    (_exercise()[:2], "must be a code cell followed by its solution"),
    (_exercise()[:3] + [new_code_cell("print(answer)")], "calls an exercise check"),
])
def test_a_source_off_the_convention_is_refused_naming_the_cell(tmp_path: Path, cells: list, message: str) -> None:
    _write_sources(tmp_path / "notebooks", **{"00_broken": _notebook(*cells)})
    with pytest.raises(EditionError, match=message) as error:
        build_editions(tmp_path / "editions", tmp_path / "notebooks")
    assert str(error.value).startswith("00_broken.ipynb: ")


def test_a_translated_edition_is_one_more_language(tmp_path: Path) -> None:
    """The hook a translation file (keyed by notebook and cell id) plugs into: prose changes, code does not."""
    sources = tmp_path / "notebooks"
    notebook = _notebook(*_exercise())
    _write_sources(sources, **{"00_first": notebook})
    prose = {("00_first", notebook.cells[1].id): "### 练习 · 二加二"}

    def translate(name: str, cell_id: str, text: str) -> str:
        return prose.get((name, cell_id), text)

    build_editions(tmp_path / "editions", sources)
    written = build_editions(tmp_path / "editions", sources, language="zh", translate=translate)
    assert {f.path.parent for f in written} == {edition_dir(tmp_path / "editions", "zh", e) for e in ("learner", "instructor")}
    english = _read(edition_dir(tmp_path / "editions", "en", "learner") / "00_first.ipynb")
    chinese = _read(edition_dir(tmp_path / "editions", "zh", "learner") / "00_first.ipynb")
    assert [c.source for c in chinese.cells] == [
        "### 练习 · 二加二" if c.cell_type == "markdown" else c.source for c in english.cells]
    assert chinese.metadata["course_edition"]["language"] == "zh"
    with pytest.raises(EditionError, match="needs a translation"):
        build_editions(tmp_path / "editions", sources, language="zh")


def test_the_cli_and_make_write_both_editions_in_every_language(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["editions", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    for language in ("en", "zh-CN"):
        assert f"{language:6} {len(NOTEBOOKS) * 2} notebook(s) written" in printed
        for edition in ("learner", "instructor"):
            assert sorted(p.name for p in edition_dir(tmp_path / "out", language, edition).glob("*.ipynb")) == [
                p.name for p in NOTEBOOKS]
    assert main(["editions", "--out", str(tmp_path / "out"), "--language", "zh-CN"]) == 0
    assert f"zh-CN  0 notebook(s) written, {len(NOTEBOOKS) * 2} unchanged" in capsys.readouterr().out
    dry_run = subprocess.run(["make", "-n", "editions"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "-m course_utils editions" in dry_run.stdout
