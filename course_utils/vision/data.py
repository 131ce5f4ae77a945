"""Datasets: a registry of named datasets, their download cache, and a careful ImageFolder reader.

A dataset is an ImageFolder tree: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg``.
Where a dataset comes from, in order: a user's folder path; the read-only pre-seeded cache named by
``COURSE_DATA_CACHE`` (verified file by file against its ``.sha256`` manifest); the workspace's
download cache; a download (progress bar, hash check); and, offline, the dataset's named fallback
(``package-textures``, built from images that ship inside installed packages).
"""

from __future__ import annotations

import json
import shutil
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from course_utils.core.atomic import atomic_directory, write_text_atomic
from course_utils.core.config import CourseConfig
from course_utils.core.downloads import DownloadError, HashMismatchError, RemoteFile, fetch, sha256_file
from course_utils.core.errors import CourseError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SIXTEEN_BIT_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # how Pillow opens 16-bit greyscale PNG/TIFF
CONVERSIONS = {  # pixel modes load_rgb turns into 8-bit RGB, and what it does (reported in dataset.converted)
    "L": "greyscale converted to RGB",
    "LA": "greyscale with transparency composited on white",
    "RGBA": "transparency composited on white",
    "P": "palette expanded to RGB",
    "PA": "palette with transparency composited on white",
    "1": "black-and-white converted to RGB",
    "CMYK": "CMYK converted to RGB",
    **{mode: f"16-bit greyscale ({mode}) scaled to 8-bit RGB" for mode in SIXTEEN_BIT_GREY_MODES},
}
CONVERTIBLE_MODES = {"RGB", *CONVERSIONS}
SPLITS = ("train", "val")
AUTO_SPLIT_VAL_FRACTION = 0.2


class DatasetError(CourseError, ValueError):
    """A dataset that cannot be used as it is; the message says what to change."""


class DatasetIntegrityError(DatasetError):
    """Files whose content does not match the recorded sha256."""


@dataclass(frozen=True)
class RemoteDataset:
    """A dataset downloaded once from ``url`` as a zip holding ``folder``.

    ``sha256`` is the archive's hash when it is known; when it is not, the hash seen on the
    first download is recorded beside the archive and every later use is checked against it.
    """

    name: str
    url: str
    folder: str
    classes: tuple[str, ...]
    sha256: str | None = None
    description: str = ""


@dataclass(frozen=True)
class BuiltDataset:
    """A dataset the course builds itself, offline, from files that ship inside installed packages."""

    name: str
    classes: tuple[str, ...]
    builder: Callable[[Path, int], None]
    version: int
    description: str = ""


@dataclass
class SkippedFile:
    path: Path
    reason: str


@dataclass
class ConvertedFile:
    path: Path
    conversion: str


@dataclass
class ImageFolderDataset:
    """A checked ImageFolder: the usable samples of each split, what was skipped and why, what was converted."""

    root: Path
    name: str
    source: str
    classes: list[str]
    samples: dict[str, list[tuple[Path, int]]]
    skipped: list[SkippedFile] = field(default_factory=list)
    fallback_reason: str | None = None
    converted: list[ConvertedFile] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split."""
        return {
            split: {self.classes[i]: n for i, n in sorted(Counter(label for _, label in items).items())}
            for split, items in self.samples.items()
        }

    def summary(self) -> dict[str, object]:
        """What the ledger records about the dataset."""
        return {
            "name": self.name,
            "source": self.source,
            "root": str(self.root),
            "classes": self.classes,
            "counts": self.counts(),
            "skipped": len(self.skipped),
            "converted": len(self.converted),
            "fallback_reason": self.fallback_reason,
        }


def verify_manifest(manifest: Path, base: Path) -> int:
    """Check every ``<sha256>  <relative path>`` line of ``manifest`` against files under ``base``.

    Returns the number of files checked; raises ``DatasetIntegrityError`` naming the bad files.
    """
    bad: list[str] = []
    checked = 0
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        expected, rel = line.split(maxsplit=1)
        path = base / rel.strip().lstrip("*")
        checked += 1
        if not path.exists():
            bad.append(f"{rel} (missing)")
        elif sha256_file(path) != expected:
            bad.append(f"{rel} (sha256 differs)")
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetIntegrityError(
            f"{len(bad)} of {checked} files under {base} do not match {manifest.name}:\n  {shown}\n"
            "Restore them from the original source, or point COURSE_DATA_CACHE elsewhere."
        )
    return checked


def _sixteen_bit_colour(image: Image.Image) -> bool:
    """True for a 16-bit-per-channel colour file, which Pillow reads as 8-bit RGB/RGBA (before ``load()``)."""
    tile = getattr(image, "tile", None)  # files only (ImageFile), emptied by load()
    if image.mode not in {"RGB", "RGBA"} or not tile:
        return False
    args = tile[0][3]
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    return ";16" in str(rawmode)


def inspect_image(path: Path) -> tuple[str | None, str | None]:
    """``(why path cannot be used, None)``, or ``(None, what load_rgb converts)`` (None when it is 8-bit RGB)."""
    if path.stat().st_size == 0:
        return "empty file (0 bytes)", None
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in CONVERTIBLE_MODES:
                return f"unsupported pixel mode {mode} (save it as 8- or 16-bit RGB or greyscale)", None
            conversion = CONVERSIONS.get(mode)
            if _sixteen_bit_colour(image):
                conversion = f"16-bit {mode} scaled to 8-bit" + (", transparency composited on white"
                                                                 if mode == "RGBA" else "")
            image.draft("RGB", (64, 64))
            image.load()
            if mode == "I" and not 0 <= np.asarray(image).min() <= np.asarray(image).max() <= 65535:
                return "32-bit integer pixels outside 0..65535 (save it as 8- or 16-bit)", None
    except UnidentifiedImageError:
        return "not an image PIL can read", None
    except (OSError, SyntaxError, ValueError) as error:
        return f"corrupt or truncated image ({error})", None
    return None, conversion


def _scale_to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit greyscale as 8-bit ``L``: 0..65535 maps onto 0..255 (divided by 257, rounded), not clipped at 255."""
    pixels = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
    return Image.fromarray(np.rint(pixels / 257).astype(np.uint8))


def load_rgb(source: str | Path | BinaryIO) -> Image.Image:
    """Open an image (a path, or a binary file object such as an upload's ``BytesIO``) as 8-bit RGB.

    Transparency is composited on white, palettes are expanded, CMYK is converted and 16-bit greyscale
    is scaled to 8 bits: training, evaluation and the app all see the same pixels.
    """
    with Image.open(source) as image:
        if image.mode in SIXTEEN_BIT_GREY_MODES:
            return _scale_to_8_bits(image).convert("RGB")
        if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _in_val(path: Path) -> bool:
    # A stable, content-independent split: the same file always lands in the same split.
    return zlib.crc32(path.name.encode()) % 100 < AUTO_SPLIT_VAL_FRACTION * 100


def read_image_folder(
    root: str | Path,
    name: str | None = None,
    source: str = "user folder",
    max_images_per_class: int | None = None,
) -> ImageFolderDataset:
    """Scan an ImageFolder tree, skip unusable files (reported), and check the layout.

    ``root`` holds ``train/`` and ``val/`` with one folder per class; a root that holds class
    folders directly is split 80/20 by a stable hash of each file name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist.")
    has_splits = all((root / split).is_dir() for split in SPLITS)
    if not has_splits and any((root / split).is_dir() for split in SPLITS):
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        raise DatasetError(f"{root} has a split folder but not {missing}: give it both train/ and val/.")
    layout = {split: _class_dirs(root / split) for split in SPLITS} if has_splits else {"all": _class_dirs(root)}
    for split, dirs in layout.items():
        if not dirs:
            where = root / split if has_splits else root
            raise DatasetError(
                f"No class folders in {where}. Expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg "
                "(or class folders directly under the root, which the course splits 80/20)."
            )
    if has_splits:
        train_names = [d.name for d in layout["train"]]
        val_names = [d.name for d in layout["val"]]
        if train_names != val_names:
            raise DatasetError(
                f"train and val class folders differ in {root}: only in train {sorted(set(train_names) - set(val_names))}, "
                f"only in val {sorted(set(val_names) - set(train_names))}. Give both splits the same class folders."
            )
    classes = [d.name for d in next(iter(layout.values()))]
    samples: dict[str, list[tuple[Path, int]]] = {split: [] for split in SPLITS}
    skipped: list[SkippedFile] = []
    converted: list[ConvertedFile] = []
    for split, dirs in layout.items():
        for label, class_dir in enumerate(dirs):
            usable = []
            for path in _image_files(class_dir):
                reason, conversion = inspect_image(path)
                if reason:
                    skipped.append(SkippedFile(path, reason))
                else:
                    usable.append(path)
                    if conversion:
                        converted.append(ConvertedFile(path, conversion))
            if not usable:
                raise DatasetError(f"Class folder {class_dir} has no usable images: add some, or remove the folder.")
            if split == "all":
                parts = {"train": [p for p in usable if not _in_val(p)], "val": [p for p in usable if _in_val(p)]}
            else:
                parts = {split: usable}
            for part, paths in parts.items():
                samples[part].extend((p, label) for p in paths[:max_images_per_class])
    for split in SPLITS:
        present = {label for _, label in samples[split]}
        if len(present) != len(classes):
            empty = [c for i, c in enumerate(classes) if i not in present]
            raise DatasetError(f"The {split} split has no images of {empty}: add images to those classes.")
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} unusable file(s) in {root}; see dataset.skipped.", stacklevel=2)
    return ImageFolderDataset(root=root, name=name or root.name, source=source, classes=classes,
                              samples=samples, skipped=skipped, converted=converted)


def dev_split(dataset: ImageFolderDataset, fraction: float = 0.2, seed: int = 0) -> ImageFolderDataset:
    """The training images split in two: ``train`` keeps most, ``val`` is a *dev* part to tune on.

    The dev part holds ``fraction`` of each class's training images (at least one, and at least one is left
    to train on), drawn with a generator seeded by ``seed``: the same split every run. Choosing settings
    on it leaves the real validation split untouched for the figures the course reports.
    """
    rng = np.random.default_rng(seed)
    train: list[tuple[Path, int]] = []
    dev: list[tuple[Path, int]] = []
    for label in range(len(dataset.classes)):
        items = sorted(item for item in dataset.samples["train"] if item[1] == label)
        if len(items) < 2:
            raise DatasetError(f"Class {dataset.classes[label]!r} has {len(items)} training image(s): a dev split "
                               "needs at least 2 per class. Add images or skip the dev split.")
        chosen = set(rng.permutation(len(items))[:min(len(items) - 1, max(1, round(fraction * len(items))))])
        dev += [item for index, item in enumerate(items) if index in chosen]
        train += [item for index, item in enumerate(items) if index not in chosen]
    return ImageFolderDataset(root=dataset.root, name=f"{dataset.name} (dev split)",
                              source=f"{dataset.source}; {fraction:.0%} of train held out as dev (seed {seed})",
                              classes=dataset.classes, samples={"train": train, "val": dev})


def _download_remote(spec: RemoteDataset, cache: Path) -> Path:
    try:
        archive = fetch(RemoteFile(spec.url, spec.sha256), cache, fname=f"{spec.name}.zip")
    except HashMismatchError as error:
        raise DatasetIntegrityError(f"{error} Delete {cache} to fetch it afresh.") from None
    except DownloadError as error:
        raise DatasetError(str(error)) from None
    target = cache / spec.name
    if not (target / spec.folder).is_dir():
        with atomic_directory(target) as tmp:  # filled beside target, then swapped in: never half-unpacked
            shutil.unpack_archive(archive, tmp)
    return target / spec.folder


def _locate_remote(spec: RemoteDataset, config: CourseConfig, online: bool) -> tuple[Path, str]:
    if config.data_cache is not None:
        seeded = config.data_cache / spec.folder
        manifest = config.data_cache / f"{spec.folder}.sha256"
        if seeded.is_dir():
            if manifest.exists():
                checked = verify_manifest(manifest, config.data_cache)
                return seeded, f"pre-seeded cache {config.data_cache} ({checked} files verified by sha256)"
            return seeded, f"pre-seeded cache {config.data_cache} (no manifest to verify against)"
    downloaded = config.workspace / "cache" / "data" / spec.name / spec.folder
    if downloaded.is_dir():
        return downloaded, f"download cache {downloaded.parent}"
    if not online:
        raise DatasetError(f"{spec.name} is not cached and the download server is unreachable.")
    return _download_remote(spec, config.workspace / "cache" / "data"), f"downloaded from {spec.url}"


def _build_local(spec: BuiltDataset, config: CourseConfig) -> Path:
    target = config.workspace / "data" / spec.name
    stamp = {"builder": spec.name, "version": spec.version, "seed": config.seed}
    marker = target / "built.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return target
    with atomic_directory(target) as tmp:  # filled beside target, then swapped in: never half-built
        spec.builder(tmp, config.seed)
        write_text_atomic(tmp / "built.json", json.dumps(stamp))
    return target


def _texture_sources() -> dict[str, np.ndarray]:
    from skimage import data as skdata

    return {
        "brick": skdata.brick(),
        "grass": skdata.grass(),
        "gravel": skdata.gravel(),
        "stars": skdata.hubble_deep_field(),
        "tissue": skdata.immunohistochemistry(),
    }


def build_package_textures(out: Path, seed: int, train_per_class: int = 40, val_per_class: int = 16) -> None:
    """Build the offline ``package-textures`` dataset from scikit-image's sample photos.

    Five classes, one source photo each. Train crops come from the top 65% of each photo and
    val crops from the bottom 25%, with a 10% band between them unused, so no pixel of a val
    image was ever seen in training (crops of one photo would otherwise leak across splits).
    """
    rng = np.random.default_rng(seed)
    for name, pixels in _texture_sources().items():
        image = Image.fromarray(pixels).convert("RGB")
        width, height = image.size
        regions = {"train": (0, int(0.65 * height), train_per_class), "val": (int(0.75 * height), height, val_per_class)}
        for split, (top, bottom, count) in regions.items():
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                side = int(rng.integers(int(0.18 * height), min(bottom - top, int(0.3 * height)) + 1))
                x = int(rng.integers(0, width - side + 1))
                y = int(rng.integers(top, bottom - side + 1))
                crop = image.crop((x, y, x + side, y + side)).resize((160, 160), Image.Resampling.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{name}_{index:03d}.jpg", quality=92)


DATASETS: dict[str, RemoteDataset | BuiltDataset] = {
    "hymenoptera": RemoteDataset(
        name="hymenoptera",
        url="https://download.pytorch.org/tutorial/hymenoptera_data.zip",
        folder="hymenoptera_data",
        classes=("ants", "bees"),
        description="Ants vs bees, ~245 train / 153 val photos: the PyTorch transfer-learning tutorial set.",
    ),
    "package-textures": BuiltDataset(
        name="package-textures",
        classes=("brick", "grass", "gravel", "stars", "tissue"),
        builder=build_package_textures,
        version=1,
        description="5 texture classes cropped from scikit-image's sample photos; train and val from "
        "disjoint bands of each photo. Builds offline anywhere.",
    ),
}


def resolve_dataset(config: CourseConfig, online: bool | None = None) -> ImageFolderDataset:
    """The dataset the config names, from wherever it can be had; offline, its fallback, said loudly."""
    from course_utils.core.environment import check_online

    name = config.dataset.name
    limit = config.dataset.max_images_per_class
    if name not in DATASETS:
        if Path(name).expanduser().exists():
            return read_image_folder(name, source="user folder", max_images_per_class=limit)
        import difflib

        hint = difflib.get_close_matches(name, list(DATASETS), n=2)
        raise DatasetError(
            f"Unknown dataset {name!r}: not a registry name ({', '.join(DATASETS)}) and not an existing folder."
            + (f" Did you mean {', '.join(hint)}?" if hint else "")
        )
    spec = DATASETS[name]
    if isinstance(spec, BuiltDataset):
        root = _build_local(spec, config)
        return read_image_folder(root, spec.name, "built offline from package images", limit)
    if online is None:
        online = check_online(offline=config.offline)[0]
    try:
        root, source = _locate_remote(spec, config, online)
    except DatasetError as error:
        fallback = config.dataset.offline_fallback
        if not fallback or isinstance(error, DatasetIntegrityError):
            raise
        warnings.warn(f"{error} Falling back to the offline dataset {fallback!r}.", stacklevel=2)
        dataset = resolve_dataset(config.model_copy(update={"dataset": config.dataset.model_copy(
            update={"name": fallback, "offline_fallback": None})}), online=False)
        dataset.fallback_reason = f"{name}: {error}"
        return dataset
    return read_image_folder(root, spec.name, source, limit)
