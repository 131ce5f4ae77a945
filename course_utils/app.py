"""Narrative Canvas: photos -> classifier -> guarded story -> picture -> the story goes on, in one app.

Two layers, so the app is testable without a browser:

* ``NarrativeCanvas`` is the app's logic: which models and runtimes this machine can run (only those
  whose artifacts exist), classification, the story (streamed, guarded), the picture, the round trip.
  Plain Python, no widgets.
* ``NarrativeCanvasApp`` is the ipywidgets face: upload, dropdowns, buttons, a top-5 chart, the story
  as it streams, the picture. Long steps run on a worker thread (``Task``) with a progress bar and a
  Cancel button; an error shows as a message in the app (its traceback goes to ``<workspace>/app/app.log``).

``prepare_demo`` builds every artifact ahead of a live demo (``python -m course_utils prepare-demo``), and
``serve_command`` serves the app as a standalone page with Voila, on 127.0.0.1 unless told otherwise
(``python -m course_utils serve-app`` or ``make app``).
"""

from __future__ import annotations

import html
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import Self

from course_utils.config import CourseConfig
from course_utils.exercises import ExerciseResult, check_value

if TYPE_CHECKING:
    from PIL.Image import Image

    from course_utils.imagegen import Generation, ImageGenerator, RoundTrip
    from course_utils.runtimes import Runner
    from course_utils.story import StoryOptions, StoryResult

LOG = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("narrative_canvas.ipynb")
DEFAULT_PORT = 8866
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
    from course_utils.zoo import entry, local_weights

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
    from course_utils.atomic import write_json_atomic

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
    from course_utils.ledger import Ledger

    recorded = Ledger(config.workspace).stage("onnx").get("optimized_path")
    return Path(recorded) if recorded and Path(recorded).exists() else None


def runtime_choices(config: CourseConfig, model: ModelChoice) -> list[RuntimeChoice]:
    """PyTorch, then every runtime whose artifact the earlier stages left: ONNX FP32, INT8, TensorRT engines.

    Nothing is built here: a runtime without its artifact is simply not offered (``prepare-demo`` builds them).
    """
    choices = [RuntimeChoice("pytorch_fp32", "PyTorch FP32", "pytorch", "fp32")]
    if model.key != FINETUNED:
        return choices
    from course_utils.runtimes import ptq_cpu_model

    if (onnx := _onnx_fp32_path(config)) is not None:
        choices.append(RuntimeChoice("onnxruntime_fp32", "ONNX Runtime FP32", "onnxruntime", "fp32", onnx))
        choices += [RuntimeChoice(f"tensorrt_{precision}", f"TensorRT {precision.upper()}", "tensorrt", precision, path)
                    for precision, path in _engines(config, onnx).items()]
    if (int8 := ptq_cpu_model(config.workspace)) is not None:
        choices.append(RuntimeChoice("onnxruntime_int8", "ONNX Runtime INT8", "onnxruntime", "int8", int8))
    return sorted(choices, key=lambda c: ("pytorch", "onnxruntime", "tensorrt").index(c.runtime))


def _engines(config: CourseConfig, onnx: Path) -> dict[str, Path]:
    from course_utils.environment import tensorrt_version

    if tensorrt_version() is None:  # no TensorRT: no engine can run, so none is offered (and nothing is hashed)
        return {}
    from course_utils.ledger import Ledger
    from course_utils.tensorrt_engines import OnnxModel, built_engines

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
    from course_utils.runtimes import OrtRunner, TensorRTRunner, TorchRunner
    from course_utils.zoo import entry, load, load_classifier

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


# --- The app's logic -----------------------------------------------------------------------------------------


class Cancelled(RuntimeError):
    """The user pressed Cancel."""


def story_catalog() -> dict[str, list[tuple[str, str]]]:
    """The story step's choices as (label, value) pairs for dropdowns: styles, themes, languages, lengths."""
    from course_utils.story import load_catalog

    catalog = load_catalog()
    return {"styles": [(key.replace("_", " "), key) for key in catalog.styles],
            "themes": [(key, key) for key in catalog.themes],
            "languages": [(name, key) for key, name in catalog.languages.items()],
            "lengths": [(key, key) for key in catalog.lengths]}


@dataclass
class NarrativeCanvas:
    """The app without its widgets: every button of ``NarrativeCanvasApp`` calls one method of this class."""

    config: CourseConfig
    images: list[tuple[str, Image]] = field(default_factory=list)
    predictions: list[list[tuple[str, float]]] = field(default_factory=list)
    story: Any = None
    chapters: list[str] = field(default_factory=list)
    generation: Generation | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _classifiers: dict[tuple[str, str], LoadedClassifier] = field(default_factory=dict, repr=False)
    _last_classifier: LoadedClassifier | None = field(default=None, repr=False)
    _generator: ImageGenerator | None = field(default=None, repr=False)
    _classifier_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _generator_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def max_images(self) -> int:
        """How many images one upload may hold: the engines' largest batch."""
        return self.config.engine.batch_max

    def models(self) -> list[ModelChoice]:
        """The classifiers this machine can run."""
        return model_choices(self.config)

    def runtimes(self, model: ModelChoice) -> list[RuntimeChoice]:
        """The runtimes ``model`` has artifacts for."""
        return runtime_choices(self.config, model)

    def load_images(self, files: Sequence[tuple[str, bytes]]) -> list[str]:
        """Take an upload (name, bytes) as the new photos; everything downstream starts over."""
        self.images = decode_uploads(files, self.max_images)
        self.predictions, self.story, self.chapters, self.generation = [], None, [], None
        return [name for name, _ in self.images]

    def classifier(self, model: ModelChoice, runtime: RuntimeChoice) -> LoadedClassifier:
        """The loaded classifier for this choice (loaded once, then reused)."""
        with self._classifier_lock:
            key = (model.key, runtime.key)
            if key not in self._classifiers:
                self._classifiers[key] = open_classifier(self.config, model, runtime)
            return self._classifiers[key]

    def classify(self, model: ModelChoice, runtime: RuntimeChoice) -> list[list[tuple[str, float]]]:
        """Top-5 of every uploaded photo with the chosen model and runtime."""
        if not self.images:
            raise AppError("No photos yet: upload one or more images first.")
        loaded = self.classifier(model, runtime)
        started = time.perf_counter()
        self.predictions = classify(loaded, [image for _, image in self.images])
        self.timings["classify_ms"] = (time.perf_counter() - started) * 1000
        self._last_classifier = loaded
        return self.predictions

    def subjects(self) -> list[str]:
        """The story's subjects: each photo's top-1 label, once each, in upload order."""
        return list(dict.fromkeys(top[0][0] for top in self.predictions))

    def write_story(self, options: StoryOptions, on_text: Callable[[str], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> StoryResult:
        """A guarded story about the photos' subjects, streamed: ``on_text`` gets the text so far after each
        chunk (already past the output rails); ``cancel()`` returning True stops it with ``Cancelled``."""
        from course_utils.story import stream_story

        if not self.predictions:
            raise AppError("No labels yet: classify the photos first.")
        started = time.perf_counter()
        stream = stream_story(self.config, self.subjects(), options=options)
        chunks = iter(stream)
        text = ""
        try:
            for chunk in chunks:
                if cancel is not None and cancel():
                    raise Cancelled("Story cancelled.")
                text += chunk
                if on_text is not None:
                    on_text(text)
        finally:
            getattr(chunks, "close", lambda: None)()
        self.story = stream.result
        self.chapters = [] if self.story.blocked else [self.story.text]
        self.generation = None
        self.timings["story_seconds"] = time.perf_counter() - started
        return self.story

    def continue_story(self, options: StoryOptions, on_text: Callable[[str], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> StoryResult:
        """The next part of the story (through the same rails); the picture step then draws that part."""
        from course_utils.story import continue_story

        if self.story is None or self.story.blocked or not self.chapters:
            raise AppError("No story to continue: write a story first (a blocked story cannot go on).")
        started = time.perf_counter()
        result = continue_story(self.config, self.story, options.instruction)
        if cancel is not None and cancel():
            raise Cancelled("Continuation cancelled.")
        self.timings["continue_seconds"] = time.perf_counter() - started
        if not result.blocked:
            self.story = result
            self.chapters.append(result.text)
            self.generation = None
        if on_text is not None:
            on_text(self.full_text())
        return result

    def full_text(self) -> str:
        """Every part of the story so far, one paragraph each."""
        return "\n\n".join(self.chapters)

    def warm_up(self, model: ModelChoice | None = None, runtime: RuntimeChoice | None = None,
                say: Callable[[str], None] = lambda message: None) -> None:
        """Load the classifier, start the story model and load the picture model, so the first clicks are quick."""
        from course_utils.story import storyteller

        if model is not None and runtime is not None:
            say("Warming up: loading the classifier…")
            self.classifier(model, runtime)
        say("Warming up: starting the story model…")
        storyteller(self.config).warm_up()
        say("Warming up: loading the picture model…")
        self.generator()
        say("Ready.")

    def generator(self) -> ImageGenerator:
        """The text-to-image pipeline (loaded on first use; ``prepare-demo`` has it on disk already)."""
        from course_utils.imagegen import load_generator

        with self._generator_lock:
            if self._generator is None:
                self._generator = load_generator(self.config)
            return self._generator

    def draw(self, on_step: Callable[[int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> Generation:
        """The picture of the current story; a blocked story raises ``BlockedStoryError`` and draws nothing."""
        from course_utils.imagegen import picture_for_story

        if self.story is None:
            raise AppError("No story yet: write a story first.")
        generator = self.generator()
        self.generation = picture_for_story(generator, self.story, self.config.imagegen, on_step, cancel)
        self.timings["picture_seconds"] = self.generation.seconds
        return self.generation

    def round_trip(self) -> RoundTrip | None:
        """Classify the picture with the classifier and runtime used for the photos (None before both exist)."""
        from course_utils.imagegen import judge_round_trip

        loaded = self._last_classifier
        if self.generation is None or loaded is None or not self.subjects():
            return None
        predictions = classify(loaded, [self.generation.image])[0]
        return judge_round_trip(self.subjects()[0], predictions, len(loaded.classes), self.generation.real_weights)


# --- Long steps on a worker thread ---------------------------------------------------------------------------


class Task:
    """A long step on a daemon thread; ``cancel()`` asks it to stop at its next check of ``cancelled``."""

    def __init__(self, name: str, work: Callable[[Task], Any], on_done: Callable[[Any], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self.name = name
        self._work, self._on_done, self._on_error = work, on_done, on_error
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"narrative-canvas-{name}", daemon=True)

    @property
    def cancelled(self) -> bool:
        """True once ``cancel()`` was called."""
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise ``Cancelled`` when the user cancelled (call it between units of work)."""
        if self.cancelled:
            raise Cancelled(f"{self.name} cancelled.")

    def cancel(self) -> None:
        """Ask the work to stop."""
        self._cancel.set()

    def start(self) -> Task:
        """Run the work on its thread."""
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait for the work to finish."""
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """True while the work runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            result = self._work(self)
        except BaseException as error:  # noqa: BLE001 - every failure is shown in the app, never lost on a thread
            self._on_error(error)
        else:
            self._on_done(result)


def explain(error: BaseException) -> str:
    """The message the app shows for an error: the course's own errors say how to fix them."""
    from course_utils.config import ConfigError
    from course_utils.imagegen import ImageGenError
    from course_utils.llm import LLMEndpointError
    from course_utils.runtimes import RuntimeUnavailableError

    known = (AppError, Cancelled, ImageGenError, LLMEndpointError, RuntimeUnavailableError, ConfigError)
    # zoo's error is matched by name: importing zoo loads PyTorch, too much to format a message.
    if isinstance(error, known) or type(error).__name__ == "WeightsUnavailableError":
        return str(error)
    return f"{type(error).__name__}: {error} (details in the app log)."


# --- HTML fragments the widgets show (pure functions, tested without a browser) ------------------------------


def top5_html(names: Sequence[str], predictions: Sequence[Sequence[tuple[str, float]]]) -> str:
    """Each photo's top-5 as a labelled bar chart in HTML."""
    blocks = []
    for name, top in zip(names, predictions):
        rows = "".join(
            f"<div class='nc-bar-row'><span class='nc-label'>{html.escape(label)}</span>"
            f"<span class='nc-bar' style='width:{max(1, round(p * 160))}px'></span>"
            f"<span class='nc-prob'>{p:.1%}</span></div>" for label, p in top)
        blocks.append(f"<div class='nc-top5-card'><b>{html.escape(name)}</b>{rows}</div>")
    return "<div class='nc-top5-list'>" + "".join(blocks) + "</div>"


def story_html(text: str, blocked: bool = False, blocked_by: Any = None, note: str = "") -> str:
    """The story (or the guardrails' refusal) as HTML."""
    body = html.escape(text).replace("\n", "<br>")
    if blocked:
        return (f"<div class='nc-story nc-blocked'>🛡 Blocked by the guardrails ({html.escape(str(blocked_by))}). "
                f"No picture is drawn for a blocked story.<br><i>{body}</i></div>")
    return f"<div class='nc-story'>{body}</div>" + (f"<div class='nc-note'>{html.escape(note)}</div>" if note else "")


STYLE_CSS = """<style>
.nc-top5-list{display:flex;flex-wrap:wrap;gap:12px}.nc-top5-card{min-width:280px;font-size:13px}
.nc-bar-row{display:flex;align-items:center;gap:6px}.nc-label{width:150px;overflow:hidden;text-overflow:ellipsis;
white-space:nowrap}.nc-bar{height:10px;background:#76b900;display:inline-block}.nc-story{white-space:normal;
font-size:15px;line-height:1.5;max-width:760px}.nc-blocked{color:#a33}.nc-note{color:#a60;font-size:12px}
.nc-error{color:#b00;font-weight:bold}.nc-warning{background:#fff3cd;padding:4px 8px;border-radius:4px}
</style>"""


# --- The widgets ---------------------------------------------------------------------------------------------


def _png(image: Image, size: int | None = None) -> bytes:
    if size is not None:
        image = image.copy()
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class NarrativeCanvasApp:
    """The ipywidgets app over a ``NarrativeCanvas``: display it in a notebook, or serve it with Voila."""

    def __init__(self, config: CourseConfig, canvas: NarrativeCanvas | None = None, warm_up: bool = True) -> None:
        import ipywidgets as w

        from course_utils.imagegen import SCHEDULERS, STYLE_PRESETS

        self.canvas = canvas or NarrativeCanvas(config)
        self.config = config
        self.task: Task | None = None
        self._log = _app_logger(config)
        self._models = {choice.label: choice for choice in self.canvas.models()}
        catalog = story_catalog()
        self.upload = w.FileUpload(accept="image/*", multiple=True, description=f"Photos (≤ {self.canvas.max_images})")
        self.thumbnails = w.HBox([])
        self.model = w.Dropdown(options=list(self._models), description="Model")
        self.runtime = w.Dropdown(description="Runtime")
        self.classify_button = w.Button(description="Classify", icon="search", button_style="primary")
        self.top5 = w.HTML()
        self.style = w.Dropdown(options=catalog["styles"], description="Style")
        self.theme = w.Dropdown(options=catalog["themes"], description="Theme")
        self.language = w.Dropdown(options=catalog["languages"], description="Language")
        self.custom = w.Textarea(placeholder="Optional: your own instruction for the story", layout=w.Layout(width="60%"))
        self.story_button = w.Button(description="Write story", icon="book", button_style="primary")
        self.continue_button = w.Button(description="Continue story", icon="forward")
        self.story = w.HTML()
        self.picture_style = w.Dropdown(options=list(STYLE_PRESETS), value=config.imagegen.style, description="Look")
        self.scheduler = w.Dropdown(options=["default", *SCHEDULERS], value=config.imagegen.scheduler,
                                    description="Scheduler")
        self.steps = w.BoundedIntText(value=config.imagegen.steps, min=1, max=50, description="Steps")
        self.picture_button = w.Button(description="Draw picture", icon="paint-brush", button_style="primary")
        self.picture = w.Image(format="png", layout=w.Layout(max_width="384px", display="none"))
        self.round_trip = w.HTML()
        self.chain_button = w.Button(description="Run the whole chain", icon="play", button_style="success",
                                     layout=w.Layout(width="auto"))
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="danger", disabled=True)
        self.progress = w.FloatProgress(value=0, min=0, max=1, layout=w.Layout(width="40%"))
        self.status = w.HTML("Ready.")
        self.error = w.HTML()
        for widget, name in [(self.top5, "nc-top5"), (self.story, "nc-story-box"), (self.picture, "nc-picture"),
                             (self.error, "nc-error-box"), (self.status, "nc-status"), (self.upload, "nc-upload"),
                             (self.chain_button, "nc-chain"), (self.round_trip, "nc-round-trip"),
                             (self.thumbnails, "nc-thumbnails")]:
            widget.add_class(name)
        self.model.observe(lambda _: self._refresh_runtimes(), names="value")
        self.upload.observe(lambda _: self._safely(self._on_upload), names="value")
        self.classify_button.on_click(lambda _: self._start("classify", self._classify_work))
        self.story_button.on_click(lambda _: self._start("story", self._story_work))
        self.continue_button.on_click(lambda _: self._start("continue", self._continue_work))
        self.picture_button.on_click(lambda _: self._start("picture", self._picture_work))
        self.chain_button.on_click(lambda _: self._start("chain", self._chain_work))
        self.cancel_button.on_click(lambda _: self.task.cancel() if self.task else None)
        self._refresh_runtimes()
        self.upload.layout.width = "auto"
        self.widget = w.VBox([
            w.HTML(STYLE_CSS + "<h2>Narrative Canvas</h2>" + self._banner()),
            w.HBox([self.progress, self.cancel_button, self.status]), self.error,
            w.HTML("<h4>1 · Photos</h4>"), w.HBox([self.upload, self.chain_button]), self.thumbnails,
            w.HTML("<h4>2 · What the classifier sees</h4>"),
            w.HBox([self.model, self.runtime, self.classify_button]), self.top5,
            w.HTML("<h4>3 · The story (guarded)</h4>"),
            w.HBox([self.style, self.theme, self.language]), self.custom,
            w.HBox([self.story_button, self.continue_button]), self.story,
            w.HTML("<h4>4 · The picture</h4>"),
            w.HBox([self.picture_style, self.scheduler, self.steps, self.picture_button]),
            w.HBox([self.picture, self.round_trip]),
        ])
        # The warm-up starts with the first upload, not here: imports hold Python's GIL and would slow the
        # page's first render, which is what an audience waits for.
        self._warm_up_pending = warm_up

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _banner(self) -> str:
        from course_utils.imagegen import is_tiny_random

        model = self.config.imagegen.model
        if Path(model).is_dir() and not is_tiny_random(Path(model)):
            return ""
        return ("<div class='nc-warning'>Pictures come from <code>imagegen.model</code> = "
                f"<code>{html.escape(model)}</code>; offline without its weights the app draws with a tiny "
                "RANDOM pipeline whose pictures are noise (see notebook 09).</div>")

    # Plumbing: every user action runs as a Task; errors become a message in the app.

    def _refresh_runtimes(self) -> None:
        choice = self._models.get(self.model.value)
        runtimes = self.canvas.runtimes(choice) if choice else []
        self._runtimes = {runtime.label: runtime for runtime in runtimes}
        self.runtime.options = list(self._runtimes)
        self.runtime.value = next(iter(self._runtimes), None)

    def _safely(self, action: Callable[[], None]) -> None:
        try:
            self.error.value = ""
            action()
        except Exception as error:  # noqa: BLE001 - shown in the app, logged with its traceback
            self._show_error(error)

    def _show_error(self, error: BaseException) -> None:
        self._log.error("%s", error, exc_info=(type(error), error, error.__traceback__))
        self.error.value = f"<div class='nc-error'>⚠ {html.escape(explain(error))}</div>"
        from course_utils.imagegen import GenerationCancelled

        self.status.value = "Stopped." if isinstance(error, (Cancelled, GenerationCancelled)) else "Failed."

    def _start(self, name: str, work: Callable[[Task], Any]) -> None:
        if self.task is not None and self.task.running:
            self.status.value = f"Busy with {self.task.name}: wait, or press Cancel."
            return
        self.error.value = ""
        self._busy(True, f"{name}…")
        self.task = Task(name, work, lambda _: self._busy(False, "Done."), self._failed).start()

    def _failed(self, error: BaseException) -> None:
        self._busy(False, "")
        self._show_error(error)

    def _busy(self, busy: bool, status: str) -> None:
        for button in (self.classify_button, self.story_button, self.continue_button, self.picture_button,
                       self.chain_button):
            button.disabled = busy
        self.cancel_button.disabled = not busy
        self.progress.value = 0 if busy else self.progress.value
        if status:
            self.status.value = status

    def _say_when_idle(self, message: str) -> None:
        if self.task is None or not self.task.running:
            self.status.value = message

    def _warm_up(self) -> None:
        try:
            self.canvas.warm_up(self._models.get(self.model.value), self._runtimes.get(self.runtime.value),
                                self._say_when_idle)
        except Exception as error:  # noqa: BLE001 - a failed warm-up shows when the step is used
            self._log.warning("warm-up failed: %s", error)
            self.status.value = "Ready."

    # The steps.

    def _on_upload(self) -> None:
        import ipywidgets as w

        files = [(item["name"], bytes(item["content"])) for item in self.upload.value]
        names = self.canvas.load_images(files)
        self.thumbnails.children = [w.Image(value=_png(image, 96), format="png") for _, image in self.canvas.images]
        self.top5.value = self.story.value = self.round_trip.value = ""
        self.picture.layout.display = "none"
        self.status.value = f"{len(names)} photo(s) ready."
        if self._warm_up_pending:
            self._warm_up_pending = False
            threading.Thread(target=self._warm_up, name="narrative-canvas-warm-up", daemon=True).start()

    def _classify_work(self, task: Task) -> None:
        model, runtime = self._models[self.model.value], self._runtimes[self.runtime.value]
        self.status.value = f"Classifying with {runtime.label}…"
        predictions = self.canvas.classify(model, runtime)
        self.top5.value = top5_html([name for name, _ in self.canvas.images], predictions)
        self.progress.value = 1
        self.status.value = f"Classified in {self.canvas.timings['classify_ms']:.0f} ms with {runtime.label}."

    def _options(self) -> StoryOptions:
        from course_utils.story import StoryOptions

        return StoryOptions(style=self.style.value, theme=self.theme.value, language=self.language.value,
                            instruction=self.custom.value.strip())

    def _story_stream(self, task: Task, continue_story: bool) -> None:
        self.status.value = "Writing the story…"
        shown = [0.0]

        def on_text(text: str) -> None:
            task.check()
            if time.monotonic() - shown[0] > 0.1:  # at most ten updates a second reach the browser
                self.story.value = story_html(text)
                shown[0] = time.monotonic()

        write = self.canvas.continue_story if continue_story else self.canvas.write_story
        result = write(self._options(), on_text, lambda: task.cancelled)
        shown_text = result.message if result.blocked else self.canvas.full_text()
        self.story.value = story_html(shown_text, result.blocked, result.blocked_by)
        self.progress.value = 1
        self.status.value = "Blocked by the guardrails." if result.blocked else "Story written."

    def _story_work(self, task: Task) -> None:
        self._story_stream(task, continue_story=False)

    def _continue_work(self, task: Task) -> None:
        self._story_stream(task, continue_story=True)

    def _picture_work(self, task: Task) -> None:
        self.config.imagegen.style = self.picture_style.value
        self.config.imagegen.steps = int(self.steps.value)
        self.config.imagegen.scheduler = self.scheduler.value
        self.status.value = "Loading the picture model…"
        self.canvas.generator().use_scheduler(self.scheduler.value)
        self.status.value = "Drawing…"

        def on_step(done: int, total: int) -> None:
            self.progress.value = done / total

        generation = self.canvas.draw(on_step, lambda: task.cancelled)
        trip = self.canvas.round_trip()
        self.round_trip.value = html.escape(trip.verdict) if trip else ""
        self.picture.value = _png(generation.image.resize((384, 384), resample=0) if generation.image.width < 384
                                  else generation.image)
        self.picture.layout.display = ""
        self.status.value = f"Picture drawn in {generation.seconds:.1f} s ({generation.model})."

    def _chain_work(self, task: Task) -> None:
        self._classify_work(task)
        task.check()
        self._story_stream(task, continue_story=False)
        task.check()
        if self.canvas.story is not None and not self.canvas.story.blocked:
            self._picture_work(task)


def _app_logger(config: CourseConfig) -> logging.Logger:
    """A logger writing the app's tracebacks to ``<workspace>/app/app.log`` (the page shows only the message)."""
    logger = logging.getLogger("course_utils.app.session")
    path = config.workspace / "app" / "app.log"
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in logger.handlers):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger


# --- Instructor demo mode: build everything ahead of time ---------------------------------------------------


@dataclass
class DemoStep:
    """One artifact ``prepare_demo`` made sure of: ``ready`` (already there), ``built``, ``skipped`` or ``failed``."""

    name: str
    status: str
    seconds: float
    detail: str


def _prepare_finetuned(config: CourseConfig, build: bool) -> tuple[str, str]:
    if finetuned_path(config).exists():
        return "ready", str(finetuned_path(config))
    if not build:
        return "missing", "fine-tunes the configured backbone (notebook 02)"
    from course_utils.data import resolve_dataset
    from course_utils.finetune import summary, train_classifier
    from course_utils.ledger import Ledger
    from course_utils.zoo import save_classifier

    dataset = resolve_dataset(config)
    model, result, evaluation = train_classifier(config, dataset)
    save_classifier(model, finetuned_path(config))
    Ledger(config.workspace).record("finetune", {**summary(model, result, evaluation, dataset),
                                                 "checkpoint": str(finetuned_path(config))})
    return "built", f"val top-1 {evaluation.top1:.1%}"


def _prepare_onnx(config: CourseConfig, build: bool) -> tuple[str, str]:
    if (path := _onnx_fp32_path(config)) is not None:
        return "ready", str(path)
    if not build:
        return "missing", "exports and optimizes the ONNX model (notebook 04)"
    from course_utils.tensorrt_engines import course_onnx_model

    return "built", str(course_onnx_model(config).path)


def _prepare_int8(config: CourseConfig, build: bool) -> tuple[str, str]:
    from course_utils.runtimes import ptq_cpu_model

    if (path := ptq_cpu_model(config.workspace)) is not None:
        return "ready", str(path)
    if not build:
        return "missing", "calibrates and measures the INT8 models (notebook 06)"
    from course_utils.ptq import run_ptq

    metrics = run_ptq(config)
    return "built", f"{metrics['best_cpu_variant']}: {metrics['best_cpu_model_path']}"


def _prepare_engines(config: CourseConfig, build: bool) -> tuple[str, str]:
    from course_utils.environment import tensorrt_version
    from course_utils.tensorrt_engines import detect_gpu

    if tensorrt_version() is None or detect_gpu() is None:
        return "skipped", "no TensorRT and GPU here: the app offers PyTorch and ONNX Runtime"
    if (onnx := _onnx_fp32_path(config)) is not None and _engines(config, onnx):
        return "ready", ", ".join(str(path) for path in _engines(config, onnx).values())
    if not build:
        return "missing", "builds the TensorRT engines (notebook 05)"
    from course_utils.data import resolve_dataset
    from course_utils.tensorrt_engines import build_course_engines, course_onnx_model
    from course_utils.zoo import entry

    builds = build_course_engines(config, resolve_dataset(config), course_onnx_model(config),
                                  entry(config.model.backbone).preprocessing.eval_transform())
    return "built", ", ".join(f"{precision}: {'ok' if not isinstance(made, Exception) else made}"
                              for precision, made in builds.items())


def _prepare_picture(config: CourseConfig, build: bool) -> tuple[str, str]:
    from course_utils.imagegen import is_tiny_random, load_generator, resolve_model, tiny_pipeline_dir

    if not build:
        if Path(config.imagegen.model).is_dir() or is_tiny_random(tiny_pipeline_dir(config)):
            return "ready", "on disk (loaded with the first picture)"
        return "missing", f"resolves {config.imagegen.model} (download online, tiny random pipeline offline)"
    generator = load_generator(config, resolve_model(config))
    generation = generator.generate("a test picture", steps=1, size=64)
    weights = "real weights" if generator.source.real_weights else "RANDOM weights: pictures are noise"
    return "ready", f"{generator.source.name} ({weights}); a 1-step 64 px test in {generation.seconds:.2f} s"


def _prepare_story(config: CourseConfig, build: bool) -> tuple[str, str]:
    if not build:
        return "unchecked", (f"prepare-demo starts or reaches the {config.llm.provider} LLM and builds the "
                             f"{config.llm.rails} rails")
    from course_utils.llm import check_endpoint
    from course_utils.story import storyteller

    teller = storyteller(config).warm_up()
    return "ready", f"{teller.endpoint.describe()} answered in {check_endpoint(teller.endpoint):.1f} s"


def _prepare_app(config: CourseConfig, build: bool) -> tuple[str, str]:
    if not build:
        return ("ready", "cached") if _cached_model_choices(config) is not None else \
            ("missing", "caches the app's model list, so the page starts without importing PyTorch")
    return "ready", ", ".join(choice.label for choice in model_choices(config))


PREPARE_STEPS: dict[str, Callable[[CourseConfig, bool], tuple[str, str]]] = {
    "fine-tuned model": _prepare_finetuned,
    "ONNX export": _prepare_onnx,
    "INT8 calibration": _prepare_int8,
    "TensorRT engines": _prepare_engines,
    "picture model": _prepare_picture,
    "story model": _prepare_story,
    "app model list": _prepare_app,
}


def demo_manifest_path(config: CourseConfig) -> Path:
    """Where ``prepare_demo`` writes what it found and built: ``<workspace>/app/demo.json``."""
    return config.workspace / "app" / "demo.json"


def prepare_demo(config: CourseConfig, build: bool = True,
                 report: Callable[[DemoStep], None] = lambda step: None) -> list[DemoStep]:
    """Build every artifact the app can use, ahead of a live demo, so nothing trains or calibrates on stage.

    Each step reuses what is valid and builds what is missing; a failing step is reported and the
    others still run; the outcome goes to ``demo_manifest_path(config)``. ``build=False`` only looks:
    each step says ``ready``, ``missing`` (and what it would do) or ``skipped``.
    """
    from course_utils.atomic import write_json_atomic

    steps = []
    for name, prepare in PREPARE_STEPS.items():
        started = time.perf_counter()
        try:
            status, detail = prepare(config, build)
        except Exception as error:
            LOG.exception("prepare-demo: %s failed", name)
            status, detail = "failed", explain(error)
        steps.append(DemoStep(name, status, round(time.perf_counter() - started, 2), detail))
        report(steps[-1])
    if build:
        write_json_atomic(demo_manifest_path(config), {"spec": config.spec, "steps": [vars(s) for s in steps]})
    return steps


# --- Serving the app as a page -------------------------------------------------------------------------------


def write_page(config: CourseConfig) -> Path:
    """Write the one-cell notebook Voila serves (``<workspace>/app/narrative_canvas.ipynb``) and return its path.

    It lives in the workspace, so the kernel's working folder holds no module that could shadow a library's.
    """
    from course_utils.atomic import write_json_atomic

    # Written as plain JSON: importing nbformat costs seconds (its schema validator compiles a grammar).
    cell: dict[str, object] = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": ["from course_utils.app import launch\n", "\n", "app = launch()"]}
    notebook = {"nbformat": 4, "nbformat_minor": 4, "cells": [cell], "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}}}
    return write_json_atomic(config.workspace / "app" / "narrative_canvas.ipynb", notebook)


def serve_command(page: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> list[str]:
    """The Voila command line that serves ``page`` on ``host:port`` (loopback unless told otherwise)."""
    import sys

    return [sys.executable, "-m", "voila", str(page), "--no-browser", f"--port={port}", f"--Voila.ip={host}",
            "--Voila.port_retries=0", "--theme=light", "--VoilaConfiguration.show_tracebacks=False"]


def serve_environment(config: CourseConfig, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment that makes the page's kernel load the same config: spec, workspace, overrides."""
    import os

    import yaml

    environ = {**os.environ, "COURSE_SPEC": config.spec, "COURSE_WORKSPACE": str(config.workspace)}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if name and "." not in name:
            environ[f"COURSE_{section.upper()}__{name.upper()}"] = yaml.safe_dump(value).strip().removesuffix("...").strip()
    return environ


# Headless Chromium flags that work in a container with no GPU and no network (tests and the benchmark).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class PageServer:
    """The app served by Voila in a child process group; ``start()`` waits until the page answers, ``stop()`` ends
    the server, its kernels and their LLM servers. A context manager; the URL is ``url``."""

    def __init__(self, config: CourseConfig, host: str = "127.0.0.1", port: int | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        from course_utils.llm import free_port

        self.config, self.host, self.overrides = config, host, overrides
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}/"
        self.log_path = config.workspace / "app" / "voila.log"
        self.process: Any = None

    def start(self, timeout_s: float = 120.0) -> Self:
        """Launch Voila and wait until it accepts connections (the notebook runs when a browser opens the page)."""
        import socket
        import subprocess

        page = write_page(self.config)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(serve_command(page, self.host, self.port), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=serve_environment(self.config, self.overrides))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AppError(f"Voila exited with code {self.process.returncode}: read {self.log_path}.")
            try:
                with socket.create_connection((self.host, self.port), timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AppError(f"Voila did not answer on {self.url} within {timeout_s:.0f} s: read {self.log_path}.")

    def stop(self) -> None:
        """End Voila's process group (SIGTERM, then SIGKILL after 10 s)."""
        import os
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(spec: str | None = None) -> NarrativeCanvasApp:
    """Start the app in a notebook or a Voila page, with the config from ``spec`` or the environment."""
    from IPython.display import display

    from course_utils.config import load_config

    # Not session.start: it imports PyTorch to seed it, seconds the page would wait for. Nothing here needs a
    # seed (the story and the picture pass config.seed themselves), and PyTorch loads with the first model.
    config = load_config(spec)
    config.workspace.mkdir(parents=True, exist_ok=True)
    app = NarrativeCanvasApp(config)
    display(app)
    return app


def check_demo_steps(answer: set[str] | None, strict: bool = False) -> ExerciseResult:
    """Notebook 10 exercise: which steps must happen before the demo (of ``DEMO_STEP_QUIZ``)?"""
    expected = {step for step, ahead in DEMO_STEP_QUIZ.items() if ahead}
    return check_value(
        None if answer is None else set(answer), expected,
        "Right: training, export, calibration, engine builds and downloads take minutes and can fail; "
        "classifying, writing and drawing take seconds, so they are the show.",
        "Not quite. Hint: what takes minutes, needs the network or can fail for reasons the audience should "
        "never watch you debug? Those steps belong to `prepare-demo`.",
        strict,
    )


# Steps of the demo -> whether they must happen ahead of time (True) or may happen live (False).
DEMO_STEP_QUIZ: dict[str, bool] = {
    "fine-tune the classifier": True, "export to ONNX": True, "calibrate INT8": True,
    "build TensorRT engines": True, "download the picture model": True,
    "classify the photos": False, "write the story": False, "draw the picture": False,
}
