"""Figures the notebooks show; each function returns a matplotlib Figure and never calls ``show``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from course_utils.vision.data import load_rgb


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


def accuracy_vs_size(rows: Sequence[dict], size_key: str = "params", accuracy_key: str = "imagenet_top1",
                     label_key: str = "alias", xlabel: str = "parameters (millions)") -> Figure:
    """A labelled scatter of accuracy against model size (rows without both values are left out)."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.add_subplot()
    points = [r for r in rows if r.get(size_key) and r.get(accuracy_key) is not None]
    axis.scatter([r[size_key] / 1e6 for r in points], [r[accuracy_key] for r in points])
    for row in points:
        axis.annotate(str(row[label_key]), (row[size_key] / 1e6, row[accuracy_key]), fontsize=7,
                      xytext=(3, 2), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel(xlabel + ", log scale")
    axis.set_ylabel("top-1")
    figure.tight_layout()
    return figure


def top_k_panel(images: Sequence, predictions: Sequence[Sequence[tuple[str, float]]]) -> Figure:
    """Each image beside a bar chart of its top-k (label, probability) predictions."""
    figure = Figure(figsize=(8, 2.4 * len(images)))
    for row, (image, top) in enumerate(zip(images, predictions)):
        picture = figure.add_subplot(len(images), 2, 2 * row + 1)
        picture.imshow(image)
        picture.axis("off")
        bars = figure.add_subplot(len(images), 2, 2 * row + 2)
        labels = [label for label, _ in top][::-1]
        bars.barh(labels, [p for _, p in top][::-1])
        bars.set_xlim(0, 1)
        bars.set_xlabel("probability")
    figure.tight_layout()
    return figure


def training_curves(history: Sequence) -> Figure:
    """Loss and top-1 per epoch for train and validation, with the head/fine-tune phases shaded."""
    figure = Figure(figsize=(10, 3.5))
    loss, accuracy = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    epochs = [r.epoch + 1 for r in history]
    loss.plot(epochs, [r.train_loss for r in history], "o-", label="train")
    loss.plot(epochs, [r.val_loss for r in history], "o-", label="val")
    accuracy.plot(epochs, [r.train_top1 for r in history], "o-", label="train")
    accuracy.plot(epochs, [r.val_top1 for r in history], "o-", label="val")
    for axis, name in ((loss, "loss"), (accuracy, "top-1")):
        head_epochs = [r.epoch + 1 for r in history if r.phase == "head"]
        if head_epochs:
            axis.axvspan(0.5, max(head_epochs) + 0.5, alpha=0.1, label="head only")
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.legend()
    figure.tight_layout()
    return figure


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """A confusion matrix with counts in each cell (rows: true class, columns: predicted)."""
    figure = Figure(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    axis = figure.add_subplot()
    axis.imshow(confusion, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45)
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center")
    figure.tight_layout()
    return figure
