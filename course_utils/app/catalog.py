"""What the app can run on this machine: the classifiers, their runtimes, and classification itself.

The app runs no stage: it reads the stage records (the ledger's ``deployed_model``, then the ONNX, PTQ and
engines records made from that very network) and offers only what they name; ``prepare-demo`` builds them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from course_utils.core.config import CourseConfig
from course_utils.core.errors import CourseError

if TYPE_CHECKING:
    from PIL.Image import Image

    from course_utils.core.artifacts import OnnxRecord
    from course_utils.core.timing import Runner

LOG = logging.getLogger(__name__)
IMAGENET_MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
DEPLOYED = "course"  # the key of the course's own (deployed) model


class AppError(CourseError, RuntimeError):
    """Something the app's user can fix (too many images, a file that is no image, a missing artifact).

    Made with ``AppError.of(key, **fields)``, it carries its message catalog entry, so the page can say it
    in its own language; its message (the CLI's, the log's) is the English one.
    """

    def __init__(self, message: str, key: str | None = None, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.key, self.fields = key, fields or {}

    @classmethod
    def of(cls, key: str, **fields: Any) -> AppError:
        """The error of the app's message catalog entry ``key`` (``data/app/messages.yaml``)."""
        from course_utils.app.messages import messages

        return cls(messages("en")(key, **fields), key, fields)


# --- What this machine can run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """A classifier the app offers: the course's deployed model, or an ImageNet model that ships offline.

    ``classes`` names the course model's outputs (empty for ImageNet models, which name their own);
    ``network_sha256`` is the deployed model's file hash (``made_from["model"]`` of everything made from it).
    """

    key: str
    label: str
    backbone: str
    classes: tuple[str, ...] = ()
    network_sha256: str = ""
    kind: str = "imagenet"  # "finetuned" or "pruned" for the course model


@dataclass(frozen=True)
class RuntimeChoice:
    """One way to run a model: ``pytorch``, ``onnxruntime`` or ``tensorrt`` at a precision, from an artifact.

    ``network_sha256`` names the network it runs (the deployed model's hash): every runtime offered for the
    course model runs the same network.
    """

    key: str
    label: str
    runtime: str
    precision: str
    path: Path | None = None
    network_sha256: str = ""


def _course_model(config: CourseConfig) -> ModelChoice | None:
    from course_utils.core.artifacts import MissingArtifactError, StaleArtifactError
    from course_utils.core.ledger import Ledger, deployed_model

    try:
        deployed = deployed_model(Ledger(config.workspace), config)
    except (MissingArtifactError, StaleArtifactError):
        return None
    classes = ", ".join(deployed.classes[:4]) + (" …" if len(deployed.classes) > 4 else "")
    return ModelChoice(DEPLOYED, f"{deployed.backbone} {deployed.kind.replace('finetuned', 'fine-tuned')} ({classes})",
                       deployed.backbone, tuple(deployed.classes), deployed.sha256, deployed.kind)


def _discover_models(config: CourseConfig) -> list[ModelChoice]:
    from course_utils.vision.zoo import entry, local_weights

    cache = config.workspace / "cache"
    return [ModelChoice(name, f"{name} ImageNet (1000 classes)", name)
            for name in IMAGENET_MODELS if local_weights(entry(name), cache) is not None]


def model_choices(config: CourseConfig) -> list[ModelChoice]:
    """The course's deployed model when there is one, then the ImageNet models whose weights are on this machine.

    The deployed model comes from the ledger (no PyTorch needed). Finding the ImageNet weights means
    importing PyTorch (seconds on a small CPU), so that answer is cached in ``<workspace>/app/models.json``,
    keyed by the Python environment: a prepared demo starts without importing PyTorch at all.
    """
    import json
    import sys

    from course_utils.core.atomic import write_json_atomic

    course = _course_model(config)
    cache, key = _models_cache(config), {"python": sys.prefix}
    data = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
    if data.get("key") == key:
        imagenet = [ModelChoice(**{**item, "classes": tuple(item["classes"])}) for item in data["choices"]]
    else:
        imagenet = _discover_models(config)
        write_json_atomic(cache, {"key": key, "choices": [vars(c) for c in imagenet]})
    return ([course] if course else []) + imagenet


def _models_cache(config: CourseConfig) -> Path:
    return config.workspace / "app" / "models.json"


def model_list_cached(config: CourseConfig) -> bool:
    """True when the ImageNet model list is cached for this Python environment (``prepare-demo`` makes it)."""
    import json
    import sys

    cache = _models_cache(config)
    return cache.exists() and json.loads(cache.read_text(encoding="utf-8")).get("key") == {"python": sys.prefix}


def runtime_choices(config: CourseConfig, model: ModelChoice) -> list[RuntimeChoice]:
    """PyTorch, then every runtime whose artifact was made from this very network: ONNX FP32, INT8, engines.

    An artifact made from another model (an ONNX export older than the pruning stage, an INT8 model of an
    older export) is not offered: one dropdown never compares two networks. Nothing is built here
    (``prepare-demo`` builds them).
    """
    choices = [RuntimeChoice("pytorch_fp32", "PyTorch FP32", "pytorch", "fp32", network_sha256=model.network_sha256)]
    if model.key != DEPLOYED:
        return choices
    from course_utils.core.artifacts import OnnxRecord
    from course_utils.core.ledger import Ledger
    from course_utils.deploy.runtimes import ptq_cpu_model

    onnx = Ledger(config.workspace).current(OnnxRecord, made_from={"model": model.network_sha256})
    if onnx is None:
        return choices
    network, onnx_path = model.network_sha256, onnx.optimized.resolve(config.workspace)
    choices.append(RuntimeChoice("onnxruntime_fp32", "ONNX Runtime FP32", "onnxruntime", "fp32", onnx_path, network))
    if (int8 := ptq_cpu_model(config, onnx.optimized.sha256)) is not None:
        choices.append(RuntimeChoice("onnxruntime_int8", "ONNX Runtime INT8", "onnxruntime", "int8", int8, network))
    choices += [RuntimeChoice(f"tensorrt_{precision}", f"TensorRT {precision.upper()}", "tensorrt", precision, path,
                              network) for precision, path in _engines(config, onnx).items()]
    return choices


def _engines(config: CourseConfig, onnx: OnnxRecord) -> dict[str, Path]:
    from course_utils.core.environment import tensorrt_version

    if tensorrt_version() is None:  # no TensorRT: no engine can run, so none is offered
        return {}
    from course_utils.deploy.tensorrt_engines import OnnxModel, engines_here

    return engines_here(config, OnnxModel(onnx.optimized.resolve(config.workspace), onnx.optimized.sha256,
                                          onnx.input_name, onnx.output_name, onnx.input_size))


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
    from course_utils.deploy.runtimes import OrtRunner, TensorRTRunner
    from course_utils.vision.inference import TorchRunner
    from course_utils.vision.zoo import entry, load

    transform = entry(model.backbone).preprocessing.eval_transform()
    threads, max_batch = config.benchmark.threads, config.engine.batch_max
    if runtime.runtime == "pytorch":
        classifier = (_load_course_model(config, model) if model.key == DEPLOYED
                      else load(model.key, cache_root=config.workspace / "cache"))
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


def _load_course_model(config: CourseConfig, model: ModelChoice) -> Any:
    from course_utils.core.ledger import Ledger, deployed_model
    from course_utils.vision.deployment import load_model

    deployed = deployed_model(Ledger(config.workspace), config)
    if deployed.sha256 != model.network_sha256:
        raise AppError("The course model changed since the app listed it (a stage ran meanwhile): reload the page.")
    return load_model(deployed, config.workspace)


def top_k(logits: np.ndarray, classes: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable (class, probability) pairs of each row of logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(classes[i], float(row[i])) for i in indices] for row, indices in zip(probabilities, order)]


def classify(loaded: LoadedClassifier, images: Sequence[Image], k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``k`` predictions for each RGB image (``decode_uploads``' or a generation's), in batches of at most
    ``loaded.max_batch``."""
    batch = np.stack([loaded.transform(image).numpy() for image in images]).astype(np.float32)
    logits = np.concatenate([loaded.runner.run(batch[i:i + loaded.max_batch])
                             for i in range(0, len(batch), loaded.max_batch)])
    return top_k(logits, loaded.classes, k)


def decode_uploads(files: Sequence[tuple[str, bytes]], max_images: int) -> list[tuple[str, Image]]:
    """Decode uploaded files to RGB images; too many files, or one that is no image, raises ``AppError``.

    Decoding is ``vision.data.load_rgb``'s, as in training: 16-bit greyscale is scaled, not clipped, and
    transparency is composited on white, so the app classifies the pixels the model was trained on.
    """
    from PIL import UnidentifiedImageError

    from course_utils.vision.data import load_rgb

    if not files:
        raise AppError.of("no_upload")
    if len(files) > max_images:
        raise AppError.of("too_many_images", count=len(files), most=max_images)
    images = []
    for name, content in files:
        try:
            images.append((name, load_rgb(io.BytesIO(content))))
        except (UnidentifiedImageError, OSError):
            raise AppError.of("not_an_image", name=name) from None
    return images
