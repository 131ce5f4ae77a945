"""Learner and instructor editions of every notebook, written from the one source in ``notebooks/``.

The committed notebooks are the source. An exercise there is three code cells in a row: the learner's cell
(tag ``exercise``: ``answer = None  # your answer here``), its solution (tag ``solution``: ``answer = ...``) and
the check (``exercises.check_...(..., answer, strict=SHOW_SOLUTIONS)``). ``build_editions`` writes

- the **learner** edition: no solution cell, ``SHOW_SOLUTIONS = False``, a note in each exercise cell saying
  where the answer is; the exercise and its check stay, so a learner's answer is checked;
- the **instructor** edition: the source with ``SHOW_SOLUTIONS = True``, so the solutions run and every check
  is strict (a wrong solution raises). CI runs the source with ``SHOW_SOLUTIONS=True``: that run is this edition.

to ``<out>/<language>/<edition>/NN_name.ipynb`` (``make editions``: ``workspace/editions/{en,zh-CN}/...``,
generated, git-ignored). Cell ids are kept in every edition, so a translated edition is one more ``language`` with
a ``translate`` function that rewrites each Markdown cell's prose by notebook and cell id; nothing else changes
(``course_utils.lessons.translations`` reads it from the translation files).

The editions are built with nbformat rather than jupytext: an edition is a change of cells, tags and metadata
of the ``.ipynb`` itself, which nbformat reads, validates and writes as they are (ids and tags included).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import nbformat
from nbformat import NotebookNode

from course_utils.core.atomic import write_text_atomic
from course_utils.core.config import REPO_ROOT
from course_utils.core.errors import CourseError
from course_utils.core.notebooks import NOTEBOOK_NAME, NOTEBOOKS_DIR, course_notebooks

EXERCISE_TAG, SOLUTION_TAG, PARAMETERS_TAG = "exercise", "solution", "parameters"
SOURCE_LANGUAGE = "en"
LEARNER_NOTE = "# Your turn. The instructor edition has the solution here; the next cell checks your answer.\n"
_SHOW_SOLUTIONS = re.compile(r"^SHOW_SOLUTIONS\s*=.*$", re.MULTILINE)


class EditionError(CourseError, ValueError):
    """A source notebook that does not follow the exercise convention; the message names the cell to fix."""


class Translate(Protocol):
    """Rewrites one Markdown cell's text into the edition's language (the source text when it has none)."""

    def __call__(self, notebook: str, cell_id: str, text: str) -> str: ...


@dataclass(frozen=True)
class Exercise:
    """One exercise of a source notebook: the learner's cell, its solution and its check."""

    notebook: str
    exercise: NotebookNode
    solution: NotebookNode
    check: NotebookNode


@dataclass(frozen=True)
class EditionFile:
    """One written edition: where it is, which one, and whether this build changed the file."""

    path: Path
    edition: str
    language: str
    written: bool


def _tags(cell: NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def exercises(notebook: NotebookNode, name: str) -> list[Exercise]:
    """The exercises of ``notebook`` (named ``name`` in errors), checked against the three-cell convention."""
    cells = notebook.cells
    found = []
    for index, cell in enumerate(cells):
        tags = _tags(cell)
        if SOLUTION_TAG in tags and not (index and EXERCISE_TAG in _tags(cells[index - 1])):
            raise EditionError(f"{name}: the solution cell {cell.get('id')} must follow a cell tagged "
                               f"{EXERCISE_TAG!r} (the learner's cell).")
        if EXERCISE_TAG not in tags:
            continue
        solution, check = (cells[index + 1:index + 3] + [None, None])[:2]
        if cell.cell_type != "code" or solution is None or SOLUTION_TAG not in _tags(solution):
            raise EditionError(f"{name}: the exercise cell {cell.get('id')} must be a code cell followed by its "
                               f"solution, a code cell tagged {SOLUTION_TAG!r}.")
        if check is None or check.cell_type != "code" or _tags(check) or "check_" not in check.source:
            raise EditionError(f"{name}: the solution cell {solution.get('id')} must be followed by an untagged "
                               "code cell that calls an exercise check (exercises.check_...).")
        found.append(Exercise(name, cell, solution, check))
    return found


def _set_show_solutions(notebook: NotebookNode, name: str, value: bool) -> None:
    parameters = [c for c in notebook.cells if PARAMETERS_TAG in _tags(c)]
    if len(parameters) != 1 or not _SHOW_SOLUTIONS.search(parameters[0].source):
        raise EditionError(f"{name}: needs exactly one cell tagged {PARAMETERS_TAG!r} with a "
                           "`SHOW_SOLUTIONS = ...` line.")
    parameters[0].source = _SHOW_SOLUTIONS.sub(f"SHOW_SOLUTIONS = {value}", parameters[0].source, count=1)


def learner_edition(source: NotebookNode, name: str) -> NotebookNode:
    """``source`` without its solution cells, ``SHOW_SOLUTIONS = False``, a note in every exercise cell."""
    edition = nbformat.from_dict(source)
    ids = {exercise.exercise.get("id") for exercise in exercises(edition, name)}
    edition.cells = [cell for cell in edition.cells if SOLUTION_TAG not in _tags(cell)]
    for cell in edition.cells:
        if cell.get("id") in ids:
            cell.source = LEARNER_NOTE + cell.source
    _set_show_solutions(edition, name, False)
    return edition


def instructor_edition(source: NotebookNode, name: str) -> NotebookNode:
    """``source`` as it is, with ``SHOW_SOLUTIONS = True``: the solutions run and every check is strict."""
    edition = nbformat.from_dict(source)
    exercises(edition, name)  # the same convention as the learner edition, so both editions come from one source
    _set_show_solutions(edition, name, True)
    return edition


# The editions, by name: an edition is a function from the source notebook (and its name) to a new notebook.
EDITIONS: dict[str, Callable[[NotebookNode, str], NotebookNode]] = {
    "learner": learner_edition,
    "instructor": instructor_edition,
}


def edition_dir(out_dir: Path, language: str, edition: str) -> Path:
    """Where the ``edition`` of every notebook in ``language`` goes: ``<out>/<language>/<edition>/``."""
    return Path(out_dir) / language / edition


def _translated(notebook: NotebookNode, name: str, translate: Translate) -> NotebookNode:
    translated = nbformat.from_dict(notebook)
    for cell in translated.cells:
        if cell.cell_type == "markdown":
            cell.source = translate(name, cell.get("id", ""), cell.source)
    return translated


def render_edition(source_path: Path, edition: str, language: str = SOURCE_LANGUAGE,
                   translate: Translate | None = None) -> str:
    """The ``edition`` of one source notebook, as the text of its ``.ipynb`` (validated by nbformat)."""
    if edition not in EDITIONS:
        raise EditionError(f"unknown edition {edition!r}: choose one of {', '.join(EDITIONS)}.")
    if language != SOURCE_LANGUAGE and translate is None:
        raise EditionError(f"a {language!r} edition needs a translation (translate=...); the source is in "
                           f"{SOURCE_LANGUAGE!r}.")
    text = source_path.read_text(encoding="utf-8")
    source = nbformat.reads(text, as_version=4)
    if translate is not None:
        source = _translated(source, source_path.stem, translate)
    notebook = EDITIONS[edition](source, source_path.name)
    where = source_path.resolve()
    notebook.metadata["course_edition"] = {
        "edition": edition, "language": language,
        "source": where.relative_to(REPO_ROOT).as_posix() if where.is_relative_to(REPO_ROOT) else source_path.name,
        "source_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    nbformat.validate(notebook)
    return nbformat.writes(notebook)


def build_editions(out_dir: Path, source_dir: Path = NOTEBOOKS_DIR, language: str = SOURCE_LANGUAGE,
                   translate: Translate | None = None,
                   editions: Sequence[str] = tuple(EDITIONS)) -> list[EditionFile]:
    """Write every ``edition`` of every numbered notebook of ``source_dir`` under ``out_dir/<language>/``.

    Each edition is rebuilt in memory (milliseconds) and written, atomically, only when its text differs from
    the file already there: a rerun with nothing changed writes nothing, and a change of the source, of this
    tool or of a translation rewrites exactly the files it changes (which a key of the source's hash alone would
    miss). Editions of notebooks no longer in ``source_dir`` are removed from the edition folders.
    """
    sources = course_notebooks(source_dir)
    if not sources:
        raise EditionError(f"no numbered notebooks (NN_name.ipynb) in {source_dir}.")
    files = []
    for edition in editions:
        folder = edition_dir(out_dir, language, edition)
        folder.mkdir(parents=True, exist_ok=True)
        for source in sources:
            target = folder / source.name
            text = render_edition(source, edition, language, translate)
            changed = not target.exists() or target.read_text(encoding="utf-8") != text
            if changed:
                write_text_atomic(target, text)
            files.append(EditionFile(target, edition, language, changed))
        names = {source.name for source in sources}
        for stale in folder.glob("*.ipynb"):
            if NOTEBOOK_NAME.match(stale.name) and stale.name not in names:
                stale.unlink()
    return files
