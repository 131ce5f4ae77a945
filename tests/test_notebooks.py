"""Notebook hygiene, and every notebook executed by papermill in smoke mode, in course order.

The notebooks share one workspace (``workspace/tests``) as a learner's run would: each stage
reads what the previous one wrote. Executed copies land in ``workspace/tests/executed`` for reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from course_utils.core.config import REPO_ROOT
from course_utils.core.notebooks import NOTEBOOK_NAME, NOTEBOOKS_DIR, course_notebooks, run_notebook

NOTEBOOKS = course_notebooks()
TEST_WORKSPACE = REPO_ROOT / "workspace" / "tests"


def _cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text())["cells"]


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
    sources = ["".join(c["source"]) for c in code]
    assert any("check_" in s for s in sources), "at least one exercise verified by a course_utils check"
    assert any("stage_markdown" in s for s in sources[-2:]), "ends with a summary read from the ledger"
    assert sum(c["cell_type"] == "markdown" for c in cells) >= len(code) / 3, "prose that teaches"
    assert max(len(s.splitlines()) for s in sources) <= 25, "small cells: move long logic into course_utils"


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(notebook: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURSE_WORKSPACE", str(TEST_WORKSPACE))
    run = run_notebook(notebook, TEST_WORKSPACE / "executed" / notebook.name,
                       {"SPEC": "smoke", "SHOW_SOLUTIONS": True})
    executed = _cells(run.output)
    errors = [o for c in executed for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert os.path.exists(TEST_WORKSPACE / "results.json")
