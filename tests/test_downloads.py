from pathlib import Path

import pytest

from course_utils.core.downloads import (
    DownloadError,
    HashMismatchError,
    RemoteFile,
    cached_path,
    fetch,
    sha256_file,
)


def test_offline_without_cache_says_so(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not cached"):
        fetch(RemoteFile("https://example.invalid/w.pth"), tmp_path, online=False)


def test_cache_hits_are_verified(tmp_path: Path) -> None:
    path = tmp_path / "w-1234abcd.pth"
    path.write_bytes(b"weights")
    digest = sha256_file(path)
    assert cached_path(RemoteFile("https://x/w-1234abcd.pth", sha256=digest), tmp_path) == path
    assert cached_path(RemoteFile("https://x/w-1234abcd.pth", sha256="0" * 64), tmp_path) is None
    assert cached_path(RemoteFile("https://x/w-1234abcd.pth", sha256_prefix=digest[:8]), tmp_path) == path
    assert cached_path(RemoteFile("https://x/w-1234abcd.pth", sha256_prefix="deadbeef"), tmp_path) is None


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="Could not download"):
        fetch(RemoteFile("http://127.0.0.1:9/w.pth"), tmp_path)


def test_downloads_check_the_published_prefix(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    served, url = http_root
    (served / "w-00000000.pth").write_bytes(b"weights")
    with pytest.raises(HashMismatchError, match="does not start with 00000000"):
        fetch(RemoteFile(f"{url}/w-00000000.pth", sha256_prefix="00000000"), tmp_path)
    assert not (tmp_path / "w-00000000.pth").exists()
    digest = sha256_file(served / "w-00000000.pth")
    got = fetch(RemoteFile(f"{url}/w-00000000.pth", sha256_prefix=digest[:8]), tmp_path / "ok")
    assert got.read_bytes() == b"weights"
