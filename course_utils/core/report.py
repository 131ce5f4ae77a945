"""The course report an instructor reads: one page that says what was built, how good and how fast, with pictures.

``write_report`` renders the results ledger as ``report.html`` (self-contained: pictures embedded as
``data:`` URIs, a Content-Security-Policy that forbids any fetch), ``report.md`` (the same without pictures)
and ``report.json`` (``RunSummary``: the headline's figures, what ``report --compare`` reads back). The page:

1. the headline: dataset and model, which model shipped and why, the deployed model through the pipeline
   (top-1, size, latency, throughput per runtime and precision, each row marked with the device it ran on,
   Jetson rows imported from the deploy kit included) and the course's targets, met or not;
2. pictures (``core.report_figures``): training curves, confusion matrix, pruning sweep, latency per
   runtime, INT8 recipes, red-team block rates, the app's last run (photos with their top-5, the story, the
   picture);
3. the details, one folded section per stage, in readable units and without machine paths;
4. provenance: which assets ran (offline stand-ins named plainly), the machine, the spec and its
   overrides, library versions and the wall time of every notebook.

``compare_runs`` puts two runs side by side (``python -m course_utils report --compare RUN_A RUN_B``); a run
is a workspace (its ``results.json``, read now) or a folder holding a ``report.json`` (e.g. one of
``workspace/runs/<timestamp>/``, as it was when that report was written). This module imports no PyTorch.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from course_utils.core.artifacts import (
    AppRecord,
    BenchmarkRecord,
    CourseRunRecord,
    DeployedModel,
    DeviceRunRecord,
    EnginesRecord,
    EnvironmentRecord,
    FinetuneRecord,
    ImagegenRecord,
    MissingArtifactError,
    OnnxRecord,
    PruneRecord,
    PtqRecord,
    QatRecord,
    SpeechRecord,
    StageRecord,
    StaleArtifactError,
    StoryRecord,
)
from course_utils.core.atomic import write_text_atomic
from course_utils.core.config import REPO_ROOT
from course_utils.core.errors import CourseError

if TYPE_CHECKING:
    from course_utils.core.ledger import Ledger

LOG = logging.getLogger(__name__)
R = TypeVar("R", bound=StageRecord)
TITLE = "Transfer-Learning Workbook report"
SUMMARY_NAME = "report.json"

STAGE_TITLES = {
    "environment": "00 · Machine and assets",
    "zoo": "01 · Pretrained model zoo",
    "finetune": "02 · Fine-tuning",
    "prune": "03 · Pruning and retraining",
    "onnx": "04 · ONNX export and optimization",
    "engines": "05 · TensorRT engines",
    "benchmark": "07 · The final benchmark: every runtime and precision, side by side",
    "device_run": "05 · On the device (Jetson deploy kit)",
    "ptq": "06 · INT8 post-training quantization",
    "qat": "07 · Quantization-aware training",
    "story": "08 · Guarded story",
    "imagegen": "09 · Story to image",
    "app": "10 · The app",
    "speech": "11 · Speech",
}
# The figures a folded stage shows on its one-line summary, before it is opened.
SUMMARY_KEYS = {
    "environment": ("course_path", "dataset"), "zoo": ("registry_size",),
    "finetune": ("val_top1", "epochs", "train_seconds"), "prune": ("macs_reduction", "val_top1_after_retrain"),
    "onnx": ("size_optimized_mb", "nodes_optimized", "parity_max_rel_diff"), "benchmark": ("onnxruntime_vs_pytorch_b8",),
    "ptq": ("best_cpu_variant", "best_cpu_speedup_b8", "best_cpu_top1_drop_vs_fp32"),
    "qat": ("val_top1", "top1_drop_vs_fp32"), "story": ("block_rate", "false_positive_rate", "tokens_per_second"),
    "imagegen": ("model", "seconds_per_image"), "app": ("story_seconds", "picture_seconds"),
    "speech": ("wer_clips", "tts_realtime_factor"),
}
RUNTIMES = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}
ORDER = {"pytorch": 0, "onnxruntime": 1, "tensorrt": 2, "qat": 3, "fp32": 0, "fp16": 1, "int8": 2, "int8-qat": 3}
# A precision key of the benchmark record in words: INT8 from post-training quantization or from QAT.
PRECISION_WORDS = {"int8": "INT8 PTQ", "int8-qat": "INT8 QAT"}
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # the page may fetch nothing at all
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:74em;margin:1.5em auto;
 padding:0 1em;color:#1d1d1f}
h1{margin:.2em 0 0;font-size:1.7em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666;margin:.2em 0 1em}.shipped{font-size:1.08em;background:#eef5ff;border-left:4px solid #2f6fdf;
 padding:.5em .8em}.fallbacks{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em .8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #d6d6d6;padding:.25em .6em;text-align:left;
 vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.headline td,table.headline th{padding:.35em .8em}.met{color:#1b7a2a;font-weight:600}
.missed{color:#b3261e;font-weight:600}.na{color:#777}.note{color:#555;font-size:.92em}
.stale{color:#b3261e}.differs td{background:#fff8e1}ul.note{padding-left:1.2em}.fallbacks ul{margin:.2em 0}
.pictures{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:1em}
figure{margin:0;border:1px solid #e2e2e2;border-radius:6px;padding:.6em;background:#fff}
figure img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#444;margin-top:.3em}
figcaption b{color:#1d1d1f}.photos{display:flex;flex-wrap:wrap;gap:.8em}.photo{width:11em;font-size:.8em}
.photo img{width:100%;border-radius:4px}img.picture{width:16em;image-rendering:pixelated;border-radius:4px}.bar{background:#4f7fd9;height:.5em;border-radius:2px}
.story{white-space:pre-wrap;font-family:Georgia,serif;background:#fafafa;padding:.6em;border-radius:4px}
details{border:1px solid #e2e2e2;border-radius:6px;margin:.4em 0;padding:.3em .8em}
summary{cursor:pointer}summary b{margin-right:.6em}details table{font-size:.92em}
td:first-child{min-width:9em}
"""


class ReportError(CourseError, ValueError):
    """A folder ``report --compare`` cannot read as a run; the message says what to pass instead."""


# --- Readable values: units from the ledger's key conventions, no machine paths -------------------------------


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:/[\w.+@-]+){2,}/?")


def scrub(text: str, workspace: Path | None = None) -> str:
    """``text`` without machine paths: the workspace as ``workspace``, the checkout as ``.``, others by name."""
    for root, name in ((workspace, "workspace"), (REPO_ROOT, "."), (Path.home(), "~")):
        if root is not None and (absolute := str(Path(root).resolve())) != "/":
            text = text.replace(absolute, name)
    return _ABSOLUTE_PATH.sub(lambda match: "…/" + match.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def label(key: str) -> str:
    """A metric key in words, its unit left to the value: ``latency_ms_b1_after`` -> ``latency batch 1 after``."""
    words = re.sub(r"top(\d)", r"top-\1", str(key)).replace("_", " ").replace(".", " · ")
    words = re.sub(r"\bb(\d+)\b", r"batch \1", words)
    return re.sub(r" (ms|mb|s)\b(?= |$)", "", words) or words


def _percent(value: float) -> str:
    text = f"{value * 100:.1f}"
    return f"{text.removesuffix('.0')}%"


def duration(seconds: float) -> str:
    """Seconds as ``850 ms``, ``12.3 s`` or ``4 min 05 s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {rest:02d} s"


def _unit(key: str, value: float) -> str | None:
    """``value`` in the unit its key names (see ``core.ledger`` for the conventions), or None for a plain number."""
    key = key.lower()
    if "_drop" in key or "_delta" in key:
        return f"{value * 100:.1f} points"
    if "overhead" in key:
        return f"{value:+.0%}"
    if "top1" in key or "top5" in key or key.endswith(("_accuracy", "_rate", "agreement", "agreement_with_fp32",
                                                        "_reduction")) or key.startswith("wer"):
        return _percent(value)
    if key.endswith("_ms") or "_ms_" in key:
        return f"{value:.3g} ms" if value < 100 else f"{value:.0f} ms"
    if key.endswith(("_s", "seconds")) or "_s_" in key or "seconds_" in key:
        return duration(value)
    if key.endswith("_mb") or "_mb_" in key:
        return f"{value:.1f} MB" if value < 100 else f"{value:.0f} MB"
    if key.endswith("bytes"):
        return f"{value / 1e6:.1f} MB"
    if key == "gmacs" or key.endswith("_gmacs"):
        return f"{value:.2f} GMACs"
    if key.startswith("macs") and not key.endswith("reduction"):
        return f"{value / 1e6:.0f} M MACs"
    if key.startswith("params"):
        return f"{value / 1e6:.2f} M"
    if "tokens_per_second" in key:
        return f"{value:.1f} tokens/s"
    if "throughput" in key or key.endswith("per_second"):
        return f"{value:.1f} images/s"
    if "speedup" in key or "_vs_" in key:
        return f"{value:.2f}×"
    if "realtime_factor" in key:
        return f"{value:.2f}× real time"
    return None


def readable(value: Any, *keys: str, workspace: Path | None = None) -> str:
    """One figure for a table, in the unit the first of ``keys`` that names one implies (``val_top1`` -> %)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "—"
        for key in keys:
            if (text := _unit(key, value)) is not None:
                return text
        if isinstance(value, int):
            return f"{value:,}".replace(",", " ")
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(item, *keys, workspace=workspace) for item in value) or "—"
    return scrub(str(value), workspace)


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


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (numbers formatted to 4 significant digits)."""
    if not rows:
        return "_(no rows)_"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --- A stage's details: plain figures as rows, groups of same-shaped figures as small tables -----------------


@dataclass
class Table:
    """A table of readable cells: ``title`` names it (empty for a stage's main table)."""

    title: str
    header: list[str]
    rows: list[list[str]]


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


def _group(items: Sequence[tuple[str, Mapping[str, Any]]], title: str, key: str, workspace: Path | None) -> Table:
    """Same-shaped figures (runtimes, variants, epochs …) as one table: a row per item, a column per figure."""
    flat = [(name, flatten(row)) for name, row in items]
    columns = list(dict.fromkeys(column for _, row in flat for column in row))
    return Table(label(title), [""] + [label(c) for c in columns], [
        [readable(name, workspace=workspace)] + [readable(row.get(c), c.rsplit(".", 1)[-1], c, key, workspace=workspace)
                                                 for c in columns] for name, row in flat])


def detail_tables(figures: Mapping[str, Any], workspace: Path | None = None) -> list[Table]:
    """``figures`` (a record's summary) as tables: one of measure/value rows, then one per group of same-shaped
    figures (runtimes, INT8 variants, the pruning sweep, epochs …), each cell in readable units."""
    rows: list[list[str]] = []
    groups: list[Table] = []

    def walk(prefix: str, mapping: Mapping[str, Any]) -> None:
        grouped = set()
        for members in _same_shaped({str(k): v for k, v in mapping.items() if isinstance(v, Mapping)}):
            groups.append(_group([(k, mapping[k]) for k in members], prefix.rstrip("."),
                                 prefix.rstrip(".").rsplit(".", 1)[-1], workspace))
            grouped.update(members)
        for key, value in mapping.items():
            if str(key) not in grouped:
                add(prefix, str(key), value)

    def add(prefix: str, key: str, value: Any) -> None:
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            walk(f"{name}.", value)
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            groups.append(_group([(str(i + 1), v) for i, v in enumerate(value)], name, key, workspace))
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            groups.append(Table(label(name), [], [[readable(cell, key) for cell in row] for row in value]))
        elif key != "recorded_at":
            rows.append([label(name), readable(value, name.rsplit(".", 1)[-1], *name.split("."), workspace=workspace)])

    walk("", figures)
    return [Table("", ["measure", "value"], rows), *groups] if rows else groups


def _same_shaped(nested: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Keys of ``nested`` whose values share most of their figures (runtimes, variants, sweep ratios …), in groups
    of two or more: each group is shown as one table (``detail_tables``)."""
    groups: list[tuple[set[str], list[str]]] = []
    for name, value in nested.items():
        keys = set(flatten(value))
        for shape, members in groups:
            if len(keys & shape) >= 0.6 * len(keys | shape):
                members.append(name)
                break
        else:
            groups.append((keys, [name]))
    return [members for _, members in groups if len(members) >= 2]


def stage_figures(record: StageRecord) -> dict[str, Any]:
    """What a stage's details show: its summary (figures, file names, fields) and its settings."""
    figures = record.summary()
    if record.settings:
        figures["settings"] = record.settings
    return figures


def _markdown_tables(tables: Iterable[Table]) -> str:
    parts = []
    for table in tables:
        header = table.header or [""] * max(len(r) for r in table.rows)
        lines = ([f"**{table.title}**", ""] if table.title else []) + [
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# A figure that only traces another (a file, a path, a hash): kept out of the main view of a notebook's summary.
_TRACE_KEY = re.compile(r"sha256|hash|digest|^file: ")  # paths are found by their value
_HEX_RUN = re.compile(r"(?<![0-9a-f])(?=[0-9a-f]*\d)[0-9a-f]{12,}(?![0-9a-f])")


def _traces(key: str, value: Any) -> bool:
    texts = value if isinstance(value, (list, tuple)) else [value]
    return bool(_TRACE_KEY.search(key)) or any(
        isinstance(text, str) and bool(_ABSOLUTE_PATH.search(text) or _HEX_RUN.search(text)) for text in texts)


def split_traces(figures: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """``figures`` as (what was measured, the files, paths and hashes named), the second flat by dotted key."""
    measured: dict[str, Any] = {}
    traces: dict[str, Any] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            inner, traced = split_traces(value, f"{name}.")
            if inner:
                measured[key] = inner
            traces.update(traced)
        elif _traces(str(key), value):
            traces[name] = value
        else:
            measured[key] = value
    return measured, traces


def stage_markdown(record: StageRecord | Mapping[str, Any] | None) -> str:
    """One stage's record (or plain figures) as the end of its notebook shows it: folded in a ``<details>`` block.

    Folded, one line: the stage and its headline figures (the report's ``SUMMARY_KEYS``). Open: the figures as
    tables in readable units, and the files, paths and hashes they came from folded once more, so that none is
    in the main view.
    """
    if record is None:
        return "_(nothing recorded yet)_"
    if isinstance(record, StageRecord):
        figures, title, line = record.summary(), STAGE_TITLES.get(record.stage, record.stage), _summary_line(
            record.stage, record)
    else:
        figures, title, line = dict(record), "Figures", ""
    measured, traces = split_traces(figures)
    parts = [f"<details><summary><b>{html.escape(title)}</b>{html.escape(' · ' + line) if line else ''}</summary>",
             "", _markdown_tables(detail_tables(measured)) or "_(no figures)_", ""]
    if traces:
        rows = [[label(key), readable(value, key.rsplit(".", 1)[-1])] for key, value in traces.items()]
        parts += ["<details><summary>Files and hashes</summary>", "",
                  _markdown_tables([Table("", ["of", "file, path or hash"], rows)]), "", "</details>", ""]
    return "\n".join([*parts, "</details>"])


# --- The run's summary: what the headline says, and what --compare reads back -------------------------------------


class PipelineRow(BaseModel):
    """One runtime and precision of the deployed model: where it ran and how good, big and fast it was."""

    label: str
    ran_on: str
    top1: float | None = None
    size_mb: float | None = None
    latency_b1_ms: float | None = None
    latency_b8_ms: float | None = None
    throughput_b8: float | None = None
    note: str = ""

    @property
    def key(self) -> str:
        """What the same row of another run is matched by in a comparison."""
        return f"{self.label} · {self.ran_on}"


class Target(BaseModel):
    """A target the course sets or a check a stage records, and whether this run met it (None: not judged)."""

    what: str
    target: str
    measured: str
    met: bool | None = None


class Asset(BaseModel):
    """Which asset a need was met with; ``stand_in`` when it is an offline fallback."""

    need: str
    used: str
    stand_in: bool = False


class RunSummary(BaseModel):
    """The headline and provenance of one run, as the report shows them (``report.json``)."""

    label: str = ""
    backbone: str | None = None
    dataset: str | None = None
    classes: list[str] = Field(default_factory=list)
    split: str = ""
    shipped: str | None = None
    shipped_kind: str | None = None
    recorded: str = ""
    pipeline: list[PipelineRow] = Field(default_factory=list)
    pipeline_notes: list[str] = Field(default_factory=list)
    targets: list[Target] = Field(default_factory=list)
    assets: list[Asset] = Field(default_factory=list)
    machine: dict[str, str] = Field(default_factory=dict)
    spec: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    notebooks: dict[str, float] = Field(default_factory=dict)
    total_seconds: float | None = None


@dataclass
class _Run:
    """The ledger's records loaded once, why some are stale, and the deployed model: what the report derives from."""

    ledger: Ledger
    records: dict[str, StageRecord]
    stale: dict[str, str]
    deployed: DeployedModel | None

    def get(self, kind: type[R]) -> R | None:
        record = self.records.get(kind.stage)
        return record if isinstance(record, kind) else None

    @property
    def workspace(self) -> Path:
        return self.ledger.workspace


def _load(ledger: Ledger) -> _Run:
    from course_utils.core.ledger import deployed_model

    records = ledger.records()
    stale = {stage: reason for stage, record in records.items() if (reason := ledger.stale_reason(record))}
    try:
        deployed: DeployedModel | None = deployed_model(ledger)
    except (MissingArtifactError, StaleArtifactError):
        deployed = None
    return _Run(ledger, records, stale, deployed)


def _shipped_line(run: _Run) -> str | None:
    deployed = run.deployed
    if deployed is None:
        return None
    return f"Model shipped: the {deployed.kind} {deployed.backbone} ({deployed.model.name}), because {deployed.reason}."


def _mb(size_bytes: int | None) -> float | None:
    return round(size_bytes / 1e6, 2) if size_bytes else None


def _ran_on(entry: Mapping[str, Any], gpu: str | None, where: str | None = None) -> str:
    device = entry.get("device", "cpu")
    if device == "cpu":
        threads = entry.get("threads")
        here = f"CPU, {threads} thread{'s' if threads != 1 else ''}" if threads else "CPU"
    else:
        here = gpu or "GPU"
    return f"{where} · {here}" if where else f"this machine · {here}"


def _row_label(key: str) -> tuple[str, str, str]:
    """(runtime, precision, label) of a benchmark key such as ``onnxruntime_fp32_cuda`` or ``tensorrt_int8``."""
    runtime, _, rest = key.partition("_")
    precision, _, provider = rest.partition("_")
    name = f"{RUNTIMES.get(runtime, runtime)} {PRECISION_WORDS.get(precision, precision.upper())}"
    if runtime == "onnxruntime" and provider:
        name += f" ({'TensorRT' if provider == 'tensorrt' else provider.upper()} provider)"
    return runtime, precision, name


def _runtime_entries(metrics: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(key, entry) for key, entry in metrics.items()
            if isinstance(entry, Mapping) and any(k.startswith("latency_ms") or k == "val_top1" for k in entry)]


def _gpu_name(run: _Run) -> str | None:
    course, environment = run.get(CourseRunRecord), run.get(EnvironmentRecord)
    if course is not None and course.metrics.get("machine", {}).get("gpu"):
        return str(course.metrics["machine"]["gpu"]).split(",")[0]
    return environment.metrics.get("cuda_gpu") if environment is not None else None


def _sizes(run: _Run) -> dict[tuple[str, str], float | None]:
    """File size (MB) per (runtime, precision) of the deployed model's artifacts."""
    sizes: dict[tuple[str, str], float | None] = {}
    if (deployed := run.deployed) is not None:
        sizes[("pytorch", "fp32")] = _mb(deployed.model.size_bytes)
    if (onnx := run.get(OnnxRecord)) is not None:
        sizes[("onnxruntime", "fp32")] = _mb(onnx.optimized.size_bytes)
    if (ptq := run.get(PtqRecord)) is not None and ptq.cpu_int8 is not None:
        sizes[("onnxruntime", "int8")] = _mb(ptq.cpu_int8.size_bytes)
    if (qat := run.get(QatRecord)) is not None:
        sizes[("onnxruntime", "int8-qat")] = _mb(qat.onnx.size_bytes)
    if (engines := run.get(EnginesRecord)) is not None:
        sizes.update({("tensorrt", precision): _mb(ref.size_bytes) for precision, ref in engines.engines.items()})
    return sizes


def _row(name: str, entry: Mapping[str, Any], ran_on: str, size_mb: float | None, stale: bool) -> PipelineRow:
    return PipelineRow(label=name, ran_on=ran_on, top1=entry.get("val_top1"), size_mb=entry.get("size_mb", size_mb),
                       latency_b1_ms=entry.get("latency_ms_p50_b1"), latency_b8_ms=entry.get("latency_ms_p50_b8"),
                       throughput_b8=entry.get("throughput_b8"), note="⚠ stale" if stale else "")


def _order(key: str, source: int) -> tuple[int, int, int]:
    runtime, precision, _ = _row_label(key)
    return source, ORDER.get(runtime, 9), ORDER.get(precision, 9)


def _int8_entry(ptq: PtqRecord) -> dict[str, Any] | None:
    """Notebook 06's own figures of the kept CPU INT8 model, in the benchmark's shape (throughput from p50)."""
    if ptq.metrics.get("best_cpu_variant") not in ptq.metrics.get("variants", {}):
        return None
    best = ptq.best_cpu()
    b8 = best.get("latency_ms_b8")
    return {"val_top1": best.get("val_top1"), "latency_ms_p50_b1": best.get("latency_ms_b1"), "latency_ms_p50_b8": b8,
            "throughput_b8": round(8000 / b8, 2) if b8 else None, "device": "cpu", "name": best["name"]}


def _pipeline(run: _Run) -> tuple[list[PipelineRow], list[str]]:
    """The headline table's rows (this machine's benchmark, its INT8 and QAT models, the device runs) and notes."""
    rows: list[tuple[tuple[int, int, int], PipelineRow]] = []
    notes: list[str] = []
    gpu, sizes = _gpu_name(run), _sizes(run)
    benchmark = run.get(BenchmarkRecord)
    entries = _runtime_entries(benchmark.metrics) if benchmark is not None else []
    for key, entry in entries:
        runtime, precision, name = _row_label(key)
        rows.append((_order(key, 0), _row(name, entry, _ran_on(entry, gpu), sizes.get((runtime, precision)),
                                          "benchmark" in run.stale)))
    ptq = run.get(PtqRecord)
    if ptq is not None and "onnxruntime_int8" not in dict(entries) and (int8 := _int8_entry(ptq)) is not None:
        threads = benchmark.settings.get("benchmark", {}).get("threads") if benchmark is not None else None
        rows.append((_order("onnxruntime_int8", 0), _row("ONNX Runtime INT8 PTQ", int8, _ran_on(
            {"device": "cpu", "threads": threads}, gpu), sizes.get(("onnxruntime", "int8")), "ptq" in run.stale)))
        notes.append(f"ONNX Runtime INT8 PTQ ({int8['name']}) is notebook 06's own timing; notebook 07's final "
                     "benchmark (`python -m course_utils benchmark`) times it with the other runtimes.")
    if (qat := run.get(QatRecord)) is not None and "onnxruntime_int8-qat" not in dict(entries):
        rows.append(((0, ORDER["qat"], 0), _row("QAT INT8 (Q/DQ ONNX)", {"val_top1": qat.metrics.get("val_top1")},
                                                "this machine · ONNX Runtime CPU (accuracy only)",
                                                _mb(qat.onnx.size_bytes), "qat" in run.stale)))
    if (device := run.get(DeviceRunRecord)) is not None:
        for key, entry in _runtime_entries(device.metrics):
            runtime, precision, name = _row_label(key)
            carried = sizes.get((runtime, precision)) if runtime == "onnxruntime" else None  # engines are its own
            rows.append((_order(key, 1), _row(name, entry, _ran_on(entry, "GPU", device.device), carried,
                                              "device_run" in run.stale)))
    engines = run.get(EnginesRecord)
    if engines is not None and not engines.engines:
        planned = engines.settings.get("planned_for_tensorrt")
        notes.append("TensorRT: no engine was built on this machine (no TensorRT or no GPU)"
                     + (f"; notebooks 05 (FP32, FP16) and 06 (INT8) planned them for TensorRT {planned}" if planned else "")
                     + ". Build them on a GPU machine or a Jetson (the deploy kit) to add their rows.")
    notes += [f"⚠ stale {stage} rows: {scrub(run.stale[stage], run.workspace)}"
              for stage in ("benchmark", "ptq", "qat", "device_run") if stage in run.stale]
    return [row for _, row in sorted(rows, key=lambda item: item[0])], notes


def _targets(run: _Run) -> list[Target]:
    """The pruning target the spec sets, then the pass/fail checks the stages record."""
    targets = []
    if (prune := run.get(PruneRecord)) is not None:
        reduction = prune.macs_reduction if "macs_reduction" in prune.model_fields_set else prune.metrics.get(
            "macs_reduction", 0.0)
        drop = prune.top1_drop if "top1_drop" in prune.model_fields_set else (
            prune.metrics.get("val_top1_unpruned", 1.0) - prune.metrics.get("val_top1_after_retrain", 0.0))
        targets.append(Target(
            what="Pruning pays (prune, retrain, recover)", target=prune.target,
            measured=f"{reduction:.0%} fewer MACs, top-1 {drop * 100:.1f} points below the unpruned model"
                     + (" (⚠ stale: see 03 in the details)" if "prune" in run.stale else ""),
            met=prune.meets_target))
    if (qat := run.get(QatRecord)) is not None and "onnx_parity_ok" in qat.metrics:
        targets.append(Target(
            what="QAT model exported faithfully", target="ONNX Runtime gives the PyTorch QAT model's answers",
            measured=f"{readable(qat.metrics.get('onnx_parity_agreement'), 'agreement')} agreement",
            met=bool(qat.metrics["onnx_parity_ok"])))
    if (imagegen := run.get(ImagegenRecord)) is not None and "subject_survived" in imagegen.metrics:
        noise = not imagegen.metrics.get("real_weights", True)
        targets.append(Target(
            what="The picture keeps the story's subject", target="the classifier finds the subject in the picture",
            measured=f"{imagegen.metrics.get('round_trip_subject')} → {imagegen.metrics.get('round_trip_top1')}"
                     + (" (not judged: the picture is noise)" if noise else ""),
            met=None if noise else bool(imagegen.metrics["subject_survived"])))
    if (app := run.get(AppRecord)) is not None and isinstance(app.metrics.get("demo_ready"), Mapping):
        missing = [name for name, status in app.metrics["demo_ready"].items() if status == "missing"]
        targets.append(Target(
            what="Ready for a live demo", target="every artifact the app uses is built (`prepare-demo`)",
            measured="missing: " + ", ".join(missing) if missing else "all built or not needed here", met=not missing))
    return targets


def _endpoint_words(endpoint: str) -> tuple[str, bool]:
    if endpoint.startswith("local:"):
        return f"{endpoint[6:].partition('@')[0]} served locally by llama.cpp (the offline default)", True
    return re.sub(r"https?://([^/@]+@)?", "", endpoint), False


def _assets(run: _Run) -> list[Asset]:
    """Which dataset, weights, LLM, image and speech models ran, offline stand-ins marked."""
    assets = []
    environment, finetune = run.get(EnvironmentRecord), run.get(FinetuneRecord)
    if environment is not None and environment.metrics.get("dataset"):
        metrics = environment.metrics
        fallback = str(metrics.get("dataset_fallback") or "")
        wanted, _, why = fallback.partition(": ")
        assets.append(Asset(need="dataset", used=f"{metrics['dataset']} ({metrics.get('dataset_source', 'source unknown')})"
                            + (f" instead of {wanted} ({why.rstrip('.')})" if fallback else ""), stand_in=bool(fallback)))
    elif finetune is not None:
        assets.append(Asset(need="dataset", used=finetune.dataset))
    if finetune is not None and finetune.weights:
        assets.append(Asset(need="backbone weights", used=f"{finetune.backbone}: {finetune.weights}",
                            stand_in="random" in finetune.weights))
    if (story := run.get(StoryRecord)) is not None and story.metrics.get("endpoint"):
        used, local = _endpoint_words(str(story.metrics["endpoint"]))
        assets.append(Asset(need="LLM", used=f"{used}; rails: {story.metrics.get('rails', '—')}", stand_in=local))
    if (imagegen := run.get(ImagegenRecord)) is not None and imagegen.metrics.get("model"):
        noise = not imagegen.metrics.get("real_weights", True)
        assets.append(Asset(need="image model", stand_in=noise, used=(
            f"pictures are noise: no image model offline ({imagegen.metrics['model']}, random weights)" if noise
            else str(imagegen.metrics["model"]))))
    if (speech := run.get(SpeechRecord)) is not None:
        for need, key in (("text-to-speech", "tts_model"), ("speech recognition", "asr_model")):
            if speech.metrics.get(key):
                assets.append(Asset(need=need, used=str(speech.metrics[key])))
    if environment is not None and "online" in environment.metrics:
        present = environment.metrics.get("offline_assets_present") or []
        assets.append(Asset(need="network", used=("online" if environment.metrics["online"] else "offline")
                            + (f"; offline assets present: {', '.join(present)}" if present else "")))
    return assets


def _versions(run: _Run) -> dict[str, str]:
    """Library versions the stages recorded (several when stages disagree), the main job's list first."""
    seen: dict[str, list[str]] = {}
    ordered = sorted(run.records.values(), key=lambda r: r.stage != CourseRunRecord.stage)
    for record in ordered:
        where = " (on the device)" if isinstance(record, DeviceRunRecord) else ""  # the Jetson's own stack
        for name, version in record.tools.items():
            if version and version not in seen.setdefault(name + where, []):
                seen[name + where].append(version)
    return {name: " / ".join(versions) for name, versions in sorted(seen.items()) if versions}


def summarize(ledger: Ledger) -> RunSummary:
    """The headline and provenance of the run recorded in ``ledger`` (what ``report.json`` holds)."""
    return _summary(_load(ledger))


def _summary(run: _Run) -> RunSummary:
    finetune, environment, course = run.get(FinetuneRecord), run.get(EnvironmentRecord), run.get(CourseRunRecord)
    deployed = run.deployed
    pipeline, notes = _pipeline(run)
    val_images = environment.metrics.get("val_images") if environment is not None else None
    machine: dict[str, str] = dict(course.metrics.get("machine", {})) if course is not None else {}
    if not machine and environment is not None:
        machine = {key: str(environment.metrics[key]) for key in ("course_path", "cuda_gpu", "tensorrt")
                   if environment.metrics.get(key)}
    spec = str(course.settings.get("spec", "")) if course is not None else ""
    assets = [asset.model_copy(update={"used": scrub(asset.used, run.workspace)}) for asset in _assets(run)]
    targets = [target.model_copy(update={"measured": scrub(target.measured, run.workspace)}) for target in _targets(run)]
    shipped = _shipped_line(run)
    return RunSummary(
        label=run.workspace.name, backbone=finetune.backbone if finetune else None,
        dataset=finetune.dataset if finetune else None, classes=finetune.classes if finetune else [],
        split=f"the validation split ({val_images} images)" if val_images else "the validation split",
        shipped=scrub(shipped, run.workspace) if shipped else None, shipped_kind=deployed.kind if deployed else None,
        recorded=max((r.recorded_at for r in run.records.values()), default=""),
        pipeline=pipeline, pipeline_notes=notes, targets=targets, assets=assets,
        machine={k: scrub(v, run.workspace) for k, v in machine.items()},
        spec=Path(spec).name if "/" in spec else spec,
        overrides=dict(course.settings.get("overrides", {})) if course is not None else {},
        versions=_versions(run),
        notebooks=dict(course.metrics.get("notebooks", {})) if course is not None else {},
        total_seconds=course.metrics.get("total_seconds") if course is not None else None)


# --- Pictures -----------------------------------------------------------------------------------------------------


@dataclass
class Picture:
    """One figure of the page: a title, its HTML (embedded images only) and a caption saying what to see."""

    title: str
    body: str
    caption: str


def _img(png: bytes, alt: str) -> str:
    from course_utils.core.report_figures import data_uri

    return f"<img src='{data_uri(png)}' alt='{html.escape(alt, quote=True)}'>"


def _plots(run: _Run, summary: RunSummary) -> list[tuple[str, Callable[[], bytes], str]]:
    """(title, draw, caption) of every plot the records have the figures for."""
    from course_utils.core import report_figures as figures

    plots: list[tuple[str, Callable[[], bytes], str]] = []
    finetune = run.get(FinetuneRecord)
    if finetune is not None and finetune.metrics.get("history"):
        plots.append(("Training curves", lambda: figures.training_curves(finetune.metrics["history"]),
                      ("Loss and top-1 per epoch: the new head alone first (shaded), then part of the backbone too. "
                       "Validation far below train means overfitting.")))
    if finetune is not None and finetune.metrics.get("confusion"):
        plots.append(("Confusion matrix", lambda: figures.confusion_matrix(finetune.metrics["confusion"],
                                                                           finetune.classes),
                      (f"The fine-tuned model on {summary.split}: the diagonal is right, the rest says which classes "
                       "it mixes up.")))
    elif finetune is not None and finetune.metrics.get("per_class_top1"):
        plots.append(("Top-1 per class", lambda: figures.bars(finetune.metrics["per_class_top1"], "validation top-1",
                                                               percent=True),
                      f"The fine-tuned model on {summary.split}, class by class."))
    prune = run.get(PruneRecord)
    if prune is not None and prune.metrics.get("sweep"):
        targets = prune.settings.get("prune", {})
        plots.append(("Pruning: accuracy against MACs", lambda: figures.prune_sweep(
            prune.metrics["sweep"], prune.metrics.get("macs_before", 0), prune.metrics.get("val_top1_unpruned", 0.0),
            targets.get("target_macs_reduction"), targets.get("max_top1_drop"), prune.metrics.get("ratio")),
            (f"Each pruning ratio of the sweep, retrained; the green zone is the target ({prune.target}): "
             f"{'met' if prune.meets_target else 'missed'}, so the {summary.shipped_kind or 'fine-tuned'} model ships.")))
    timed = [row.model_dump() for row in summary.pipeline if row.latency_b1_ms or row.latency_b8_ms]
    if timed:
        plots.append(("Latency per runtime", lambda: figures.latency_per_runtime(timed),
                      ("p50 latency of the deployed model at batch 1 and batch 8 (log scale), each runtime on the "
                       "device named under it.")))
    ptq = run.get(PtqRecord)
    if ptq is not None and ptq.metrics.get("variants"):
        plots.append(("INT8 recipes: accuracy against speed", lambda: figures.int8_variants(
            ptq.metrics["variants"], ptq.metrics.get("fp32")),
            (f"Every INT8 calibration recipe of notebook 06; the kept CPU model is "
             f"{ptq.metrics.get('best_cpu_variant', '—')}. Up and left is better.")))
    story = run.get(StoryRecord)
    if story is not None and story.metrics.get("redteam"):
        by_category = any("by_category" in row for row in story.metrics["redteam"].values())
        plots.append(("Red team: what the rails block", lambda: figures.redteam(story.metrics["redteam"]),
                      "Share of adversarial prompts blocked" + (" per category" if by_category else "")
                      + " by each rail configuration, and of benign prompts wrongly blocked."))
    return plots


def _photos_html(photos: Sequence[Mapping[str, Any]], images: Mapping[str, bytes]) -> str:
    cards = []
    for photo in photos:
        if photo["image"] not in images:
            continue
        bars = "".join(f"<div>{html.escape(str(name))} {p:.0%}<div class='bar' style='width:{p * 100:.0f}%'></div></div>"
                       for name, p in photo.get("top5", []))
        cards.append(f"<div class='photo'>{_img(images[photo['image']], str(photo.get('name', 'photo')))}{bars}</div>")
    return f"<div class='photos'>{''.join(cards)}</div>" if cards else ""


def _app_pictures(run: _Run) -> list[Picture]:
    from course_utils.core.showcase import last_run_images

    app = run.get(AppRecord)
    last = app.metrics.get("last_run") if app is not None else None
    if not isinstance(last, Mapping):
        return []
    images = last_run_images(run.workspace, dict(last))
    pictures = []
    if (photos := _photos_html(last.get("photos", []), images)):
        pictures.append(Picture("Classified photos and their top-5", photos,
                                "The app's last run: each photo with the deployed model's five most likely classes."))
    picture = last.get("picture")
    story = html.escape(scrub(str(last.get("story", "")), run.workspace))
    if story or picture in images:
        drawn = _img(images[picture], "the app's picture").replace("<img ", "<img class='picture' ", 1) if (
            picture in images) else ""
        body = drawn + f"<div class='story'>{story}</div>"
        noise = " The picture is NOISE: the offline stand-in pipeline has random weights." if last.get(
            "picture_is_noise") else ""
        blocked = " The story was blocked by the rails." if last.get("story_blocked") else ""
        pictures.append(Picture("The app's last story and picture", body,
                                "Written by the guarded storyteller about the photos' labels, then drawn." + blocked + noise))
    return pictures


def _scheduler_pictures(run: _Run) -> list[Picture]:
    """Notebook 09's pictures of one prompt under each scheduler (the files it saves in the workspace)."""
    paths = sorted((run.workspace / "imagegen").glob("scheduler_*.png"))
    imagegen = run.get(ImagegenRecord)
    if not paths or imagegen is None:
        return []
    body = "<div class='photos'>" + "".join(
        f"<div class='photo'>{_img(path.read_bytes(), path.stem)}{html.escape(path.stem.removeprefix('scheduler_'))}</div>"
        for path in paths) + "</div>"
    noise = "" if imagegen.metrics.get("real_weights", True) else " Noise: no image model offline (random weights)."
    return [Picture("Story to image: one prompt, three schedulers", body,
                    f"Notebook 09's picture of its story with each scheduler ({imagegen.metrics.get('model')})." + noise)]


def _pictures(run: _Run, summary: RunSummary) -> list[Picture]:
    """Every picture the records (and the files the stages keep in the workspace) can draw, in course order."""
    drawn = []
    for title, draw, caption in _plots(run, summary):
        try:
            drawn.append(Picture(title, _img(draw(), title), caption))
        except (KeyError, TypeError, ValueError, IndexError) as error:  # a record of another shape: say so, go on
            LOG.warning("Left out the picture %r: %s", title, error)
    return drawn + _app_pictures(run) + _scheduler_pictures(run)


# --- Rendering -----------------------------------------------------------------------------------------------------


def _met(met: bool | None) -> tuple[str, str]:
    return {True: ("✔ met", "met"), False: ("✘ missed", "missed"), None: ("— not judged", "na")}[met]


def _pipeline_cells(row: PipelineRow) -> list[str]:
    return [row.label + (f" {row.note}" if row.note.startswith("⚠") else ""), row.ran_on,
            readable(row.top1, "top1"), readable(row.size_mb, "size_mb"), readable(row.latency_b1_ms, "latency_ms"),
            readable(row.latency_b8_ms, "latency_ms"), readable(row.throughput_b8, "throughput")]


PIPELINE_HEADER = ["runtime · precision", "ran on", "top-1", "size", "p50 latency, batch 1", "p50 latency, batch 8",
                   "throughput, batch 8"]


def _when(recorded_at: str) -> str:
    """A record's UTC timestamp in words: ``2026-12-01 23:21 UTC``."""
    return recorded_at.replace("T", " ")[:16] + " UTC"


def _headline_facts(summary: RunSummary) -> tuple[str, str]:
    """(h1, subtitle) of a run."""
    heading = f"{summary.backbone} on {summary.dataset}" if summary.backbone else TITLE
    facts = [f"spec {summary.spec}" if summary.spec else "",
             f"{len(summary.classes)} classes" if summary.classes else "",
             f"{len(summary.notebooks)} notebooks in {duration(summary.total_seconds)}" if summary.total_seconds else "",
             f"recorded {_when(summary.recorded)}" if summary.recorded else ""]
    return heading, " · ".join(fact for fact in facts if fact)


def _provenance_tables(summary: RunSummary) -> list[Table]:
    tables = [Table("Assets", ["need", "used", ""], [[a.need, a.used, "offline stand-in" if a.stand_in else ""]
                                                     for a in summary.assets])] if summary.assets else []
    tables.append(Table("Machine", ["", ""], [[label(k), v] for k, v in summary.machine.items()] or [
        ["", "not recorded: `make course` (run-all) records the machine"]]))
    overrides = ", ".join(f"{k}={v!r}" for k, v in summary.overrides.items()) or "none"
    tables.append(Table("Spec", ["", ""], [["spec", summary.spec or "not recorded (run-all records it)"],
                                           ["overrides", scrub(overrides)]]))
    if summary.notebooks:
        tables.append(Table("Wall time per notebook", ["notebook", "wall time"], [
            [name, duration(seconds)] for name, seconds in summary.notebooks.items()]
            + [["total", duration(summary.total_seconds or sum(summary.notebooks.values()))]]))
    return tables


def render_markdown(ledger: Ledger, title: str = TITLE) -> str:
    """The report as Markdown: the headline, the targets, the details per stage and the provenance (no pictures)."""
    run = _load(ledger)
    return _render_markdown(run, _summary(run), title)


def _heading(summary: RunSummary, title: str) -> tuple[str, str]:
    """The page's heading and the line under it (the title too when it is not the heading)."""
    heading, subtitle = _headline_facts(summary)
    return heading, " · ".join(part for part in (title if title != heading else "", subtitle) if part)


def _render_markdown(run: _Run, summary: RunSummary, title: str) -> str:
    heading, sub = _heading(summary, title)
    lines = [f"# {heading}", ""] + ([f"_{sub}_", ""] if sub else [])
    if summary.shipped:
        lines += [summary.shipped, ""]
    if not run.records:
        return "\n".join(lines + ["Nothing was recorded yet: run the notebooks (`make course`).", ""])
    if stand_ins := [a for a in summary.assets if a.stand_in]:
        lines += ["Offline stand-ins: " + "; ".join(f"{a.need}: {a.used}" for a in stand_ins) + ".", ""]
    if summary.pipeline:
        lines += ["## The deployed model through the pipeline", "", _markdown_tables([Table(
            "", PIPELINE_HEADER, [_pipeline_cells(row) for row in summary.pipeline])]), "",
            f"Top-1 on {summary.split}; latency is the median of timed runs after a warm-up.", ""]
    lines += [f"- {note}" for note in summary.pipeline_notes] + ([""] if summary.pipeline_notes else [])
    if summary.targets:
        lines += ["## Targets", "", _markdown_tables([Table("", ["", "target", "this run", "met"], [
            [t.what, t.target, t.measured, _met(t.met)[0]] for t in summary.targets])]), ""]
    lines += ["Pictures: open `report.html` (they are embedded there).", "", "## Details, stage by stage", ""]
    for stage, record in _ordered(run.records):
        line = _summary_line(stage, record)
        lines += [(f"<details><summary><b>{STAGE_TITLES.get(stage, stage)}</b>{' · ' + line if line else ''}"
                   "</summary>"), ""]
        if stage in run.stale:
            lines += [f"⚠ stale: {scrub(run.stale[stage], run.workspace)}", ""]
        lines += [_markdown_tables(detail_tables(stage_figures(record), run.workspace)), "", "</details>", ""]
    lines += ["## Provenance", "", _markdown_tables(_provenance_tables(summary))]
    if summary.versions:
        lines += ["", _markdown_tables([Table("Library versions", ["library", "version"],
                                              [[k, v] for k, v in summary.versions.items()])])]
    return "\n".join(lines) + "\n"


def _ordered(records: Mapping[str, StageRecord]) -> list[tuple[str, StageRecord]]:
    stages = [s for s in STAGE_TITLES if s in records] + sorted(set(records) - set(STAGE_TITLES) - {"course"})
    return [(stage, records[stage]) for stage in stages]


def _summary_line(stage: str, record: StageRecord) -> str:
    picked = [(key, record.metrics[key]) for key in SUMMARY_KEYS.get(stage, ()) if record.metrics.get(key) is not None]
    if isinstance(record, EnginesRecord):
        return ", ".join(record.engines) + " built" if record.engines else "none built here"
    if isinstance(record, DeviceRunRecord):
        return scrub(record.device)
    return " · ".join(f"{label(key)} {readable(value, key)}" for key, value in picked)


def _html_table(table: Table, css: str = "", numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header) if any(table.header) else ""
    body = "".join("<tr>" + "".join(
        f"<td{' class=num' if i >= numeric_from and _numeric(cell) else ''}>{html.escape(cell)}</td>"
        for i, cell in enumerate(row)) + "</tr>" for row in table.rows)
    caption = f"<h4>{html.escape(table.title)}</h4>" if table.title else ""
    return f"{caption}<table{f' class={css}' if css else ''}>{'<tr>' + head + '</tr>' if head else ''}{body}</table>"


def _numeric(cell: str) -> bool:
    return bool(re.match(r"^[+−-]?\d", cell))


def _page(title: str, body: Iterable[str]) -> str:
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _figures_html(items: Sequence[Picture]) -> str:
    return "<div class='pictures'>" + "".join(
        f"<figure>{p.body}<figcaption><b>{html.escape(p.title)}.</b> {html.escape(p.caption)}</figcaption></figure>"
        for p in items) + "</div>"


def render_html(ledger: Ledger, title: str = TITLE) -> str:
    """The report as one self-contained HTML page (pictures embedded, nothing fetched)."""
    run = _load(ledger)
    return _render_html(run, _summary(run), title)


def _render_html(run: _Run, summary: RunSummary, title: str) -> str:
    heading, sub = _heading(summary, title)
    body = [f"<header><h1>{html.escape(heading)}</h1><p class='sub'>{html.escape(sub)}</p></header>"]
    if summary.shipped:
        body.append(f"<p class='shipped'><b>Model shipped:</b> {html.escape(summary.shipped.removeprefix('Model shipped: '))}</p>")
    if not run.records:
        return _page(title, body + ["<p>Nothing was recorded yet: run the notebooks (<code>make course</code>).</p>"])
    if stand_ins := [a for a in summary.assets if a.stand_in]:
        body.append("<div class='fallbacks'><b>Offline stand-ins in this run:</b><ul>" + "".join(
            f"<li>{html.escape(a.need)}: {html.escape(a.used)}</li>" for a in stand_ins) + "</ul></div>")
    if summary.pipeline:
        rows = [_pipeline_cells(row) for row in summary.pipeline]
        body += ["<h2>The deployed model through the pipeline</h2>",
                 _html_table(Table("", PIPELINE_HEADER, rows), "headline", numeric_from=2),
                 (f"<p class='note'>Top-1 on {html.escape(summary.split)}; latency is the median of timed runs "
                  "after a warm-up; size is the file the runtime loads.</p>")]
    if summary.pipeline_notes:
        body.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in summary.pipeline_notes) + "</ul>")
    if summary.targets:
        cells = "".join(f"<tr><td>{html.escape(t.what)}</td><td>{html.escape(t.target)}</td>"
                        f"<td>{html.escape(t.measured)}</td><td class='{_met(t.met)[1]}'>{_met(t.met)[0]}</td></tr>"
                        for t in summary.targets)
        body += ["<h2>Targets</h2>", ("<table class='targets'><tr><th></th><th>target</th><th>this run</th>"
                                      f"<th>met</th></tr>{cells}</table>")]
    if drawn := _pictures(run, summary):
        body += ["<h2>Pictures</h2>", _figures_html(drawn)]
    body.append("<h2>Details, stage by stage</h2>")
    for stage, record in _ordered(run.records):
        stale = (f"<p class='stale'>⚠ stale: {html.escape(scrub(run.stale[stage], run.workspace))}</p>"
                 if stage in run.stale else "")
        tables = "".join(_html_table(t) for t in detail_tables(stage_figures(record), run.workspace))
        body.append(f"<details class='stage' id='stage-{stage}'><summary><b>{html.escape(STAGE_TITLES.get(stage, stage))}"
                    f"</b>{html.escape(' · ' + line if (line := _summary_line(stage, record)) else '')}"
                    f"{' ⚠ stale' if stale else ''}</summary>"
                    f"{stale}{tables}</details>")
    body += ["<h2>Provenance</h2>"] + [_html_table(t, numeric_from=99) for t in _provenance_tables(summary)]
    if summary.versions:
        body.append("<details><summary><b>Library versions</b> · as the stages recorded them</summary>"
                    + _html_table(Table("", ["library", "version"], [[k, v] for k, v in summary.versions.items()]),
                                  numeric_from=99) + "</details>")
    return _page(title, body)


def write_report(ledger: Ledger, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` of ``ledger`` into ``out_dir`` (with ``report.json``, the run's
    summary that ``report --compare`` reads); return the Markdown and HTML paths."""
    run = _load(ledger)
    summary = _summary(run)
    markdown = write_text_atomic(out_dir / "report.md", _render_markdown(run, summary, TITLE))
    page = write_text_atomic(out_dir / "report.html", _render_html(run, summary, TITLE))
    write_text_atomic(out_dir / SUMMARY_NAME, summary.model_dump_json(indent=2) + "\n")
    return markdown, page


# --- Two runs side by side -----------------------------------------------------------------------------------------


def _run_label(folder: Path) -> str:
    return f"{folder.parent.parent.name} {folder.name}" if folder.parent.name == "runs" else folder.name


def load_run(path: Path) -> RunSummary:
    """A run to compare: a workspace (its ledger as it is now) or a folder holding ``report.json`` (that report)."""
    from course_utils.core.ledger import LEDGER_NAME, Ledger

    folder = path.parent if path.name in {LEDGER_NAME, SUMMARY_NAME} else path
    if (folder / LEDGER_NAME).is_file():
        summary = summarize(Ledger(folder))
    elif (folder / SUMMARY_NAME).is_file():
        try:
            summary = RunSummary.model_validate_json((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
        except ValidationError as error:
            raise ReportError(f"{folder / SUMMARY_NAME} is not a report summary this course can read "
                              f"({error.error_count()} problems); rebuild it with `python -m course_utils report`.") from None
    else:
        raise ReportError(f"{path} is neither a workspace (no {LEDGER_NAME}) nor a report folder (no {SUMMARY_NAME}): "
                          "pass a workspace folder, or a folder a report was written to, e.g. workspace/runs/<timestamp>.")
    return summary.model_copy(update={"label": _run_label(folder.resolve())})


def _labels(a: RunSummary, b: RunSummary) -> tuple[str, str]:
    return (a.label, b.label) if a.label != b.label else (f"A: {a.label}", f"B: {b.label}")


def _fact_rows(a: RunSummary, b: RunSummary) -> list[list[str]]:
    def facts(s: RunSummary) -> dict[str, str]:
        return {"dataset": s.dataset or "—", "model": s.backbone or "—", "classes": str(len(s.classes)),
                "shipped": s.shipped.removeprefix("Model shipped: ") if s.shipped else "—", "spec": s.spec or "—",
                "overrides": ", ".join(f"{k}={v!r}" for k, v in s.overrides.items()) or "none",
                **{f"machine: {label(k)}": v for k, v in s.machine.items()},
                "wall time": duration(s.total_seconds) if s.total_seconds else "—",
                "recorded": _when(s.recorded) if s.recorded else "—"}

    left, right = facts(a), facts(b)
    return [[name, left.get(name, "—"), right.get(name, "—")] for name in dict.fromkeys([*left, *right])]


def _pipeline_compare_rows(a: RunSummary, b: RunSummary) -> list[tuple[str, PipelineRow | None, PipelineRow | None]]:
    left, right = {r.key: r for r in a.pipeline}, {r.key: r for r in b.pipeline}
    return [(key, left.get(key), right.get(key)) for key in dict.fromkeys([*left, *right])]


def _pair(row_a: PipelineRow | None, row_b: PipelineRow | None, field: str, unit_key: str) -> list[str]:
    values = [getattr(row, field) if row is not None else None for row in (row_a, row_b)]
    return [readable(values[0], unit_key), readable(values[1], unit_key)]


def _compare_tables(a: RunSummary, b: RunSummary) -> list[Table]:
    name_a, name_b = _labels(a, b)
    tables = [Table("The runs", ["", name_a, name_b], _fact_rows(a, b))]
    rows = [[key, *_pair(ra, rb, "top1", "top1"), *_pair(ra, rb, "size_mb", "size_mb"),
             *_pair(ra, rb, "latency_b1_ms", "latency_ms"), *_pair(ra, rb, "latency_b8_ms", "latency_ms"),
             *_pair(ra, rb, "throughput_b8", "throughput")] for key, ra, rb in _pipeline_compare_rows(a, b)]
    if rows:
        tables.append(Table(f"The deployed model through the pipeline (A: {name_a}, B: {name_b})", [
            "runtime · ran on"] + [f"{what} {who}" for what in ("top-1", "size", "p50 batch 1", "p50 batch 8",
                                                               "throughput batch 8") for who in "AB"], rows))
    targets_a, targets_b = {t.what: t for t in a.targets}, {t.what: t for t in b.targets}
    if targets_a or targets_b:
        tables.append(Table("Targets", ["", name_a, name_b], [
            [what] + [f"{_met(t.met)[0]}: {t.measured}" if t else "—" for t in (targets_a.get(what), targets_b.get(what))]
            for what in dict.fromkeys([*targets_a, *targets_b])]))
    assets_a, assets_b = {x.need: x.used for x in a.assets}, {x.need: x.used for x in b.assets}
    if assets_a or assets_b:
        tables.append(Table("Assets", ["", name_a, name_b], [[need, assets_a.get(need, "—"), assets_b.get(need, "—")]
                                                             for need in dict.fromkeys([*assets_a, *assets_b])]))
    notebooks = list(dict.fromkeys([*a.notebooks, *b.notebooks]))
    if notebooks:
        tables.append(Table("Wall time per notebook", ["notebook", name_a, name_b], [
            [n] + [duration(s.notebooks[n]) if n in s.notebooks else "—" for s in (a, b)] for n in notebooks]))
    differing = [[name, a.versions.get(name, "—"), b.versions.get(name, "—")]
                 for name in sorted(set(a.versions) | set(b.versions)) if a.versions.get(name) != b.versions.get(name)]
    tables.append(Table("Library versions that differ", ["library", name_a, name_b], differing or [["none", "", ""]]))
    return tables


def _compare_pictures(a: RunSummary, b: RunSummary) -> list[Picture]:
    from course_utils.core import report_figures as figures

    names = _labels(a, b)
    rows = _pipeline_compare_rows(a, b)
    drawn = []
    timed = [(key, ra, rb) for key, ra, rb in rows if (ra and ra.latency_b8_ms) or (rb and rb.latency_b8_ms)]
    if timed:
        png = figures.compare_bars([k for k, _, _ in timed], [r.latency_b8_ms if r else None for _, r, _ in timed],
                                   [r.latency_b8_ms if r else None for _, _, r in timed], names,
                                   "p50 latency at batch 8 (ms, log scale)", log=True)
        drawn.append(Picture("Latency, side by side", _img(png, "latency of both runs"),
                             "Batch-8 p50 latency of every runtime in both runs (shorter is faster)."))
    scored = [(key, ra, rb) for key, ra, rb in rows if (ra and ra.top1 is not None) or (rb and rb.top1 is not None)]
    if scored:
        png = figures.compare_bars([k for k, _, _ in scored], [r.top1 * 100 if r and r.top1 is not None else None
                                                                for _, r, _ in scored],
                                   [r.top1 * 100 if r and r.top1 is not None else None for _, _, r in scored], names,
                                   "validation top-1 (%)")
        drawn.append(Picture("Top-1, side by side", _img(png, "top-1 of both runs"),
                             "Validation top-1 of every runtime in both runs (each on its own validation split)."))
    notebooks = list(dict.fromkeys([*a.notebooks, *b.notebooks]))
    if notebooks:
        png = figures.compare_bars(notebooks, [a.notebooks.get(n) for n in notebooks],
                                   [b.notebooks.get(n) for n in notebooks], names, "wall time (s)")
        drawn.append(Picture("Wall time per notebook", _img(png, "wall time of both runs"),
                             "Seconds each notebook took in the main job of each run."))
    return drawn


def compare_runs(a: RunSummary, b: RunSummary) -> tuple[str, str]:
    """Two runs side by side as (Markdown, self-contained HTML): facts, pipeline, targets, assets, times, versions."""
    name_a, name_b = _labels(a, b)
    title = f"{name_a} vs {name_b}"
    tables = _compare_tables(a, b)
    markdown = f"# {title}\n\n_{TITLE}: two runs side by side_\n\n" + _markdown_tables(tables) + "\n"
    body = [(f"<header><h1>{html.escape(title)}</h1><p class='sub'>{TITLE}: two runs side by side; "
             "highlighted rows differ</p></header>")]
    body += [_highlight_differences(table) for table in tables]
    body += ["<h2>Pictures</h2>", _figures_html(_compare_pictures(a, b))]
    return markdown, _page(title, body)


def _highlight_differences(table: Table) -> str:
    """``table`` as HTML, rows whose two runs' values differ highlighted."""
    plain = _html_table(Table(table.title, table.header, []))
    rows = []
    for row in table.rows:
        values = row[1:]
        pairs = list(zip(values[::2], values[1::2])) if len(values) > 2 else [tuple(values)]
        differs = any(len(set(pair)) > 1 for pair in pairs)
        cells = "".join(f"<td{' class=num' if i and _numeric(c) else ''}>{html.escape(c)}</td>" for i, c in enumerate(row))
        rows.append(f"<tr{' class=differs' if differs else ''}>{cells}</tr>")
    return plain.replace("</table>", "".join(rows) + "</table>")


def write_comparison(a: RunSummary, b: RunSummary, out_dir: Path) -> tuple[Path, Path]:
    """Write ``compare.md`` and ``compare.html`` of runs ``a`` and ``b`` into ``out_dir``; return both paths."""
    markdown, page = compare_runs(a, b)
    return write_text_atomic(out_dir / "compare.md", markdown), write_text_atomic(out_dir / "compare.html", page)
