"""Run the course's notebooks headless with papermill, in order, and build the report."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, final

from course_utils.core.artifacts import CourseRunRecord
from course_utils.core.config import REPO_ROOT, CourseConfig
from course_utils.core.ledger import Ledger
from course_utils.core.provenance import describe_machine, key_versions
from course_utils.core.report import write_report

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOK_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")


@dataclass
class NotebookRun:
    """One executed notebook: where its executed copy went, its wall time and the memory its kernel peaked at."""

    notebook: Path
    output: Path
    seconds: float
    peak_rss_mb: float


@final
class PeakMemory:
    """The peak resident memory (MB) of this process's children, the kernel and all it starts, sampled in a thread.

    RSS is summed over the process tree every ``interval_s`` (psutil), so the llama.cpp server a notebook starts
    and torchrun's workers count too. Pages shared between processes count once per process, so the figure is an
    upper bound; a spike shorter than the interval can be missed. (``resource.getrusage(RUSAGE_CHILDREN)`` would
    give only the largest single child, and only after it exits, for all children so far: not one notebook's.)
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree_rss_mb(self) -> float:
        import psutil

        total = 0
        for child in psutil.Process().children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # it ended between the listing and the reading
        return total / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._tree_rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def course_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``), in course order."""
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))


def notebook_parameters(config: CourseConfig, overrides: Mapping[str, Any] | None = None,
                        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The papermill parameters every notebook takes: its spec and its ``OVERRIDES``, plus any ``extra``.

    ``SPEC`` is ``config.spec`` (a shipped spec's name or a YAML file's resolved path), so each notebook's
    ``load_config(SPEC, OVERRIDES)`` loads what ``config`` was loaded from.
    """
    return {"SPEC": config.spec, "OVERRIDES": dict(overrides or {}), **(extra or {})}


def run_notebook(notebook: Path, output: Path, parameters: Mapping[str, Any], cwd: Path = NOTEBOOKS_DIR,
                 timeout_s: int = 1800) -> NotebookRun:
    """Execute one notebook with papermill, writing the executed copy to ``output``; its kernel's peak memory too."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with PeakMemory() as memory:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=dict(parameters), cwd=str(cwd),
            kernel_name="python3", progress_bar=False, execution_timeout=timeout_s,
        )
    return NotebookRun(notebook, output, time.perf_counter() - started, round(memory.peak_mb, 1))


def run_all(config: CourseConfig, only: list[str] | None = None, folder: Path = NOTEBOOKS_DIR,
            overrides: Mapping[str, Any] | None = None) -> Path:
    """The main job: run every notebook (or those whose names start with ``only``), then write the report.

    ``overrides`` (what ``config`` was loaded with on top of its spec, e.g. the CLI's ``--set``) reach every
    notebook as its ``OVERRIDES`` parameter. Returns the run folder, ``<workspace>/runs/<timestamp>``, which
    holds the executed notebooks, ``report.md``, ``report.html`` and ``report.json``. The ``course`` record it
    saves keeps the spec, the overrides, each notebook's wall time and peak memory (its kernel's process tree,
    :class:`PeakMemory`), the machine and the key libraries' versions.
    """
    run_dir = config.workspace / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = []
    for notebook in course_notebooks(folder):
        if only and not any(notebook.name.startswith(prefix) for prefix in only):
            continue
        print(f"▶ {notebook.name}", flush=True)
        run = run_notebook(notebook, run_dir / notebook.name, notebook_parameters(config, overrides), cwd=folder)
        print(f"  done in {run.seconds:.0f} s, peak memory {run.peak_rss_mb:.0f} MB", flush=True)
        runs.append(run)
    ledger = Ledger(config.workspace)
    ledger.save(CourseRunRecord(settings={"spec": config.spec, "overrides": dict(overrides or {})},
                                tools=key_versions(), metrics={
        "notebooks": {run.notebook.stem: round(run.seconds, 1) for run in runs},
        "total_seconds": round(sum(run.seconds for run in runs), 1),
        "peak_rss_mb": {run.notebook.stem: run.peak_rss_mb for run in runs},
        "machine": describe_machine(),  # the report's provenance: CPU, memory, GPU, Jetson and power mode
    }))
    markdown, page = write_report(ledger, run_dir)
    print(f"Report: {markdown}\n        {page}")
    return run_dir
