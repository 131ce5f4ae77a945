import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from course_utils.core.config import CourseConfig, load_config
from course_utils.core.notebooks import (
    NOTEBOOKS_DIR,
    PeakMemory,
    course_notebooks,
    notebook_parameters,
    run_all,
)


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('SPEC = "default"')
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_all_executes_in_order_and_writes_the_report(tmp_path: Path, config: CourseConfig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setenv("COURSE_WORKSPACE", str(config.workspace))
    record = ("from course_utils.core import artifacts\nfrom course_utils.core.config import load_config\n"
              "from course_utils.core.ledger import Ledger\nc = load_config(SPEC, OVERRIDES)\n"
              "Ledger(c.workspace).save(artifacts.{kind}(metrics={{'spec': SPEC, 'order': {order}, "
              "'seed': c.seed}}))")
    _notebook(folder / "01_second.ipynb", record.format(kind="ZooRecord", order=2))
    _notebook(folder / "00_first.ipynb", record.format(kind="EnvironmentRecord", order=1))
    _notebook(folder / "notes.ipynb", "raise RuntimeError('not a course notebook')")
    assert [p.name for p in course_notebooks(folder)] == ["00_first.ipynb", "01_second.ipynb"]
    run_dir = run_all(config, folder=folder, overrides={"seed": 7})
    assert sorted(p.name for p in run_dir.glob("*.ipynb")) == ["00_first.ipynb", "01_second.ipynb"]
    results = json.loads((config.workspace / "results.json").read_text())
    assert results["zoo"]["metrics"]["spec"] == "smoke"
    assert results["zoo"]["metrics"]["seed"] == 7, "run-all hands its overrides to every notebook"
    assert set(results["course"]["metrics"]["notebooks"]) == {"00_first", "01_second"}
    assert all(mb > 0 for mb in results["course"]["metrics"]["peak_rss_mb"].values()), "each kernel's peak memory"
    report = (run_dir / "report.md").read_text()
    assert report.index("00 · Machine") < report.index("01 · Pretrained") and (run_dir / "report.html").exists()


def test_a_spec_file_survives_the_trip_to_the_notebooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my.yaml").write_text("base: smoke\nexperiment: mine\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("my.yaml", {"seed": 5}, environ={})
    parameters = notebook_parameters(config, {"seed": 5})
    monkeypatch.chdir(NOTEBOOKS_DIR)  # where papermill runs the notebooks
    again = load_config(parameters["SPEC"], parameters["OVERRIDES"], environ={})
    assert (again.spec, again.experiment, again.seed) == (config.spec, "mine", 5)
    assert again.model_dump() == config.model_dump()


def test_peak_memory_counts_the_children_this_process_starts() -> None:
    hold_300_mb = "import time; block = bytearray(300 * 2**20); time.sleep(1.5)"
    with PeakMemory(interval_s=0.1) as memory:
        subprocess.run([sys.executable, "-c", hold_300_mb], check=True)
    assert memory.peak_mb >= 300
    with PeakMemory(interval_s=0.1) as idle:
        time.sleep(0.3)
    assert idle.peak_mb < 300
