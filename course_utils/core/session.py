"""The one call at the top of every notebook: load the config, seed, set threads, say where we are."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from course_utils.core.config import CourseConfig, load_config
from course_utils.core.environment import seed_everything, set_threads


def start(spec: str | Path | None = None, overrides: Mapping[str, Any] | None = None, quiet: bool = False) -> CourseConfig:
    """Load the course config, seed every RNG, set the thread count and create the workspace.

    Notebooks call ``start(SPEC, OVERRIDES)`` with their papermill parameters.
    """
    config = load_config(spec, overrides)
    config.workspace.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    set_threads(config.benchmark.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _inline_figures()
    if not quiet:
        print(f"spec {config.spec!r} · experiment {config.experiment!r} · workspace {config.workspace}")
    return config


def _inline_figures() -> None:
    """In a notebook, show the matplotlib Figures that ``course_utils.vision.plots`` returns as images."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell":
        shell.run_line_magic("matplotlib", "inline")
