"""Figures the notebooks show; each function returns a matplotlib Figure and never calls ``show``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from course_utils.data import load_rgb


def image_grid(paths: Sequence[Path], titles: Sequence[str], columns: int = 6, size: float = 2.0) -> Figure:
    """A grid of images with a title under each, e.g. samples of a dataset or misclassified images."""
    rows = max(1, math.ceil(len(paths) / columns))
    figure = Figure(figsize=(columns * size, rows * size * 1.1))
    for index, (path, title) in enumerate(zip(paths, titles)):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.imshow(load_rgb(Path(path)))
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    return figure


def bar_chart(values: dict[str, float], xlabel: str, title: str = "") -> Figure:
    """A horizontal bar chart of named values (thread timings, per-class accuracy, node counts…)."""
    figure = Figure(figsize=(6, 0.4 * len(values) + 1))
    axis = figure.add_subplot()
    axis.barh(list(values), list(values.values()))
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    figure.tight_layout()
    return figure
