"""Serving the app as a standalone page with Voila (``serve-app``, ``make app``) and launching it in a notebook."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from typing_extensions import Self

from course_utils.app.catalog import AppError
from course_utils.app.widgets import NarrativeCanvasApp
from course_utils.core.config import CourseConfig

DEFAULT_PORT = 8866


# --- Serving the app as a page -------------------------------------------------------------------------------


def write_page(config: CourseConfig) -> Path:
    """Write the one-cell notebook Voila serves (``<workspace>/app/narrative_canvas.ipynb``) and return its path.

    It lives in the workspace, so the kernel's working folder holds no module that could shadow a library's.
    """
    from course_utils.core.atomic import write_json_atomic

    # Written as plain JSON: importing nbformat costs seconds (its schema validator compiles a grammar).
    cell: dict[str, object] = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": ["from course_utils.app.server import launch\n", "\n", "app = launch(stage=True)"]}
    notebook = {"nbformat": 4, "nbformat_minor": 4, "cells": [cell], "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}}}
    return write_json_atomic(config.workspace / "app" / "narrative_canvas.ipynb", notebook)


def serve_command(page: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> list[str]:
    """The Voila command line that serves ``page`` on ``host:port`` (loopback unless told otherwise)."""
    import sys

    return [sys.executable, "-m", "voila", str(page), "--no-browser", f"--port={port}", f"--Voila.ip={host}",
            "--Voila.port_retries=0", "--theme=light", "--VoilaConfiguration.show_tracebacks=False"]


def serve_environment(config: CourseConfig, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment that makes the page's kernel load the same config: spec, workspace, offline, overrides.

    Each dotted override key becomes ``COURSE_A__B__C`` (top-level ``seed``: ``COURSE_SEED``), its value
    encoded as ``load_config`` reads it back: text as it is, everything else (numbers, booleans, None,
    lists, mappings) as JSON.
    """
    import json
    import os

    environ = {**os.environ, "COURSE_SPEC": config.spec, "COURSE_WORKSPACE": str(config.workspace),
               "COURSE_OFFLINE": "true" if config.offline else "false"}
    for key, value in (overrides or {}).items():
        name = "COURSE_" + "__".join(part.upper() for part in key.split("."))
        environ[name] = str(value) if isinstance(value, (str, Path)) else json.dumps(value, default=str)
    return environ


# Headless Chromium flags that work in a container with no GPU and no network (tests and the benchmark).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class PageServer:
    """The app served by Voila in a child process group; ``start()`` waits until the page answers, ``stop()`` ends
    the server, its kernels and their LLM servers. A context manager; the URL is ``url``."""

    def __init__(self, config: CourseConfig, host: str = "127.0.0.1", port: int | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        from course_utils.genai.llm import free_port

        self.config, self.host, self.overrides = config, host, overrides
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}/"
        self.log_path = config.workspace / "app" / "voila.log"
        self.process: Any = None

    def start(self, timeout_s: float = 120.0) -> Self:
        """Launch Voila and wait until it accepts connections (the notebook runs when a browser opens the page)."""
        import socket
        import subprocess

        page = write_page(self.config)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(serve_command(page, self.host, self.port), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=serve_environment(self.config, self.overrides))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AppError(f"Voila exited with code {self.process.returncode}: read {self.log_path}.")
            try:
                with socket.create_connection((self.host, self.port), timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AppError(f"Voila did not answer on {self.url} within {timeout_s:.0f} s: read {self.log_path}.")

    def stop(self) -> None:
        """End Voila's process group (SIGTERM, then SIGKILL after 10 s)."""
        import os
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(spec: str | None = None, stage: bool = False) -> NarrativeCanvasApp:
    """Start the app in a notebook or a Voila page, with the config from ``spec`` or the environment.

    ``stage=True`` (the served page) fills the browser window; the page's Stage button toggles it.
    """
    from IPython.display import display

    from course_utils.core.config import load_config

    # Not session.start: it imports PyTorch to seed it, seconds the page would wait for. Nothing here needs a
    # seed (the story and the picture pass config.seed themselves), and PyTorch loads with the first model.
    config = load_config(spec)
    config.workspace.mkdir(parents=True, exist_ok=True)
    app = NarrativeCanvasApp(config, stage=stage)
    display(app)
    return app
