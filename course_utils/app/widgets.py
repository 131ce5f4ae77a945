"""The ipywidgets face of the app: upload, dropdowns, buttons, a top-5 chart, the streamed story, the picture."""

from __future__ import annotations

import html
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from course_utils.core.config import CourseConfig

if TYPE_CHECKING:
    from PIL.Image import Image

    from course_utils.genai.story import StoryOptions

from course_utils.app.canvas import Cancelled, NarrativeCanvas, Task, explain, story_catalog

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

        from course_utils.genai.imagegen import SCHEDULERS, STYLE_PRESETS

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
        from course_utils.genai.imagegen import is_tiny_random

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
        from course_utils.genai.imagegen import GenerationCancelled

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
        from course_utils.genai.story import StoryOptions

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
