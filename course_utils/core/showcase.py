"""What the report shows of the app's last run: the photos with their top-5, the story and its picture.

The app keeps these in memory only; ``keep_app_run`` writes small copies under ``<workspace>/app/last_run/``
and returns the plain figures the app's record keeps as ``metrics["last_run"]`` (paths relative to the
workspace, so the record names no machine path). The report reads them back with ``last_run_images``.
Images are anything with PIL's ``copy``/``thumbnail``/``save`` (this module imports no imaging library).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from course_utils.core.atomic import atomic_directory

LAST_RUN_DIR = Path("app") / "last_run"
THUMBNAIL_PX = 160
PICTURE_PX = 256


def _save_small(image: Any, path: Path, pixels: int) -> None:
    small = image.copy()
    small.thumbnail((pixels, pixels))
    small.save(path, format="PNG")


def keep_app_run(workspace: Path, photos: Sequence[tuple[str, Any]], predictions: Sequence[Sequence[tuple[str, float]]],
                 story: str, blocked: bool, picture: Any | None = None, picture_is_noise: bool = False,
                 max_photos: int = 4) -> dict[str, Any]:
    """Save the first ``max_photos`` photos (thumbnails), their top-5 and the picture; return the record's figures.

    ``photos`` are the app's (name, image) pairs and ``predictions`` their (label, probability) lists in the
    same order; ``picture_is_noise`` says the picture came from the random-weight stand-in pipeline.
    """
    kept = list(zip(photos, predictions))[:max_photos]
    with atomic_directory(workspace / LAST_RUN_DIR) as folder:  # a rerun replaces the whole last run
        for index, ((_, image), _) in enumerate(kept):
            _save_small(image, folder / f"photo_{index}.png", THUMBNAIL_PX)
        if picture is not None:
            _save_small(picture, folder / "picture.png", PICTURE_PX)
    run: dict[str, Any] = {
        "photos": [{"name": name, "image": (LAST_RUN_DIR / f"photo_{index}.png").as_posix(),
                    "top5": [[label, round(float(p), 4)] for label, p in top[:5]]}
                   for index, ((name, _), top) in enumerate(kept)],
        "story": story, "story_blocked": blocked,
    }
    if picture is not None:
        run |= {"picture": (LAST_RUN_DIR / "picture.png").as_posix(), "picture_is_noise": picture_is_noise}
    return run


def last_run_images(workspace: Path, run: dict[str, Any]) -> dict[str, bytes]:
    """The PNG bytes of every image ``run`` (a ``keep_app_run`` result) names that is still in ``workspace``."""
    names = [photo["image"] for photo in run.get("photos", [])] + ([run["picture"]] if run.get("picture") else [])
    root = workspace.resolve()
    found = {}
    for name in names:
        path = (root / name).resolve()
        if path.is_relative_to(root) and path.is_file():  # a record never makes the report read outside it
            found[name] = path.read_bytes()
    return found
