"""The app's logic without widgets: ``NarrativeCanvas`` (every button calls one of its methods) and ``Task``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from course_utils.core.config import CourseConfig
from course_utils.core.errors import CourseError

if TYPE_CHECKING:
    from PIL.Image import Image

    from course_utils.genai.imagegen import Generation, ImageGenerator, RoundTrip
    from course_utils.genai.story import StoryOptions, StoryResult

from course_utils.app.catalog import (
    AppError,
    LoadedClassifier,
    ModelChoice,
    RuntimeChoice,
    classify,
    decode_uploads,
    model_choices,
    open_classifier,
    runtime_choices,
)

# --- The app's logic -----------------------------------------------------------------------------------------


class Cancelled(RuntimeError):
    """The user pressed Cancel."""


def story_catalog() -> dict[str, list[tuple[str, str]]]:
    """The story step's choices as (label, value) pairs for dropdowns: styles, themes, languages, lengths."""
    from course_utils.genai.story import load_catalog

    catalog = load_catalog()
    return {"styles": [(key.replace("_", " "), key) for key in catalog.styles],
            "themes": [(key, key) for key in catalog.themes],
            "languages": [(name, key) for key, name in catalog.languages.items()],
            "lengths": [(key, key) for key in catalog.lengths]}


@dataclass
class Figures:
    """The pipeline's numbers as the last steps measured them (None: that step has not run yet).

    ``tokens_per_second`` grows live while the story streams (chunks, about one token each, per second
    since the first chunk), then holds the story's own figure; ``blocked_by`` names the rail that blocked.
    """

    photos: int = 0
    runtime: str | None = None  # the label of the runtime that classified, e.g. "ONNX Runtime INT8"
    precision: str | None = None
    classify_ms: float | None = None
    rails: str | None = None  # the rail configuration of the last story ("none": unguarded)
    blocked_by: str | None = None
    tokens_per_second: float | None = None
    picture_seconds: float | None = None
    picture_steps: int | None = None


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
    figures: Figures = field(default_factory=Figures)
    _classifiers: dict[tuple[str, str], LoadedClassifier] = field(default_factory=dict, repr=False)
    _last_classifier: LoadedClassifier | None = field(default=None, repr=False)
    _generator: ImageGenerator | None = field(default=None, repr=False)
    _screened: tuple[tuple[str, tuple[str, ...]], set[str]] | None = field(default=None, repr=False)
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
        self.figures = Figures(photos=len(self.images))
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
            raise AppError.of("no_photos")
        loaded = self.classifier(model, runtime)
        started = time.perf_counter()
        self.predictions = classify(loaded, [image for _, image in self.images])
        self.timings["classify_ms"] = (time.perf_counter() - started) * 1000
        self.figures.runtime, self.figures.precision = runtime.label, runtime.precision
        self.figures.classify_ms = self.timings["classify_ms"]
        self._last_classifier = loaded
        return self.predictions

    def subjects(self) -> list[str]:
        """The story's subjects: each photo's top-1 label, once each, in upload order."""
        return list(dict.fromkeys(top[0][0] for top in self.predictions))

    def write_story(self, options: StoryOptions, on_text: Callable[[str], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> StoryResult:
        """A guarded story about the photos' subjects, streamed: ``on_text`` gets the text so far after each
        chunk (already past the output rails); ``cancel()`` returning True stops it with ``Cancelled``."""
        from course_utils.genai.story import stream_story

        if not self.predictions:
            raise AppError.of("no_labels")
        started = time.perf_counter()
        self.figures.rails, self.figures.blocked_by, self.figures.tokens_per_second = self.config.llm.rails, None, None
        stream = stream_story(self.config, self.subjects(), options=options)
        chunks = iter(stream)
        text, count, first = "", 0, 0.0
        try:
            for chunk in chunks:
                if cancel is not None and cancel():
                    raise Cancelled("Story cancelled.")
                text, count = text + chunk, count + 1
                first = first or time.perf_counter()
                if count > 1:
                    self.figures.tokens_per_second = (count - 1) / (time.perf_counter() - first)
                if on_text is not None:
                    on_text(text)
        finally:
            getattr(chunks, "close", lambda: None)()
        self.story = stream.result
        self.chapters = [] if self.story.blocked else [self.story.text]
        self.generation = None
        self.timings["story_seconds"] = time.perf_counter() - started
        self._story_figures(self.story)
        return self.story

    def _story_figures(self, result: StoryResult) -> None:
        self.figures.rails, self.figures.blocked_by = result.rails, result.blocked_by if result.blocked else None
        if result.tokens_per_second:
            self.figures.tokens_per_second = result.tokens_per_second

    def continue_story(self, options: StoryOptions, on_text: Callable[[str], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> StoryResult:
        """The next part of the story (through the same rails); the picture step then draws that part."""
        from course_utils.genai.story import continue_story

        if self.story is None or self.story.blocked or not self.chapters:
            raise AppError.of("nothing_to_continue")
        started = time.perf_counter()
        result = continue_story(self.config, self.story, options.instruction)
        if cancel is not None and cancel():
            raise Cancelled("Continuation cancelled.")
        self.timings["continue_seconds"] = time.perf_counter() - started
        self._story_figures(result)
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

    def screened_labels(self) -> set[str]:
        """The labels among the predictions that the story's label screen holds back (none without rails).

        Each label goes through the configured input rails, so the answer is kept until the predictions or
        the rails change.
        """
        from course_utils.genai.story import storyteller

        labels = tuple(dict.fromkeys(label for top in self.predictions for label, _ in top))
        key = (self.config.llm.rails, labels)
        if self._screened is None or self._screened[0] != key:
            self._screened = (key, set(storyteller(self.config).screen(list(labels))[1]))
        return self._screened[1]

    def warm_up(self, model: ModelChoice | None = None, runtime: RuntimeChoice | None = None,
                say: Callable[[str], None] = lambda step: None) -> None:
        """Load the classifier, start the story model and load the picture model, so the first clicks are quick.

        ``say`` hears each step as it starts ("classifier", "story", "picture"), then "ready".
        """
        from course_utils.genai.story import storyteller

        if model is not None and runtime is not None:
            say("classifier")
            self.classifier(model, runtime)
        say("story")
        storyteller(self.config).warm_up()
        say("picture")
        self.generator()
        say("ready")

    def generator(self) -> ImageGenerator:
        """The text-to-image pipeline (loaded on first use; ``prepare-demo`` has it on disk already)."""
        from course_utils.genai.imagegen import load_generator

        with self._generator_lock:
            if self._generator is None:
                self._generator = load_generator(self.config)
            return self._generator

    def draw(self, on_step: Callable[[int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> Generation:
        """The picture of the current story; a blocked story raises ``BlockedStoryError`` and draws nothing."""
        from course_utils.genai.imagegen import picture_for_story

        if self.story is None:
            raise AppError.of("no_story")
        generator = self.generator()
        self.generation = picture_for_story(generator, self.story, self.config.imagegen, on_step, cancel)
        self.timings["picture_seconds"] = self.generation.seconds
        self.figures.picture_seconds, self.figures.picture_steps = self.generation.seconds, self.generation.steps
        return self.generation

    def round_trip(self) -> RoundTrip | None:
        """Classify the picture with the classifier and runtime used for the photos (None before both exist)."""
        from course_utils.genai.imagegen import judge_round_trip

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
    if isinstance(error, (CourseError, Cancelled)):
        return str(error)
    return f"{type(error).__name__}: {error} (details in the app log)."
