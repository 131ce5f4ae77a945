"""Peak memory and wall time of each notebook, from the `course` record that `run-all` saves.

`python -m course_utils run-all` samples the resident memory of each notebook's kernel and everything it starts
(summed over the process tree every 0.2 s, `course_utils.core.notebooks.PeakMemory`) and records it. Run the
notebooks first, then print the table from one or more workspaces (several when the notebooks ran in chunks):

    COURSE_WORKSPACE=workspace/smoke python -m course_utils run-all --spec smoke --only 00 01 02
    .venv/bin/python benchmarks/notebook_memory.py workspace/smoke [workspace/other ...]

A later run of a notebook replaces an earlier one's row. Sums of RSS count shared pages once per process: the
figures are upper bounds of what the notebook needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from course_utils.core.artifacts import CourseRunRecord
from course_utils.core.ledger import Ledger


def notebook_rows(workspaces: list[Path]) -> dict[str, tuple[str, float, float]]:
    """``{notebook: (spec, seconds, peak MB)}`` from the course records of ``workspaces``, later ones winning."""
    rows: dict[str, tuple[str, float, float]] = {}
    for workspace in workspaces:
        record = Ledger(workspace).load(CourseRunRecord)
        if record is None:
            raise SystemExit(f"{workspace} has no course record: run `python -m course_utils run-all` there first")
        peaks = record.metrics.get("peak_rss_mb", {})
        for notebook, seconds in record.metrics["notebooks"].items():
            if notebook in peaks:
                rows[notebook] = (Path(str(record.settings["spec"])).stem, seconds, peaks[notebook])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspaces", nargs="+", type=Path, help="workspaces run-all ran in")
    args = parser.parse_args()
    print("| notebook | spec | wall time s | peak memory MB (kernel process tree) |\n|---|---|---|---|")
    for notebook, (spec, seconds, peak) in sorted(notebook_rows(args.workspaces).items()):
        print(f"| {notebook} | {spec} | {seconds:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
