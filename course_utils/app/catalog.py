"""What the app can run on this machine: the classifiers, their runtimes, and classification itself."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from course_utils.core.config import CourseConfig

if TYPE_CHECKING:
    from PIL.Image import Image

    from course_utils.deploy.runtimes import Runner

LOG = logging.getLogger(__name__)
IMAGENET_MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
FINETUNED = "finetuned"


class AppError(RuntimeError):
    """Something the app's user can fix (too many images, a file that is no image, a missing artifact)."""


# --- What this machine can run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """A classifier the app offers: the course's fine-tuned model, or an ImageNet model that ships offline.

    ``classes`` names the fine-tuned model's outputs (empty for ImageNet models, which name their own).
    """

    key: str
    label: str
    backbone: str
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeChoice:
    """One way to run a model: ``pytorch``, ``onnxruntime`` or ``tensorrt`` at a precision, from an artifact."""

    key: str
    label: str
    runtime: str
    precision: str
    path: Path | None = None


def finetuned_path(config: CourseConfig) -> Path:
    """The fine-tuned checkpoint notebook 02 (or ``prepare-demo``) writes.

    The same path as ``finetune.models_dir(config) / "finetuned.pt"`` (a test holds them equal), spelled out
    here because importing ``finetune`` imports PyTorch, seconds the app's first page must not wait for.
    """
    return config.workspace / "models" / "finetuned.pt"


def _finetuned_header(path: Path) -> dict[str, Any]:
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    return {"backbone": payload["backbone"], "classes": list(payload["classes"])}


def _discover_models(config: CourseConfig) -> list[ModelChoice]:
    from course_utils.vision.zoo import entry, local_weights

    choices = []
    path = finetuned_path(config)
    if path.exists():
        header = _finetuned_header(path)
        classes = ", ".join(header["classes"][:4]) + (" …" if len(header["classes"]) > 4 else "")
        choices.append(ModelChoice(FINETUNED, f"{header['backbone']} fine-tuned ({classes})", header["backbone"],
                                   tuple(header["classes"])))
    cache = config.workspace / "cache"
    choices += [ModelChoice(name, f"{name} ImageNet (1000 classes)", name)
                for name in IMAGENET_MODELS if local_weights(entry(name), cache) is not None]
    return choices


def model_choices(config: CourseConfig) -> list[ModelChoice]:
    """The fine-tuned model when it exists, then the ImageNet models whose weights are on this machine.

    Finding them means importing PyTorch (seconds on a small CPU), so the answer is cached in
    ``<workspace>/app/models.json``, keyed by the fine-tuned checkpoint's size and time and the Python
    environment: a prepared demo starts without importing PyTorch at all.
    """
    from course_utils.core.atomic import write_json_atomic

    cached = _cached_model_choices(config)
    if cached is not None:
        return cached
    choices = _discover_models(config)
    write_json_atomic(_models_cache(config), {"key": _models_key(config), "choices": [vars(c) for c in choices]})
    return choices


def _models_cache(config: CourseConfig) -> Path:
    return config.workspace / "app" / "models.json"


def _models_key(config: CourseConfig) -> dict[str, Any]:
    import sys

    path = finetuned_path(config)
    stat = path.stat() if path.exists() else None
    return {"finetuned": [stat.st_size, stat.st_mtime_ns] if stat else None, "python": sys.prefix}


def _cached_model_choices(config: CourseConfig) -> list[ModelChoice] | None:
    import json

    cache = _models_cache(config)
    if not cache.exists():
        return None
    data = json.loads(cache.read_text(encoding="utf-8"))
    if data.get("key") != _models_key(config):
        return None
    return [ModelChoice(**{**item, "classes": tuple(item["classes"])}) for item in data["choices"]]


def _onnx_fp32_path(config: CourseConfig) -> Path | None:
    from course_utils.core.ledger import Ledger

    recorded = Ledger(config.workspace).stage("onnx").get("optimized_path")
    return Path(recorded) if recorded and Path(recorded).exists() else None


def runtime_choices(config: CourseConfig, model: ModelChoice) -> list[RuntimeChoice]:
    """PyTorch, then every runtime whose artifact the earlier stages left: ONNX FP32, INT8, TensorRT engines.

    Nothing is built here: a runtime without its artifact is simply not offered (``prepare-demo`` builds them).
    """
    choices = [RuntimeChoice("pytorch_fp32", "PyTorch FP32", "pytorch", "fp32")]
    if model.key != FINETUNED:
        return choices
    from course_utils.deploy.runtimes import ptq_cpu_model

    if (onnx := _onnx_fp32_path(config)) is not None:
        choices.append(RuntimeChoice("onnxruntime_fp32", "ONNX Runtime FP32", "onnxruntime", "fp32", onnx))
        choices += [RuntimeChoice(f"tensorrt_{precision}", f"TensorRT {precision.upper()}", "tensorrt", precision, path)
                    for precision, path in _engines(config, onnx).items()]
    if (int8 := ptq_cpu_model(config.workspace)) is not None:
        choices.append(RuntimeChoice("onnxruntime_int8", "ONNX Runtime INT8", "onnxruntime", "int8", int8))
    return sorted(choices, key=lambda c: ("pytorch", "onnxruntime", "tensorrt").index(c.runtime))


def _engines(config: CourseConfig, onnx: Path) -> dict[str, Path]:
    from course_utils.core.environment import tensorrt_version

    if tensorrt_version() is None:  # no TensorRT: no engine can run, so none is offered (and nothing is hashed)
        return {}
    from course_utils.core.ledger import Ledger
    from course_utils.deploy.tensorrt_engines import OnnxModel, built_engines

    stage = Ledger(config.workspace).stage("onnx")
    return built_engines(config, OnnxModel.from_path(onnx, stage.get("input_name", "images"),
                                                     stage.get("output_name", "logits"),
                                                     int(stage.get("input_size", 224))))


# --- Classification ------------------------------------------------------------------------------------------


@dataclass
class LoadedClassifier:
    """A runner with what it needs around it: class names, preprocessing, the largest batch it takes."""

    runner: Runner
    classes: list[str]
    transform: Any
    max_batch: int
    model: Any = None  # the PyTorch Classifier, when there is one (the round trip uses it)


def open_classifier(config: CourseConfig, model: ModelChoice, runtime: RuntimeChoice) -> LoadedClassifier:
    """Load ``model`` on ``runtime`` (PyTorch on the CPU, ONNX Runtime on the CPU, or a TensorRT engine)."""
    from course_utils.deploy.runtimes import OrtRunner, TensorRTRunner, TorchRunner
    from course_utils.vision.zoo import entry, load, load_classifier

    transform = entry(model.backbone).preprocessing.eval_transform()
    threads, max_batch = config.benchmark.threads, config.engine.batch_max
    if runtime.runtime == "pytorch":
        classifier = load_classifier(finetuned_path(config)) if model.key == FINETUNED else load(model.key)
        return LoadedClassifier(TorchRunner(classifier, threads=threads), classifier.classes, transform, max_batch,
                                classifier)
    classes = list(model.classes)
    if runtime.path is None or not runtime.path.exists():
        raise AppError(f"{runtime.label}: its file is gone ({runtime.path}); run `python -m course_utils prepare-demo`.")
    if runtime.runtime == "onnxruntime":
        runner: Runner = OrtRunner(runtime.path, threads=threads, precision=runtime.precision)
    else:
        runner = TensorRTRunner(runtime.path, runtime.precision, max_batch=max_batch)
    return LoadedClassifier(runner, classes, transform, max_batch)


def top_k(logits: np.ndarray, classes: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable (class, probability) pairs of each row of logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(classes[i], float(row[i])) for i in indices] for row, indices in zip(probabilities, order)]


def classify(loaded: LoadedClassifier, images: Sequence[Image], k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``k`` predictions for each image, in batches of at most ``loaded.max_batch``."""
    batch = np.stack([loaded.transform(image.convert("RGB")).numpy() for image in images]).astype(np.float32)
    logits = np.concatenate([loaded.runner.run(batch[i:i + loaded.max_batch])
                             for i in range(0, len(batch), loaded.max_batch)])
    return top_k(logits, loaded.classes, k)


def decode_uploads(files: Sequence[tuple[str, bytes]], max_images: int) -> list[tuple[str, Image]]:
    """Decode uploaded files to RGB images; too many files, or one that is no image, raises ``AppError``."""
    from PIL import Image, UnidentifiedImageError

    if not files:
        raise AppError("No image uploaded yet: choose one or more photos first.")
    if len(files) > max_images:
        raise AppError(f"{len(files)} images: the app takes at most {max_images} at once (the engines' largest "
                       "batch, engine.batch_max). Upload fewer.")
    images = []
    for name, content in files:
        try:
            with Image.open(io.BytesIO(content)) as image:
                images.append((name, image.convert("RGB")))
        except (UnidentifiedImageError, OSError):
            raise AppError(f"{name} is not an image the app can read (JPEG, PNG, GIF, BMP, WebP).") from None
    return images
