"""Caches sealed with a sidecar: ``<file>.json`` records what the file was made for and its sha256.

TensorRT's timing and calibration caches are opaque bytes that TensorRT happily reuses on the wrong
GPU, version, model or data. The course seals each one after a build and checks the seal before the
next, so a cache made elsewhere is rebuilt instead of silently misused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

from course_utils.core.atomic import write_json_atomic
from course_utils.core.downloads import sha256_file

CacheState = Literal["missing", "valid", "foreign", "unverified", "modified"]


def sidecar(path: Path) -> Path:
    """The metadata file beside ``path``."""
    return path.with_name(path.name + ".json")


def _plain(key: Any) -> dict[str, Any]:
    """A key (a dataclass or a mapping) as the plain dict the sidecar stores."""
    return asdict(key) if is_dataclass(key) and not isinstance(key, type) else dict(key)


def cache_state(path: Path, key: Any) -> CacheState:
    """``valid`` only when the sidecar records exactly ``key`` (a dataclass or mapping) and the file's hash.

    ``foreign``: made for another key; ``unverified``: no sidecar (copied in from elsewhere);
    ``modified``: changed since it was sealed; ``missing``: no file yet.
    """
    if not path.exists():
        return "missing"
    try:
        meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return "unverified"
    if meta.get("key") != json.loads(json.dumps(_plain(key), default=str)):
        return "foreign"
    return "valid" if meta.get("sha256") == sha256_file(path) else "modified"


def discard_unless_valid(path: Path, key: Any) -> CacheState:
    """Check a cache before a build; one that is not ``valid`` is deleted (with its sidecar)."""
    state = cache_state(path, key)
    if state not in ("valid", "missing"):
        path.unlink()
        sidecar(path).unlink(missing_ok=True)
    return state


def seal(path: Path, key: Any) -> None:
    """Record beside a freshly written cache what it was made for, and its hash."""
    write_json_atomic(sidecar(path), {"key": _plain(key), "sha256": sha256_file(path)})
