"""The report's pictures, drawn from the records' plain figures as PNG bytes, ready to embed in one HTML page.

Each function takes what a record holds (lists and dicts of numbers, no model, no PyTorch) and returns the
PNG of one matplotlib figure; ``course_utils.core.report`` embeds them as ``data:`` URIs, so the page needs no
other file and no network. Matplotlib is imported when a picture is drawn, not when the report module is.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 96
PASS, MUTED = "#2e7d32", "#9e9e9e"


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """``png`` as a ``data:`` URI for an ``<img src>`` (the page stays one self-contained file)."""
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same data, same bytes
    return buffer.getvalue()


def training_curves(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Loss and top-1 per epoch for train and validation, the head-only epochs shaded."""
    figure = _figure(8, 3)
    loss, accuracy = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    epochs = [int(row["epoch"]) + 1 for row in history]
    head = [e for e, row in zip(epochs, history) if row.get("phase") == "head"]
    for axis, key, name in ((loss, "loss", "loss"), (accuracy, "top1", "top-1")):
        axis.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        axis.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label="validation")
        if head:
            axis.axvspan(0.5, max(head) + 0.5, color=MUTED, alpha=0.2, label="head only")
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.set_xticks(epochs)
        axis.legend(fontsize=8)
    return _png(figure)


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Counts of (true class, predicted class) on the validation split."""
    size = max(3.0, 0.5 * len(classes) + 1.6)
    figure = _figure(size + 0.4, size)
    axis = figure.add_subplot()
    axis.imshow(confusion, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    peak = max((max(row) for row in confusion if row), default=0)
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    return _png(figure)


def bars(values: Mapping[str, float], xlabel: str, percent: bool = False) -> bytes:
    """Named values as horizontal bars (per-class top-1, seconds per notebook …), each bar labelled."""
    figure = _figure(6, 0.35 * len(values) + 1.0)
    axis = figure.add_subplot()
    names = list(values)[::-1]
    numbers = [values[name] * (100 if percent else 1) for name in names]
    drawn = axis.barh(names, numbers)
    axis.bar_label(drawn, fmt="%.0f%%" if percent else "%.3g", fontsize=8, padding=2)
    axis.set_xlabel(xlabel)
    if percent:
        axis.set_xlim(0, 110)
    return _png(figure)


def prune_sweep(sweep: Mapping[str, Mapping[str, Any]], macs_before: float, top1_unpruned: float,
                target_reduction: float | None, max_drop: float | None, kept_ratio: float | None) -> bytes:
    """Top-1 against MACs for every pruning ratio of the sweep, the spec's target zone shaded."""
    figure = _figure(6, 3.6)
    axis = figure.add_subplot()
    points = sorted(((float(name.removeprefix("ratio_")), row) for name, row in sweep.items()), key=lambda p: p[0])
    macs = [row["macs"] / 1e6 for _, row in points]
    after = [float(row.get("val_top1_after_retrain", math.nan)) for _, row in points]
    axis.plot(macs, after, "o-", label="after retraining")
    axis.plot(macs, [float(row.get("val_top1_before_retrain", math.nan)) for _, row in points], "o--", mfc="none",
              label="right after pruning")
    for (ratio, _), x, y in zip(points, macs, after):
        axis.annotate(f"{ratio:g}" + (" (kept)" if ratio == kept_ratio else ""), (x, y),
                      xytext=(4, 4), textcoords="offset points", fontsize=8)
    if target_reduction is not None and max_drop is not None and macs_before:
        right = macs_before / 1e6 * (1 - target_reduction)
        axis.fill_between([0, right], top1_unpruned - max_drop, 1.04, color=PASS, alpha=0.2, edgecolor=PASS,
                          label="target zone")
    axis.set_xlim(0, max(macs, default=1) * 1.1)
    axis.set_ylim(-0.02, 1.05)
    axis.set_xlabel("MACs per image (millions)")
    axis.set_ylabel("validation top-1")
    axis.legend(fontsize=8, loc="lower right")
    return _png(figure)


def latency_per_runtime(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """p50 latency at batch 1 and batch 8 of every runtime row of the headline table (log scale)."""
    import numpy as np

    labels = [f"{row['label']}\n{row['ran_on']}" for row in rows][::-1]
    figure = _figure(7, 0.62 * len(rows) + 1.2)
    axis = figure.add_subplot()
    y = np.arange(len(labels))
    for offset, key, name in ((0.2, "latency_b1_ms", "batch 1"), (-0.2, "latency_b8_ms", "batch 8")):
        values = [row.get(key) or 0.0 for row in rows][::-1]
        drawn = axis.barh(y + offset, values, height=0.38, label=name)
        axis.bar_label(drawn, labels=[f"{v:.3g}" if v else "" for v in values], fontsize=7, padding=2)
    axis.set_yticks(y, labels, fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("p50 latency (ms, log scale; shorter is faster)")
    axis.legend(fontsize=8)
    return _png(figure)


def int8_variants(variants: Mapping[str, Mapping[str, Any]], fp32: Mapping[str, Any] | None) -> bytes:
    """Top-1 against batch-8 latency of every INT8 recipe, the FP32 model as the reference point."""
    figure = _figure(6, 3.6)
    axis = figure.add_subplot()
    for name, row in sorted(variants.items(), key=lambda item: str(item[1].get("target"))):
        marker, runtime = ("o", "CPU") if row.get("target") == "cpu" else ("s", "TensorRT Q/DQ")
        axis.scatter([row["latency_ms_b8"]], [row["val_top1"]], marker=marker, s=40, label=f"{name} ({runtime})")
    if fp32 and fp32.get("latency_ms_b8"):
        axis.scatter([fp32["latency_ms_b8"]], [fp32["val_top1"]], marker="*", s=160, color="black", label="FP32")
    axis.set_xlabel("p50 latency at batch 8, ONNX Runtime CPU (ms)")
    axis.set_ylabel("validation top-1")
    axis.set_ylim(-0.02, 1.05)
    axis.legend(fontsize=7, loc="lower right")  # one entry per recipe: labels on the points would overlap
    return _png(figure)


def redteam(redteam: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Block rates of every rail configuration (a column each): per red-team category when recorded, then all
    adversarial prompts, then benign prompts wrongly blocked (green is good in every row)."""
    configurations = list(redteam)
    categories = sorted({c for row in redteam.values() for c in row.get("by_category", {})})
    rows = [*categories, "all adversarial", "false positives (benign)"]
    grid = [[float(redteam[name].get("by_category", {}).get(c, math.nan)) for name in configurations] for c in categories]
    grid.append([float(redteam[name].get("block_rate", math.nan)) for name in configurations])
    grid.append([float(redteam[name].get("false_positive_rate") or 0.0) for name in configurations])
    goodness = [[1 - v for v in row] if i == len(rows) - 1 else row for i, row in enumerate(grid)]
    figure = _figure(1.1 * len(configurations) + 3, 0.32 * len(rows) + 1.2)
    axis = figure.add_subplot()
    axis.imshow(goodness, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(configurations)), configurations, fontsize=8)
    axis.xaxis.tick_top()
    axis.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            axis.text(j, i, "—" if math.isnan(value) else f"{value:.0%}", ha="center", va="center", fontsize=8)
    axis.axhline(len(categories) - 0.5, color="white", lw=2)
    return _png(figure)


def compare_bars(labels: Sequence[str], values_a: Sequence[float | None], values_b: Sequence[float | None],
                 names: tuple[str, str], xlabel: str, log: bool = False) -> bytes:
    """Two runs' values side by side per row (latency, top-1, seconds per notebook) for ``report --compare``."""
    import numpy as np

    figure = _figure(7, 0.55 * len(labels) + 1.2)
    axis = figure.add_subplot()
    y = np.arange(len(labels))[::-1]
    for offset, values, name in ((0.2, values_a, names[0]), (-0.2, values_b, names[1])):
        numbers = [v or 0.0 for v in values]
        drawn = axis.barh(y + offset, numbers, height=0.38, label=name)
        axis.bar_label(drawn, labels=[f"{v:.3g}" if v else "" for v in numbers], fontsize=7, padding=2)
    axis.set_yticks(y, labels, fontsize=8)
    if log:
        axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.legend(fontsize=8)
    return _png(figure)
