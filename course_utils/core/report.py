"""The course report: the results ledger rendered as Markdown and HTML, one section per stage."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from course_utils.core.artifacts import StageRecord
from course_utils.core.atomic import write_text_atomic

if TYPE_CHECKING:
    from course_utils.core.ledger import Ledger

STAGE_TITLES = {
    "environment": "00 · Machine and assets",
    "zoo": "01 · Pretrained model zoo",
    "finetune": "02 · Fine-tuning",
    "prune": "03 · Pruning and retraining",
    "onnx": "04 · ONNX export and optimization",
    "engines": "05 · TensorRT engines",
    "benchmark": "05 · Every runtime, side by side",
    "ptq": "06 · INT8 post-training quantization",
    "qat": "07 · Quantization-aware training",
    "story": "08 · Guarded story",
    "imagegen": "09 · Story to image",
    "app": "10 · The app",
    "speech": "11 · Speech",
}


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) and abs(value) >= 1_000_000:
        return f"{value / 1e9:.2f} G" if abs(value) >= 1_000_000_000 else f"{value / 1e6:.2f} M"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as ``{"a.b": value}`` rows."""
    rows: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.update(flatten(value, f"{name}."))
        else:
            rows[name] = value
    return rows


def stage_table(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A stage's figures as (key, formatted value) rows, timestamps left out."""
    return [(k, _format(v)) for k, v in flatten(metrics).items() if k != "recorded_at"]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (numbers formatted to 4 significant digits)."""
    if not rows:
        return "_(no rows)_"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def stage_markdown(record: StageRecord | Mapping[str, Any] | None) -> str:
    """One stage's record (or plain figures) as a Markdown table (what each notebook's summary shows)."""
    if record is None:
        return "_(nothing recorded yet)_"
    metrics = record.summary() if isinstance(record, StageRecord) else record
    rows = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in stage_table(metrics)]
    return "\n".join(rows)


def _deployment_line(ledger: Ledger) -> str | None:
    from course_utils.core.artifacts import MissingArtifactError, StaleArtifactError
    from course_utils.core.ledger import deployed_model

    try:
        deployed = deployed_model(ledger)
    except (MissingArtifactError, StaleArtifactError):
        return None
    return f"Model shipped: the {deployed.kind} {deployed.backbone} ({deployed.model.name}), because {deployed.reason}."


def _sections(ledger: Ledger) -> dict[str, dict[str, Any]]:
    records = ledger.records()
    ordered = [s for s in STAGE_TITLES if s in records] + sorted(set(records) - set(STAGE_TITLES))
    sections = {}
    for stage in ordered:
        stale = ledger.stale_reason(records[stage])  # made from an older upstream: say so, never mix silently
        sections[stage] = {**({"⚠ stale": stale} if stale else {}), **records[stage].summary()}
    return sections


def render_markdown(ledger: Ledger, title: str = "Transfer-Learning Workbook report") -> str:
    """The ledger as a Markdown report: which model shipped and why, then the stages in course order."""
    lines = [f"# {title}", ""]
    if (shipped := _deployment_line(ledger)) is not None:
        lines += [shipped, ""]
    sections = _sections(ledger)
    if not sections:
        lines.append("Nothing was recorded yet: run the notebooks (`make course`).")
    for stage, rows in sections.items():
        lines += [f"## {STAGE_TITLES.get(stage, stage)}", "", stage_markdown(rows), ""]
    return "\n".join(lines)


def render_html(ledger: Ledger, title: str = "Transfer-Learning Workbook report") -> str:
    """The ledger as a self-contained HTML page."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
              "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}</style>"),
             f"<h1>{html.escape(title)}</h1>"]
    if (shipped := _deployment_line(ledger)) is not None:
        parts.append(f"<p><b>{html.escape(shipped)}</b></p>")
    for stage, rows in _sections(ledger).items():
        parts.append(f"<h2>{html.escape(STAGE_TITLES.get(stage, stage))}</h2><table><tr><th>measure</th><th>value</th></tr>")
        parts += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in stage_table(rows)]
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def write_report(ledger: Ledger, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` of ``ledger`` into ``out_dir``; return both paths."""
    markdown = write_text_atomic(out_dir / "report.md", render_markdown(ledger))
    page = write_text_atomic(out_dir / "report.html", render_html(ledger))
    return markdown, page
