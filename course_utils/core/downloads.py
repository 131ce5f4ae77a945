"""One way to fetch every external file: URL + hash, a progress bar, a cache, friendly failures.

pooch does the downloading, progress bar and hash check. The course adds two things pooch lacks:
trust-on-first-use hashes for files whose sha256 nobody published (the hash seen on the first
download is recorded and enforced afterwards), and torch.hub's file-name convention
(``name-<first 8 hex of sha256>.pth``) for checkpoints that publish only a hash prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from course_utils.core.atomic import write_text_atomic
from course_utils.core.errors import CourseError


class DownloadError(CourseError, RuntimeError):
    """A file that could not be fetched."""


class HashMismatchError(DownloadError):
    """A file whose content is not what its recorded or published hash says."""


@dataclass(frozen=True)
class RemoteFile:
    """An external file: where it lives and what its content must hash to."""

    url: str
    sha256: str | None = None
    sha256_prefix: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _recorded_hash(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def cached_path(remote: RemoteFile, cache_dir: Path, fname: str | None = None) -> Path | None:
    """The cached copy of ``remote`` if it is there and verifies, else None (nothing is fetched)."""
    path = cache_dir / (fname or remote.filename)
    if not path.exists():
        return None
    try:
        _verify(remote, path)
    except HashMismatchError:
        return None
    return path


def _verify(remote: RemoteFile, path: Path) -> None:
    actual = sha256_file(path)
    recorded = _recorded_hash(path)
    expected = remote.sha256 or (recorded.read_text().strip() if recorded.exists() else None)
    if expected and actual != expected:
        raise HashMismatchError(f"{path.name}: sha256 {actual[:12]}… does not match the expected {expected[:12]}….")
    if remote.sha256_prefix and not actual.startswith(remote.sha256_prefix):
        raise HashMismatchError(f"{path.name}: sha256 {actual[:12]}… does not start with {remote.sha256_prefix}.")


def fetch(remote: RemoteFile, cache_dir: Path, fname: str | None = None, online: bool = True) -> Path:
    """Return a verified local copy of ``remote``, downloading it into ``cache_dir`` when needed.

    Offline (``online=False``) only the cache is consulted. A file with neither a published
    sha256 nor a prefix gets its first download's hash recorded beside it, and is held to it.
    """
    import pooch

    fname = fname or remote.filename
    if (hit := cached_path(remote, cache_dir, fname)) is not None:
        return hit
    if not online:
        raise DownloadError(f"{fname} is not cached in {cache_dir} and the download server is unreachable.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    recorded = _recorded_hash(cache_dir / fname)
    known = remote.sha256 or (recorded.read_text().strip() if recorded.exists() else None)
    try:
        path = Path(pooch.retrieve(remote.url, known_hash=f"sha256:{known}" if known else None,
                                   fname=fname, path=cache_dir, progressbar=True))
    except ValueError as error:  # pooch reports a hash mismatch as ValueError
        raise HashMismatchError(f"{fname} does not match its recorded sha256: {error}") from None
    except Exception as error:  # noqa: BLE001 (requests, urllib3 and pooch raise many kinds)
        raise DownloadError(f"Could not download {remote.url}: {error.__class__.__name__}: {error}") from None
    try:
        _verify(remote, path)
    except HashMismatchError:
        path.unlink(missing_ok=True)
        raise
    if not known:
        write_text_atomic(recorded, sha256_file(path) + "\n")
    return path
