"""Rows of a benchmark table cached on disk, so a long sweep runs in chunks and resumes where it stopped.

Each row is stored with the key it was measured under (model, settings, tool versions, a digest of the code
that shapes it); a rerun reuses a row only when its key matches exactly, and measures the rest. The file is
rewritten atomically after every row, so an interrupted chunk loses at most the row it was measuring.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from course_utils.core.atomic import write_text_atomic


def source_digest(*paths: str | Path) -> str:
    """A short hash of source files: a row measured by other code is not reused."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


class RowCache:
    """A JSON Lines file of ``{"key": ..., "row": ...}`` records, one per measured row."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self._rows[self._id(record["key"])] = record

    @staticmethod
    def _id(key: dict[str, Any]) -> str:
        return json.dumps(key, sort_keys=True, default=str)

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The row measured under exactly ``key``, or None."""
        record = self._rows.get(self._id(key))
        return None if record is None else dict(record["row"])

    def put(self, key: dict[str, Any], row: dict[str, Any]) -> None:
        """Store ``row`` under ``key`` (replacing an older one) and rewrite the file atomically."""
        self._rows[self._id(key)] = {"key": key, "row": row}
        text = "".join(json.dumps(record, sort_keys=True, default=str) + "\n" for record in self._rows.values())
        write_text_atomic(self.path, text)
