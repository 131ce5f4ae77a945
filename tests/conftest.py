"""Shared fixtures: a throwaway config per unit test; notebook tests run last, in course order."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from course_utils.core.config import CourseConfig, load_config


@pytest.fixture
def config(tmp_path: Path) -> CourseConfig:
    """The smoke spec with a fresh workspace and no pre-seeded data cache."""
    return load_config("smoke", {"workspace": str(tmp_path / "workspace")}, environ={})


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over a temporary folder, for download tests."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first (they fail fast), then the notebooks in course order."""
    items.sort(key=lambda item: item.get_closest_marker("notebook") is not None)
