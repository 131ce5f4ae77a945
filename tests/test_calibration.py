"""Calibration data: the exact inference preprocessing, seeded nested selection, kOPT batches, cache keys."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from course_utils.deploy.calibration import (
    CalibrationCacheKey,
    CalibrationError,
    build_calibration_set,
    calibration_cache_path,
    calibration_cache_state,
    prepare_calibration_cache,
    seal_calibration_cache,
    select_calibration_samples,
)
from course_utils.vision.zoo import Preprocessing

PREPROCESSING = Preprocessing(input_size=32, resize_short=36)


def make_samples(folder: Path, per_class: int = 6, classes: int = 2) -> list[tuple[Path, int]]:
    """Small photos of different sizes and formats (one palette PNG with transparency), like a real folder."""
    rng = np.random.default_rng(0)
    samples = []
    for label in range(classes):
        for index in range(per_class):
            size = (40 + 7 * index, 30 + 5 * label)
            image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            path = folder / f"c{label}_{index}.{'jpg' if index % 3 else 'png'}"
            if index == 3:
                image = image.convert("P")
                image.info["transparency"] = 0
            image.save(path)
            samples.append((path, label))
    return samples


@pytest.fixture
def samples(tmp_path: Path) -> list[tuple[Path, int]]:
    return make_samples(tmp_path)


def test_calibration_tensors_equal_inference_tensors(samples: list[tuple[Path, int]]) -> None:
    from course_utils.deploy.runtimes import validation_arrays
    from course_utils.vision.finetune import ImageSamples

    transform = PREPROCESSING.eval_transform()
    calibration = build_calibration_set(samples, transform, None, batch_size=4, seed=1)
    evaluation = ImageSamples(list(calibration.samples), transform)  # what finetune.evaluate feeds the model
    benchmark, _ = validation_arrays(list(calibration.samples), transform)  # what the runtimes' top-1 feeds
    for index in range(len(calibration)):
        np.testing.assert_array_equal(calibration.images[index], evaluation[index][0].numpy())
    np.testing.assert_array_equal(calibration.images, benchmark)
    assert calibration.images.dtype == np.float32 and calibration.images.shape[1:] == (3, 32, 32)
    # The reference project's bug: calibrating with another resize method gives other tensors.
    from torchvision import transforms

    bicubic = transforms.Compose([transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC),
                                  *transform.transforms[1:]])
    other = build_calibration_set(samples, bicubic, None, batch_size=4, seed=1)
    assert not np.array_equal(other.images, calibration.images) and other.sha256 != calibration.sha256


def test_selection_is_seeded_nested_and_balanced(samples: list[tuple[Path, int]]) -> None:
    first = select_calibration_samples(samples, 8, seed=3)
    assert first == select_calibration_samples(list(reversed(samples)), 8, seed=3)  # order of the input is irrelevant
    assert first != select_calibration_samples(samples, 8, seed=4)
    assert select_calibration_samples(samples, 4, seed=3) == first[:4]
    assert Counter(label for _, label in first[:4]) == {0: 2, 1: 2}
    everything = select_calibration_samples(samples, None, seed=3)
    assert sorted(everything) == sorted(samples) and select_calibration_samples(samples, 99, seed=3) == everything


def test_batches_match_the_opt_batch(samples: list[tuple[Path, int]]) -> None:
    transform = PREPROCESSING.eval_transform()
    calibration = build_calibration_set(samples, transform, 11, batch_size=4, seed=0, input_name="x")
    assert len(calibration) == 8 and len(calibration.samples) == 8
    assert [b["x"].shape for b in calibration.batches()] == [(4, 3, 32, 32)] * 2
    smaller = calibration.head(5)
    assert len(smaller) == 4 and np.array_equal(smaller.images, calibration.images[:4])
    assert smaller.sha256 != calibration.sha256 and calibration.head(None) is calibration
    with pytest.raises(CalibrationError, match="batch_opt"):
        build_calibration_set(samples, transform, 3, batch_size=4, seed=0)
    reader = calibration.onnxruntime_reader()
    fed = [reader.get_next() for _ in range(3)]
    assert fed[2] is None and fed[0]["x"].shape == (4, 3, 32, 32)
    reader.set_range(1, 2)  # how quantize_static's CalibStridedMinMax feeds one batch at a time
    assert len(reader) == 2 and np.array_equal(reader.get_next()["x"], calibration.images[4:]) and not reader.get_next()


def key(**changes: object) -> CalibrationCacheKey:
    base = CalibrationCacheKey("ab" * 32, "entropy", "10.3.0", "cd" * 32, 42)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_every_part_of_the_key_names_its_own_cache(tmp_path: Path) -> None:
    variants = [key(), key(calibrator="minmax"), key(tensorrt="8.5.2"), key(model_sha256="ee" * 32),
                key(dataset_sha256="ff" * 32), key(seed=7)]
    paths = {calibration_cache_path(tmp_path, k) for k in variants}
    assert len(paths) == len(variants)
    assert "_entropy_" in key().filename and "_minmax_" in key(calibrator="minmax").filename
    with pytest.raises(CalibrationError, match="calibrator"):
        key(calibrator="legacy")


def test_a_cache_that_does_not_match_is_rebuilt_never_reused(tmp_path: Path) -> None:
    entropy, minmax = key(), key(calibrator="minmax")
    path = calibration_cache_path(tmp_path, entropy)
    assert calibration_cache_state(path, entropy) == "missing"
    path.write_bytes(b"TRT-8503-EntropyCalibration2\nimages: 3c010a14\n")
    assert prepare_calibration_cache(path, entropy) == "unverified" and not path.exists()
    path.write_bytes(b"TRT-8503-EntropyCalibration2\nimages: 3c010a14\n")
    seal_calibration_cache(path, entropy)
    assert prepare_calibration_cache(path, entropy) == "valid" and path.exists()
    # The reference project's bug: the min-max calibrator reading the entropy calibrator's cache.
    assert calibration_cache_state(path, minmax) == "foreign"
    for stale in (key(dataset_sha256="00" * 32), key(seed=1), key(tensorrt="10.13.0")):
        assert calibration_cache_state(path, stale) == "foreign"
    path.write_bytes(b"TRT-8503-EntropyCalibration2\nimages: 00000000\n")
    assert prepare_calibration_cache(path, entropy) == "modified" and not path.exists()
    assert not path.with_name(path.name + ".json").exists()
    with pytest.raises(CalibrationError, match="seal"):
        seal_calibration_cache(path, entropy)


def test_sidecar_records_the_key(tmp_path: Path) -> None:
    path = calibration_cache_path(tmp_path, key())
    path.write_bytes(b"cache")
    seal_calibration_cache(path, key())
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["key"] == {"model_sha256": "ab" * 32, "calibrator": "entropy", "tensorrt": "10.3.0",
                           "dataset_sha256": "cd" * 32, "seed": 42}
