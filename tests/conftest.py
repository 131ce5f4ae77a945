"""Shared fixtures: a throwaway config per unit test; notebook tests run last, in course order."""

from __future__ import annotations

from pathlib import Path

import pytest

from course_utils.config import CourseConfig, load_config


@pytest.fixture
def config(tmp_path: Path) -> CourseConfig:
    """The smoke spec with a fresh workspace and no pre-seeded data cache."""
    return load_config("smoke", {"workspace": str(tmp_path / "workspace")}, environ={})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first (they fail fast), then the notebooks in course order."""
    items.sort(key=lambda item: item.get_closest_marker("notebook") is not None)
