"""Notebook hygiene and frame, and every notebook executed by papermill in smoke mode, in course order.

Each notebook runs twice, in one workspace shared by all of them as a learner's run would be (each stage reads
what the previous one wrote): first the source with ``SHOW_SOLUTIONS=True``, which is the instructor edition
(``tests/test_editions.py`` proves the two are the same notebook), so every solution must pass its strict
check; then, right after it, its Chinese learner edition (no solutions, checks not strict, the prose in
Simplified Chinese), which must run through with every exercise reported as not attempted. Its code cells are
the English learner edition's (``tests/test_translations.py`` proves it), so this run is a run of both.
Executed copies land in ``<workspace>/executed`` for reading. The workspace is ``workspace/tests``
(``NOTEBOOK_TESTS_WORKSPACE`` moves it, e.g. for a run beside another one).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from course_utils.core.config import REPO_ROOT
from course_utils.core.notebooks import NOTEBOOK_NAME, NOTEBOOKS_DIR, course_notebooks, run_notebook
from course_utils.lessons.editions import exercises, render_edition
from course_utils.lessons.translations import translator

NOTEBOOKS = course_notebooks()
TEST_WORKSPACE = Path(os.environ.get("NOTEBOOK_TESTS_WORKSPACE", REPO_ROOT / "workspace" / "tests"))
# The header (one Markdown cell after the title) and the ending (the last Markdown cells), in this order.
HEADER_PARTS = ("**You will be able to", "**Before this", "**Compute", "**Reading", "**Expected results")


def _cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text())["cells"]


def _items(text: str, marker: str) -> list[str]:
    """The list items (``- `` bullets or ``1. `` numbers, per ``marker``) of a Markdown text."""
    return re.findall(rf"^{marker} +\S.*$", text, flags=re.MULTILINE)


def test_every_notebook_is_numbered_and_present() -> None:
    names = sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert names, "no notebooks found"
    assert all(NOTEBOOK_NAME.match(name) for name in names), names
    numbers = [int(name[:2]) for name in names]
    assert numbers == list(range(len(numbers))), f"notebooks must be numbered 00, 01, … without gaps: {names}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_hygiene(notebook: Path) -> None:
    metadata = json.loads(notebook.read_text())["metadata"]
    assert metadata.get("kernelspec", {}).get("name") == "python3", "papermill needs a kernelspec"
    cells = _cells(notebook)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit without outputs"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"
    parameters = "".join(tagged[0]["source"])
    for name in ("SPEC", "OVERRIDES", "SHOW_SOLUTIONS"):
        assert f"{name} " in parameters or f"{name}:" in parameters, f"parameters cell lacks {name}"
    assert "SHOW_SOLUTIONS = False" in parameters, "the source's default: checks not strict"
    sources = ["".join(c["source"]) for c in code]
    assert not any("if SHOW_SOLUTIONS" in s for s in sources), "a solution belongs in its own cell tagged `solution`"
    found = exercises(nbformat.read(notebook, as_version=4), notebook.name)  # raises naming a cell off the convention
    assert found, "at least one exercise: a cell tagged `exercise`, its `solution`, then its check"
    assert all("answer = None" in e.exercise.source and "answer" in e.check.source for e in found)
    assert all("strict=SHOW_SOLUTIONS" in e.check.source for e in found), "checks strict in the instructor edition"
    assert "stage_markdown" in sources[-1], "ends with a summary read from the ledger"
    assert sum(c["cell_type"] == "markdown" for c in cells) >= len(code) / 3, "prose that teaches"
    assert max(len(s.splitlines()) for s in sources) <= 25, "small cells: move long logic into course_utils"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_frame(notebook: Path) -> None:
    """The header after the title and the ending after the ledger summary that every notebook has."""
    cells = _cells(notebook)
    title, header = ("".join(c["source"]) for c in cells[:2])
    assert re.match(rf"# {notebook.name[:2]} · \S", title), "the first cell is the title, `# NN · …`"
    assert cells[1]["cell_type"] == "markdown"
    positions = [header.find(part) for part in HEADER_PARTS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), f"header parts, in order: {HEADER_PARTS}"
    objectives = header[positions[0]:positions[1]]
    assert len(_items(objectives, r"\d\.")) == 3, "three objectives"
    assert "you will be able to" in header.lower() and re.search(r"\*\*Compute.*\d+ (s|min)", header)
    assert re.search(r"\*\*Reading.*\d+ min", header)
    last_code = max(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    ending = ["".join(c["source"]) for c in cells[last_code + 1:]]
    assert len(ending) == 2 and all(c["cell_type"] == "markdown" for c in cells[last_code + 1:])
    takeaways, questionnaire = ending
    assert takeaways.startswith("## Key takeaways") and 3 <= len(_items(takeaways, "-")) <= 5
    assert questionnaire.startswith("## Questionnaire") and 5 <= len(_items(questionnaire, r"\d+\.")) <= 8


def _check_outputs(source: Path, executed: Path) -> list[str]:
    """The text each exercise check of ``source`` printed in ``executed`` (either edition: ids are kept), in order."""
    checks = {e.check.id for e in exercises(nbformat.read(source, as_version=4), source.name)}
    notebook = nbformat.read(executed, as_version=4)
    return ["".join(o.get("data", {}).get("text/plain", "")) for cell in notebook.cells if cell.get("id") in checks
            for o in cell.outputs if o.output_type == "execute_result"]


@pytest.mark.notebook
@pytest.mark.parametrize("edition", ["source", "learner-zh-CN"])
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(notebook: Path, edition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURSE_WORKSPACE", str(TEST_WORKSPACE))
    executed = TEST_WORKSPACE / "executed" / edition / notebook.name
    if edition == "source":  # the instructor edition: solutions filled in, every check strict
        run = run_notebook(notebook, executed, {"SPEC": "smoke", "SHOW_SOLUTIONS": True})
    else:  # the Chinese learner edition, written beside the executed copies; it keeps SHOW_SOLUTIONS = False
        learner = TEST_WORKSPACE / "editions" / "zh-CN" / "learner" / notebook.name
        learner.parent.mkdir(parents=True, exist_ok=True)
        learner.write_text(render_edition(notebook, "learner", "zh-CN", translator("zh-CN")))
        run = run_notebook(learner, executed, {"SPEC": "smoke"})
    errors = [o for c in _cells(run.output) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    verdicts = _check_outputs(notebook, run.output)
    assert verdicts and all(v.startswith("✅" if edition == "source" else "❌ Not attempted") for v in verdicts)
    assert os.path.exists(TEST_WORKSPACE / "results.json")
