import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from course_utils.core.config import CourseConfig
from course_utils.vision import data
from course_utils.vision.data import (
    DatasetError,
    DatasetIntegrityError,
    RemoteDataset,
    read_image_folder,
    resolve_dataset,
    sha256_file,
    verify_manifest,
)


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (32, 24), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    image.save(path, format=fmt)
    return path


def _tree(root: Path, classes: tuple[str, ...] = ("ants", "bees"), per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for name in classes:
            for index in range(per_class):
                _save(root / split / name / f"{name}{index}.jpg")
    return root


def test_odd_images_are_converted_and_bad_ones_skipped(tmp_path: Path) -> None:
    root = _tree(tmp_path / "set")
    ants = root / "train" / "ants"
    _save(ants / "grey.png", "L")
    _save(ants / "alpha.png", "RGBA")
    _save(ants / "palette.gif", "P")
    _save(ants / "cmyk.jpg", "CMYK")
    _save(ants / "sixteen.png", "I;16")
    (ants / "empty.jpg").write_bytes(b"")
    (ants / "notes.jpg").write_text("not an image")
    truncated = ants / "truncated.jpg"
    _save(truncated, size=(256, 256))
    truncated.write_bytes(truncated.read_bytes()[:300])
    (ants / "readme.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning, match="Skipped 3"):
        dataset = read_image_folder(root)
    reasons = {s.path.name: s.reason for s in dataset.skipped}
    assert set(reasons) == {"empty.jpg", "notes.jpg", "truncated.jpg"}
    assert "0 bytes" in reasons["empty.jpg"]
    assert dataset.counts()["train"] == {"ants": 8, "bees": 3}
    conversions = {c.path.name: c.conversion for c in dataset.converted}
    assert set(conversions) == {"grey.png", "alpha.png", "palette.gif", "cmyk.jpg", "sixteen.png"}
    assert "CMYK" in conversions["cmyk.jpg"] and "16-bit" in conversions["sixteen.png"]
    assert dataset.summary()["converted"] == 5 and dataset.summary()["skipped"] == 3
    for name in conversions:
        assert data.load_rgb(ants / name).mode == "RGB"


def _png16_rgb(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow reads these but cannot write them)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_cmyk_and_16_bit_images_are_converted_not_skipped(tmp_path: Path) -> None:
    root = _tree(tmp_path / "set")
    bees = root / "train" / "bees"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(bees / "cmyk.jpg", quality=95)  # pure red in CMYK
    gradient = np.linspace(0, 65535, 257).round().astype(np.uint16)  # 0, 255.9..., 32768 (index 128), ..., 65535
    Image.fromarray(np.tile(gradient, (4, 1))).save(bees / "grey16.png")
    _png16_rgb(bees / "rgb16.png", np.stack([np.tile(gradient, (4, 1))] * 3, axis=-1))
    with Image.open(bees / "grey16.png") as opened:
        assert opened.mode in data.SIXTEEN_BIT_GREY_MODES
    dataset = read_image_folder(root)
    assert dataset.skipped == []
    conversions = {c.path.name: c.conversion for c in dataset.converted}
    assert set(conversions) == {"cmyk.jpg", "grey16.png", "rgb16.png"}
    assert "CMYK" in conversions["cmyk.jpg"] and "16-bit" in conversions["grey16.png"] + conversions["rgb16.png"]
    assert dataset.counts()["train"]["bees"] == 6
    red = np.asarray(data.load_rgb(bees / "cmyk.jpg"))
    assert red.dtype == np.uint8 and red.shape == (8, 16, 3)
    assert red[..., 0].min() > 240 and red[..., 1:].max() < 15
    for name in ("grey16.png", "rgb16.png"):
        pixels = np.asarray(data.load_rgb(bees / name))
        assert pixels.dtype == np.uint8 and pixels.shape == (4, 257, 3), name
        assert pixels.max() == 255 and pixels[0, -1].tolist() == [255, 255, 255], name  # scaled, not clipped
        assert pixels[0, 0].tolist() == [0, 0, 0] and abs(int(pixels[0, 128, 0]) - 128) <= 1, name
        assert abs(int(pixels[0, 64, 0]) - 64) <= 1, name  # a quarter of the range is a quarter of 255


def test_pixels_pillow_cannot_make_8_bit_stay_skipped_with_a_reason(tmp_path: Path) -> None:
    root = _tree(tmp_path / "set")
    ants = root / "train" / "ants"
    Image.fromarray(np.full((4, 4), 100_000, dtype=np.int32)).save(ants / "wide.tif")
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(ants / "float.tif")
    with pytest.warns(UserWarning, match="Skipped 2"):
        dataset = read_image_folder(root)
    reasons = {s.path.name: s.reason for s in dataset.skipped}
    assert "outside 0..65535" in reasons["wide.tif"] and "pixel mode F" in reasons["float.tif"]


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert data.load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("breakage, message", [
    (lambda r: shutil.rmtree(r / "val" / "bees") or (r / "val" / "wasps").mkdir(), "only in train"),
    (lambda r: [p.unlink() for p in (r / "train" / "bees").iterdir()], "no usable images"),
    (lambda r: shutil.rmtree(r / "val"), "not \\['val'\\]"),
    (lambda r: [shutil.rmtree(d) for d in (r / "train").iterdir()], "No class folders"),
])
def test_wrong_layouts_get_clear_errors(tmp_path: Path, breakage, message: str) -> None:
    root = _tree(tmp_path / "set")
    breakage(root)
    with pytest.raises(DatasetError, match=message):
        read_image_folder(root)


def test_class_folders_without_splits_are_split_stably(tmp_path: Path) -> None:
    for name in ("cats", "dogs"):
        for index in range(30):
            _save(tmp_path / name / f"{name}{index}.jpg", size=(8, 8))
    first = read_image_folder(tmp_path)
    assert first.classes == ["cats", "dogs"]
    assert 0 < len(first.samples["val"]) < len(first.samples["train"])
    assert first.samples == read_image_folder(tmp_path).samples
    train = {p for p, _ in first.samples["train"]}
    assert not train & {p for p, _ in first.samples["val"]}


def test_manifest_catches_a_changed_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "hymenoptera_data")
    files = sorted(p for p in root.rglob("*.jpg"))
    manifest = tmp_path / "hymenoptera_data.sha256"
    manifest.write_text("".join(f"{sha256_file(p)}  {p.relative_to(tmp_path)}\n" for p in files))
    assert verify_manifest(manifest, tmp_path) == len(files)
    files[0].write_bytes(files[0].read_bytes() + b"x")
    files[1].unlink()
    with pytest.raises(DatasetIntegrityError, match="2 of 12 files") as error:
        verify_manifest(manifest, tmp_path)
    assert "sha256 differs" in str(error.value) and "missing" in str(error.value)


def test_preseeded_cache_is_used_and_verified(tmp_path: Path, config: CourseConfig) -> None:
    cache = tmp_path / "cache"
    _tree(cache / "hymenoptera_data")
    files = sorted((cache / "hymenoptera_data").rglob("*.jpg"))
    (cache / "hymenoptera_data.sha256").write_text(
        "".join(f"{sha256_file(p)}  {p.relative_to(cache)}\n" for p in files))
    config.data_cache = cache
    dataset = resolve_dataset(config, online=False)
    assert dataset.name == "hymenoptera" and "12 files verified" in dataset.source
    files[0].write_bytes(b"tampered")
    with pytest.raises(DatasetIntegrityError):
        resolve_dataset(config, online=False)


def test_offline_without_cache_falls_back_loudly(config: CourseConfig) -> None:
    with pytest.warns(UserWarning, match="Falling back"):
        dataset = resolve_dataset(config, online=False)
    assert dataset.name == "package-textures"
    assert "unreachable" in (dataset.fallback_reason or "")
    config.dataset.offline_fallback = None
    with pytest.raises(DatasetError, match="unreachable"):
        resolve_dataset(config, online=False)


def test_package_textures_has_no_leakage_and_is_reused(config: CourseConfig) -> None:
    config.dataset.name = "package-textures"
    config.dataset.max_images_per_class = None
    dataset = resolve_dataset(config)
    assert dataset.classes == ["brick", "grass", "gravel", "stars", "tissue"]
    assert dataset.counts()["train"] == {name: 40 for name in dataset.classes}
    assert dataset.counts()["val"] == {name: 16 for name in dataset.classes}
    hashes = {split: {sha256_file(p) for p, _ in items} for split, items in dataset.samples.items()}
    assert not hashes["train"] & hashes["val"]
    marker = dataset.root / "built.json"
    stamp = marker.stat().st_mtime_ns
    resolve_dataset(config)
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt
    config.seed += 1
    resolve_dataset(config)
    assert marker.stat().st_mtime_ns != stamp  # another seed: rebuilt


def test_unknown_dataset_name_suggests(config: CourseConfig) -> None:
    config.dataset.name = "hymenoptra"
    with pytest.raises(DatasetError, match="Did you mean hymenoptera"):
        resolve_dataset(config, online=False)


def test_download_records_its_hash_and_catches_a_changed_archive(
    http_root: tuple[Path, str], config: CourseConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served, base_url = http_root
    tree = _tree(tmp_path / "src" / "tiny_data")
    with zipfile.ZipFile(served / "tiny.zip", "w") as archive:
        for path in tree.rglob("*.jpg"):
            archive.write(path, path.relative_to(tree.parent))
    spec = RemoteDataset(name="tiny", url=f"{base_url}/tiny.zip", folder="tiny_data", classes=("ants", "bees"))
    monkeypatch.setitem(data.DATASETS, "tiny", spec)
    config.dataset.name = "tiny"
    dataset = resolve_dataset(config, online=True)
    assert dataset.source.startswith("downloaded") and dataset.counts()["val"] == {"ants": 3, "bees": 3}
    cache = config.workspace / "cache" / "data"
    assert (cache / "tiny.zip.sha256").read_text().strip() == sha256_file(served / "tiny.zip")
    assert resolve_dataset(config, online=False).source.startswith("download cache")
    # A damaged local archive is fetched again and checked against the recorded hash.
    shutil.rmtree(cache / "tiny")
    (cache / "tiny.zip").write_bytes(b"damaged")
    assert resolve_dataset(config, online=True).counts()["val"] == {"ants": 3, "bees": 3}
    # The server now serves other bytes under the same URL: refused, nothing extracted.
    shutil.rmtree(cache / "tiny")
    (cache / "tiny.zip").unlink()
    (served / "tiny.zip").write_bytes(b"different bytes")
    with pytest.raises(DatasetIntegrityError, match="recorded sha256"):
        resolve_dataset(config, online=True)
    assert not (cache / "tiny").exists()
