"""Atomic file and folder writes: a reader (or a rerun after a crash) sees the old one or the new one, never half."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The temporary file keeps ``target``'s suffix, so tools that infer the format from it
    (``torch.save``, ``onnx.save``, PIL) behave as they would with the real name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp makes it owner-only; give it the mode any new file gets here
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside ``target``; when the block succeeds it becomes ``target``.

    The old ``target`` (if any) is renamed aside, the new folder renamed into place, then the old copy
    removed. If the block raises, the old ``target`` is left untouched and the temporary folder is
    removed: no half-built folder survives, and a rerun starts clean.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only, like atomic_path's files
        old = tmp.with_name(f"{tmp.name}.old")  # unique too: tmp's name is
        had_old = os.path.lexists(target)
        if had_old:
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if had_old:
                os.replace(old, target)
            raise
        if had_old:
            _remove(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """This process's umask, read without setting it (``os.umask`` would change it, for a moment, in every thread)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return 0o022  # the usual default where /proc is missing
    return next((int(line.split()[1], 8) for line in status.splitlines() if line.startswith("Umask:")), 0o022)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json_atomic(target: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``target`` atomically and return the path."""
    return write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
