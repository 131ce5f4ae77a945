"""INT8 calibration data, and TensorRT calibration caches that are reused only for what made them.

Calibration shows a quantizer the activations the deployed model will see, so the data must be the
deployment domain (the fine-tuning set's *training* split: the validation split stays unseen) and it
must be preprocessed exactly as at inference: the same resize, crop and normalisation, through the
very transform that evaluation uses (``Preprocessing.eval_transform``). A calibration set made with
another resize method measures ranges of images the model never sees.

TensorRT's implicit INT8 calibrators run at the optimization profile's *opt* batch (kOPT), so every
calibration batch has exactly that size: the set is trimmed to a multiple of it. Every tool (ONNX
Runtime, ModelOpt, TensorRT, ModelOpt's PyTorch QAT) calibrates on the same ``CalibrationSet``.

A TensorRT calibration cache stores the activation ranges one calibrator measured for one model. Its
file name and a sidecar carry the model hash, the calibrator, the TensorRT version, the calibration
data's hash and the seed; a cache whose sidecar does not match is deleted and rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from course_utils.core.errors import CourseError
from course_utils.core.sealed_cache import CacheState, cache_state, discard_unless_valid, seal

LOG = logging.getLogger(__name__)
Sample = tuple[Path, int]
Calibrator = Literal["entropy", "minmax"]
CALIBRATORS: tuple[Calibrator, ...] = ("entropy", "minmax")


class CalibrationError(CourseError, ValueError):
    """Calibration data or a calibration cache that cannot be used; the message says what to change."""


def select_calibration_samples(samples: Sequence[Sample], count: int | None, seed: int) -> list[Sample]:
    """``count`` samples (all when None), seeded, taken from the classes in turn so each is represented.

    Each class's images are shuffled with ``seed``, then dealt round-robin: a smaller selection is
    always the start of a larger one, so a calibration-size ablation compares nested sets.
    """
    by_class: dict[int, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: (s[1], str(s[0]))):
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    for items in by_class.values():
        rng.shuffle(items)
    dealt = [items[i] for i in range(max(map(len, by_class.values()), default=0))
             for _, items in sorted(by_class.items()) if i < len(items)]
    return dealt if count is None else dealt[:count]


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """Preprocessed calibration images, in batches of the engine profile's opt batch."""

    samples: tuple[Sample, ...]
    images: np.ndarray  # (N, 3, H, W) float32, N a multiple of batch_size
    batch_size: int
    seed: int
    input_name: str = "images"

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def sha256(self) -> str:
        """The hash of the preprocessed tensors: it changes with the images, their order and the preprocessing."""
        digest = hashlib.sha256(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return digest.hexdigest()

    def batches(self) -> list[dict[str, np.ndarray]]:
        """``[{input_name: (batch_size, 3, H, W)}, ...]``: the feed format of Polygraphy's ``Calibrator``."""
        return [{self.input_name: self.images[i:i + self.batch_size]}
                for i in range(0, len(self.images), self.batch_size)]

    def head(self, count: int | None) -> CalibrationSet:
        """The first ``count`` images (trimmed to whole batches), a nested subset for ablations."""
        if count is None or count >= len(self.images):
            return self
        keep = _whole_batches(count, self.batch_size)
        return CalibrationSet(self.samples[:keep], self.images[:keep], self.batch_size, self.seed, self.input_name)

    def onnxruntime_reader(self) -> Any:
        """The batches as an ONNX Runtime ``CalibrationDataReader`` (for ``quantize_static``).

        It also has ``len`` and ``set_range`` (in batches), which ``quantize_static`` uses with the
        ``CalibStridedMinMax`` option to calibrate a few batches at a time.
        """
        from onnxruntime.quantization import CalibrationDataReader

        batches = self.batches()

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.set_range(0, len(batches))

            def __len__(self) -> int:
                return len(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._batches, None)

            def set_range(self, start_index: int, end_index: int) -> None:
                self._batches: Iterator[dict[str, np.ndarray]] = iter(batches[start_index:end_index])

        return Reader()


def _whole_batches(count: int, batch_size: int) -> int:
    if count < batch_size:
        raise CalibrationError(
            f"{count} calibration image(s) do not fill one batch of {batch_size} (engine.batch_opt): TensorRT "
            f"calibrates at the opt batch. Use quant.calibration_images >= {batch_size}, "
            "or a smaller engine.batch_opt.")
    return count // batch_size * batch_size


def build_calibration_set(samples: Sequence[Sample], transform: Callable[[Any], Any], count: int | None,
                          batch_size: int, seed: int, input_name: str = "images") -> CalibrationSet:
    """Select (seeded, classes in turn), preprocess with ``transform`` and batch the calibration images.

    Pass the *training* split and the model's ``preprocessing.eval_transform()``; ``batch_size`` is the
    calibration profile's opt batch (``config.engine.batch_opt`` with one profile). The set is trimmed to
    whole batches.
    """
    from course_utils.deploy.runtimes import (
        validation_arrays,  # the very preprocessing the benchmark's top-1 uses
    )

    chosen = select_calibration_samples(samples, count, seed)
    chosen = chosen[:_whole_batches(len(chosen), batch_size)]
    return CalibrationSet(tuple(chosen), validation_arrays(chosen, transform)[0], batch_size, seed, input_name)


@dataclass(frozen=True)
class CalibrationCacheKey:
    """What a TensorRT calibration cache is valid for: one model, calibrator, TensorRT, data set and seed."""

    model_sha256: str
    calibrator: Calibrator
    tensorrt: str
    dataset_sha256: str
    seed: int

    def __post_init__(self) -> None:
        if self.calibrator not in CALIBRATORS:
            raise CalibrationError(f"Unknown calibrator {self.calibrator!r}: choose one of {', '.join(CALIBRATORS)}.")

    @property
    def digest(self) -> str:
        """A short hash of every field."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def filename(self) -> str:
        """``<model>_<calibrator>_trt<version>_<digest>.calib``: each calibrator has its own file."""
        return f"{self.model_sha256[:12]}_{self.calibrator}_trt{self.tensorrt}_{self.digest}.calib"


def calibration_cache_path(folder: Path, key: CalibrationCacheKey) -> Path:
    """Where the cache for ``key`` lives in ``folder``."""
    return Path(folder) / key.filename


def calibration_cache_state(path: Path, key: CalibrationCacheKey) -> CacheState:
    """``valid`` only for a cache sealed for exactly this model, calibrator, TensorRT, data set and seed."""
    return cache_state(path, key)


def prepare_calibration_cache(path: Path, key: CalibrationCacheKey) -> CacheState:
    """Check the cache before a build; one that is not ``valid`` is deleted so the calibrator measures afresh."""
    state = discard_unless_valid(path, key)
    if state not in ("valid", "missing"):
        LOG.warning("calibration cache %s was %s for %s: deleted, so calibration runs again",
                    path.name, state, key.calibrator)
    return state


def seal_calibration_cache(path: Path, key: CalibrationCacheKey) -> None:
    """Record beside a cache the calibrator just wrote what it is valid for, and its hash."""
    if not path.exists():
        raise CalibrationError(f"No calibration cache at {path} to seal: did the INT8 build run its calibrator?")
    seal(path, key)

