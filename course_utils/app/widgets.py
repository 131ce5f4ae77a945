"""The ipywidgets face of the app, laid out for a stage: photos, the top-5, the story and the picture side by
side on one screen (1920×1080 or a 1280×720 projector), the pipeline's numbers live above them, the controls
in a side panel, the words in English or Chinese (``messages``), a kiosk mode for unattended demos."""

from __future__ import annotations

import html
import io
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from course_utils.core.config import CourseConfig

if TYPE_CHECKING:
    from PIL.Image import Image

    from course_utils.genai.imagegen import RoundTrip
    from course_utils.genai.story import StoryOptions

from course_utils.app.canvas import Cancelled, Figures, NarrativeCanvas, Task, explain, story_catalog
from course_utils.app.catalog import AppError
from course_utils.app.messages import Messages, load_messages, messages

# --- HTML fragments the widgets show (pure functions, tested without a browser) ------------------------------


def top5_html(names: Sequence[str], predictions: Sequence[Sequence[tuple[str, float]]],
              m: Messages | None = None, hidden: Collection[str] = ()) -> str:
    """Each photo's top-5 as a labelled bar chart; a label in ``hidden`` shows as "(held back)"."""
    m = m or messages("en")
    blocks = []
    for name, top in zip(names, predictions):
        rows = "".join(
            f"<div class='nc-bar-row'><span class='nc-label'>"
            f"{html.escape(m('held_back') if label in hidden else label)}</span>"
            f"<span class='nc-bar-track'><span class='nc-bar' style='width:{max(1.0, p * 100):.1f}%'></span></span>"
            f"<span class='nc-prob'>{p:.1%}</span></div>" for label, p in top)
        blocks.append(f"<div class='nc-top5-card'><div class='nc-card-name'>{html.escape(name)}</div>{rows}</div>")
    many = " nc-many" if len(blocks) > 4 else ""  # two columns of smaller cards, so eight photos still fit
    return f"<div class='nc-top5-list{many}'>" + "".join(blocks) + "</div>"


def story_html(text: str) -> str:
    """The story as HTML, one paragraph per blank-line-separated part."""
    parts = [part for part in text.split("\n\n") if part.strip()]
    return "<div class='nc-story'>" + "".join(
        f"<p>{html.escape(part).replace(chr(10), '<br>')}</p>" for part in parts) + "</div>"


def blocked_card_html(blocked_by: str | None, m: Messages | None = None) -> str:
    """The friendly card a blocked request shows: which rail stopped it, in plain words, and never its text."""
    m = m or messages("en")
    return (f"<div class='nc-blocked-card'><div class='nc-card-title'>🛡 {html.escape(m('blocked_title'))}</div>"
            f"<div>{html.escape(m('blocked_by', rail=m.rail(blocked_by)))}</div>"
            f"<div class='nc-card-hint'>{html.escape(m('blocked_hint'))}</div></div>")


def figures_html(figures: Figures, m: Messages | None = None, active: str | None = None) -> str:
    """The pipeline strip: photos → classifier → guardrails → story → picture, each with its latest figure.

    ``active`` ("photos", "classifier", "rails", "story", "picture") is highlighted as the step running now.
    """
    m = m or messages("en")
    waiting = m("waiting")
    if figures.rails is None:
        rails = waiting
    elif figures.blocked_by is not None:
        rails = m("rails_blocked", rail=m.rail(figures.blocked_by))
    else:
        rails = m("rails_none") if figures.rails == "none" else m("rails_passed", rails=figures.rails)
    chips = [
        ("photos", "📷", m("figure_photos"), m("photos_count", count=figures.photos) if figures.photos else waiting),
        ("classifier", "🧠", m("figure_classifier"), waiting if figures.classify_ms is None else
         m("classifier_figure", runtime=figures.runtime, ms=figures.classify_ms)),
        ("rails", "🛡", m("figure_rails"), rails),
        ("story", "✍", m("figure_story"), waiting if figures.tokens_per_second is None else
         m("tokens_per_second", rate=figures.tokens_per_second)),
        ("picture", "🎨", m("figure_picture"), waiting if figures.picture_seconds is None else
         m("picture_figure", seconds=figures.picture_seconds, steps=figures.picture_steps)),
    ]
    shown = []
    for key, icon, name, value in chips:
        classes = "nc-chip" + (" nc-active" if key == active else "") + \
                  (" nc-bad" if key == "rails" and figures.blocked_by is not None else "")
        shown.append(f"<div class='{classes}' data-step='{key}'><span class='nc-chip-name'>{icon} {html.escape(name)}"
                     f"</span><span class='nc-chip-value'>{html.escape(value)}</span></div>")
    return "<div class='nc-chips'>" + "<span class='nc-arrow'>→</span>".join(shown) + "</div>"


def round_trip_html(trip: RoundTrip, m: Messages | None = None, hidden: Collection[str] = ()) -> str:
    """The round trip's verdict (text → picture → classifier) in the page's language."""
    m = m or messages("en")

    def shown(label: str) -> str:
        return m("held_back") if label in hidden else label

    top = shown(trip.predictions[0][0]) if trip.predictions else "?"
    verdict = m("trip_survived", top=top) if trip.survived else m("trip_lost", top=top, subject=shown(trip.subject))
    if not trip.real_weights:
        verdict += " " + m("trip_noise", classes=round(1 / trip.chance))
    return f"<div class='nc-trip{' nc-survived' if trip.survived else ''}'>{html.escape(verdict)}</div>"


# Scoped to .nc-app, so the same app can sit in a notebook. Sizes follow the viewport (vw/vh): readable at the
# back of a room on 1920×1080 (story ≥ 20 px), still one screen at 1280×720. Panels that can grow past their
# share (the top-5 of eight photos, a long story) scroll inside themselves; the page itself never scrolls.
STYLE_CSS = """<style>
.nc-app{box-sizing:border-box;height:calc(100vh - 24px);min-height:540px;background:#f6f7f2;color:#1d1f1a;
 font-family:system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC","PingFang SC",
 "WenQuanYi Micro Hei",sans-serif;
 font-size:clamp(13px,.85vw,18px);overflow:hidden}
.nc-app.nc-stage{position:fixed;inset:0;width:100vw;height:100vh;min-height:0;z-index:1000}
.nc-app .widget-html-content{line-height:1.35}
.nc-app .nc-header{flex:0 0 auto;align-items:center;gap:6px;padding:4px 12px;background:#e4ead8;overflow:hidden}
.nc-app .nc-header .jupyter-widgets{margin:0}
.nc-title .widget-html-content{font-weight:700;font-size:clamp(17px,1.3vw,28px);white-space:nowrap;padding-right:6px}
.nc-app .nc-status{flex:1 1 0;min-width:0}.nc-status .widget-html-content{white-space:nowrap;overflow:hidden;
 text-overflow:ellipsis}
.nc-app .nc-figures{flex:0 0 auto;margin:4px 12px 0}
.nc-chips{display:flex;align-items:stretch;gap:4px;flex-wrap:nowrap;overflow:hidden}
.nc-chip{flex:1 1 0;min-width:0;display:flex;flex-direction:column;padding:3px 10px;border-radius:8px;
 background:#fff;border:1px solid #d5dbc8}.nc-chip.nc-active{border-color:#76b900;box-shadow:0 0 0 2px #76b90055}
.nc-chip.nc-bad{border-color:#c0392b;background:#fdf0ee}
.nc-chip-name{font-size:.8em;color:#5b6450;white-space:nowrap}
.nc-chip-value{font-weight:600;overflow:hidden;display:-webkit-box;-webkit-box-orient:vertical;-webkit-line-clamp:2;
 font-variant-numeric:tabular-nums}
.nc-arrow{align-self:center;color:#8a9479}
.nc-app .nc-error-box{flex:0 0 auto;margin:0 12px}
.nc-error{margin-top:4px;padding:6px 12px;border-radius:8px;background:#fdecea;color:#9b1c12;font-weight:600;
 font-size:1.1em}
.nc-app .nc-body{flex:1 1 0;min-height:0;padding:8px 12px;gap:10px;overflow:hidden}
.nc-app .nc-panel{min-height:0;min-width:0;padding:6px 12px;background:#fff;border-radius:10px;
 border:1px solid #e0e4d6;overflow:hidden}
.nc-h .widget-html-content{font-weight:650;font-size:clamp(15px,1.05vw,22px);color:#3d5a1e}
.nc-app .nc-thumbnails{flex:0 0 auto;gap:6px;overflow:hidden}
.nc-app .nc-thumbnails img{width:100%;height:clamp(44px,11vh,130px);object-fit:cover;border-radius:6px;margin:0}
.nc-app .nc-top5{flex:1 1 0;min-height:0;overflow-y:auto;font-size:clamp(13px,1vw,21px)}
.nc-top5-list{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,15em),1fr));gap:6px 14px}
.nc-top5-list.nc-many{grid-template-columns:repeat(2,minmax(0,1fr));font-size:.9em;gap:4px 10px}
.nc-card-name{font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.nc-bar-row{display:flex;align-items:center;gap:6px}
.nc-label{flex:0 0 44%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.nc-bar-track{flex:1 1 auto;height:.7em;background:#edf0e6;border-radius:3px}
.nc-bar{display:block;height:100%;background:#76b900;border-radius:3px}
.nc-prob{flex:0 0 3.8em;text-align:right;font-variant-numeric:tabular-nums}
.nc-app .nc-story-box{flex:1 1 0;min-height:0;overflow-y:auto;display:flex;flex-direction:column-reverse}
.nc-app .nc-story-box>.widget-html-content{flex:0 0 auto;margin-bottom:auto}
.nc-story{font-size:clamp(20px,1.4vw,30px);line-height:1.45}.nc-story p{margin:0 0 .5em}
.nc-placeholder{color:#8a9479;font-style:italic}
.nc-blocked-card{margin:8px 0;padding:14px 18px;border-radius:12px;background:#fff6e5;border:2px solid #e0a526;
 font-size:clamp(18px,1.2vw,26px);line-height:1.4}.nc-card-title{font-weight:700;margin-bottom:4px}
.nc-card-hint{color:#6b5a2e;font-size:.85em;margin-top:4px}
.nc-app img.nc-picture{flex:0 1 auto;min-height:0;width:100%;max-width:100%;height:auto;object-fit:contain;
 object-position:center top;margin:0}
.nc-app .nc-picture-placeholder{flex:1 1 0;min-height:0;border:2px dashed #cfd6c0;border-radius:10px;
 align-items:center;justify-content:center}
.nc-picture-placeholder .widget-html-content{display:flex;align-items:center;justify-content:center}
.nc-trip{font-size:.95em}.nc-trip.nc-survived{color:#2f6b12}.nc-note{color:#8a5a00;font-size:.85em}
.nc-app .nc-settings{min-width:0;min-height:0;overflow-y:auto;gap:4px}
.nc-app .nc-settings .jupyter-widgets{width:100%}
</style>"""

_COLUMNS = "minmax(0,1fr) minmax(0,1.25fr) minmax(0,1fr)"
_COLUMNS_WITH_SETTINGS = _COLUMNS + " minmax(15em,.8fr)"
_WARM_UP_STATUS = {"classifier": "warming_classifier", "story": "warming_story", "picture": "warming_picture",
                   "ready": "ready"}


# --- The widgets ---------------------------------------------------------------------------------------------


def _png(image: Image, size: int | None = None) -> bytes:
    if size is not None:
        image = image.copy()
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class NarrativeCanvasApp:
    """The ipywidgets app over a ``NarrativeCanvas``: display it in a notebook, or serve it with Voila.

    ``stage=True`` fills the browser window (the served page starts so; the Stage button toggles it);
    ``kiosk`` (default ``config.app.kiosk``) hides the instruction box and the model and runtime choices and
    holds back the labels the rails screen; ``language`` (default ``config.app.ui_language``) is "en" or "zh".
    """

    def __init__(self, config: CourseConfig, canvas: NarrativeCanvas | None = None, warm_up: bool = True,
                 stage: bool = False, kiosk: bool | None = None, language: str | None = None) -> None:
        import ipywidgets as w

        from course_utils.genai.imagegen import SCHEDULERS, STYLE_PRESETS

        self.canvas = canvas or NarrativeCanvas(config)
        self.config = config
        self.kiosk = config.app.kiosk if kiosk is None else kiosk
        self.m = messages(language or config.app.ui_language)
        self.task: Task | None = None
        self._log = _app_logger(config)
        self._models = {choice.label: choice for choice in self.canvas.models()}
        self._catalog = story_catalog()
        self._status: tuple[str, dict[str, Any]] = ("ready", {})
        self._error: BaseException | None = None
        self._active: str | None = None
        self._streamed: str | None = None  # the story's text while it streams
        self._blocked_by: str | None = None  # the rail that blocked the last story request
        self._trip: RoundTrip | None = None
        self._random_pictures = self._pictures_are_noise()

        self.ui_language = w.ToggleButtons(options=[(name, key) for key, name in load_messages().languages.items()],
                                           value=self.m.language, style={"button_width": "3.6em"})
        self.settings_toggle = w.ToggleButton(value=not stage and not self.kiosk, icon="sliders",
                                              layout=w.Layout(width="auto"))
        self.stage_toggle = w.ToggleButton(value=stage, icon="expand", layout=w.Layout(width="auto"))
        self.upload = w.FileUpload(accept="image/*", multiple=True, layout=w.Layout(width="auto"))
        self.chain_button = w.Button(icon="play", button_style="success", layout=w.Layout(width="auto"))
        self.next_button = w.Button(icon="forward", layout=w.Layout(width="auto"))
        self.cancel_button = w.Button(icon="stop", button_style="danger", disabled=True, layout=w.Layout(width="auto"))
        self.progress = w.FloatProgress(value=0, min=0, max=1, layout=w.Layout(width="9em"))
        self.status = w.HTML()
        self.title = w.HTML()
        self.figures = w.HTML()
        self.error = w.HTML()

        self.thumbnails = w.GridBox([])
        self.top5 = w.HTML()
        self.story = w.HTML()
        self.picture = w.Image(format="png", layout=w.Layout(display="none"))
        self.picture_placeholder = w.HTML()
        self.round_trip = w.HTML()
        self.headings = {key: w.HTML() for key in ("section_photos", "section_classifier", "section_story",
                                                  "section_picture", "settings")}

        wide = w.Layout(width="100%")
        self.model = w.Dropdown(options=list(self._models), layout=wide)
        self.runtime = w.Dropdown(layout=wide)
        self.classify_button = w.Button(icon="search", button_style="primary", layout=wide)
        self.style = w.Dropdown(layout=wide)
        self.theme = w.Dropdown(layout=wide)
        self.language = w.Dropdown(layout=wide)
        self.custom = w.Textarea(layout=w.Layout(width="100%", height="5em"))
        self.story_button = w.Button(icon="book", button_style="primary", layout=wide)
        self.continue_button = w.Button(icon="forward", layout=wide)
        self.picture_style = w.Dropdown(layout=wide)
        self.scheduler = w.Dropdown(layout=wide)
        self.steps = w.BoundedIntText(value=config.imagegen.steps, min=1, max=50, layout=wide)
        self.picture_button = w.Button(icon="paint-brush", button_style="primary", layout=wide)
        self._looks, self._schedulers = list(STYLE_PRESETS), ["default", *SCHEDULERS]
        self._choose(self.picture_style, self._looks, config.imagegen.style)
        self._choose(self.scheduler, self._schedulers, config.imagegen.scheduler)
        if self.kiosk:  # an unattended demo: no free text, nothing to misconfigure
            for widget in (self.custom, self.model, self.runtime, self.scheduler, self.steps):
                widget.layout.display = "none"

        self.settings = w.VBox([self.headings["settings"], self.model, self.runtime, self.classify_button,
                                self.style, self.theme, self.language, self.custom, self.story_button,
                                self.continue_button, self.picture_style, self.scheduler, self.steps,
                                self.picture_button])
        header = w.HBox([self.title, self.upload, self.chain_button, self.next_button, self.cancel_button,
                         self.progress, self.status, self.ui_language, self.settings_toggle, self.stage_toggle])
        photos = w.VBox([self.headings["section_photos"], self.thumbnails, self.headings["section_classifier"],
                         self.top5])
        story = w.VBox([self.headings["section_story"], self.story])
        picture = w.VBox([self.headings["section_picture"], self.picture, self.picture_placeholder,
                          self.round_trip])
        self.body = w.GridBox([photos, story, picture, self.settings],
                              layout=w.Layout(grid_template_rows="minmax(0,1fr)"))
        self.widget = w.VBox([w.HTML(STYLE_CSS), header, self.figures, self.error, self.body])
        for widget, name in [(self.widget, "nc-app"), (header, "nc-header"), (self.title, "nc-title"),
                             (self.status, "nc-status"), (self.figures, "nc-figures"), (self.error, "nc-error-box"),
                             (self.body, "nc-body"), (photos, "nc-panel"), (story, "nc-panel"), (picture, "nc-panel"),
                             (self.settings, "nc-settings"), (self.top5, "nc-top5"), (self.story, "nc-story-box"),
                             (self.picture, "nc-picture"), (self.picture_placeholder, "nc-picture-placeholder"),
                             (self.round_trip, "nc-round-trip"), (self.thumbnails, "nc-thumbnails"),
                             (self.upload, "nc-upload"), (self.chain_button, "nc-chain"),
                             (self.next_button, "nc-next"), (self.ui_language, "nc-ui-language"),
                             (self.settings_toggle, "nc-settings-toggle"), (self.stage_toggle, "nc-stage-toggle"),
                             (self.custom, "nc-instruction"), (self.runtime, "nc-runtime"), (self.model, "nc-model"),
                             *[(heading, "nc-h") for heading in self.headings.values()]]:
            widget.add_class(name)

        self.model.observe(lambda _: self._refresh_runtimes(), names="value")
        self.upload.observe(lambda _: self._safely(self._on_upload), names="value")
        self.ui_language.observe(lambda change: self._set_language(change["new"]), names="value")
        self.settings_toggle.observe(lambda _: self._show_settings(), names="value")
        self.stage_toggle.observe(lambda _: self._show_stage(), names="value")
        self.classify_button.on_click(lambda _: self._start("classify", self._classify_work))
        self.story_button.on_click(lambda _: self._start("story", self._story_work))
        self.continue_button.on_click(lambda _: self._start("continue", self._continue_work))
        self.picture_button.on_click(lambda _: self._start("picture", self._picture_work))
        self.chain_button.on_click(lambda _: self._start("chain", self._chain_work))
        self.next_button.on_click(lambda _: self._start("next", self._next_work))
        self.cancel_button.on_click(lambda _: self.task.cancel() if self.task else None)
        self._refresh_runtimes()
        self._show_settings()
        self._show_stage()
        self._relabel()
        # The warm-up starts with the first upload, not here: imports hold Python's GIL and would slow the
        # page's first render, which is what an audience waits for.
        self._warm_up_pending = warm_up

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _pictures_are_noise(self) -> bool:
        from course_utils.genai.imagegen import is_tiny_random

        model = self.config.imagegen.model
        return not (Path(model).is_dir() and not is_tiny_random(Path(model)))

    # Language, layout and what the page says.

    def _choose(self, dropdown: Any, keys: Sequence[str], value: str | None = None) -> None:
        """(Re)label a dropdown of catalog choices in the page's language, keeping its value."""
        value = dropdown.value if value is None else value
        dropdown.options = [(self.m.choice(key), key) for key in keys]
        dropdown.value = value if value in keys else keys[0]

    def _set_language(self, language: str) -> None:
        self.m = messages(language)
        self._relabel()

    def _relabel(self) -> None:
        """Every label, heading and message in the page's language (the story's own language is not touched)."""
        m = self.m
        self.title.value = html.escape(m("title"))
        self.upload.description = m("upload", most=self.canvas.max_images)
        for button, key in [(self.chain_button, "chain"), (self.next_button, "next_part"),
                            (self.cancel_button, "cancel"), (self.classify_button, "classify"),
                            (self.story_button, "write_story"), (self.continue_button, "continue_story"),
                            (self.picture_button, "draw"), (self.settings_toggle, "settings"),
                            (self.stage_toggle, "stage")]:
            button.description = m(key)
        for heading, widget in self.headings.items():
            widget.value = html.escape(m(heading))
        for widget, key in [(self.model, "model"), (self.runtime, "runtime"), (self.style, "style"),
                            (self.theme, "theme"), (self.language, "story_language"), (self.picture_style, "look"),
                            (self.scheduler, "scheduler"), (self.steps, "steps")]:
            widget.description = m(key)
        self.custom.placeholder = m("instruction")
        self._choose(self.style, [value for _, value in self._catalog["styles"]])
        self._choose(self.theme, [value for _, value in self._catalog["themes"]])
        language = self.language.value or "ui"
        self.language.options = [(m("follow_ui"), "ui"), *self._catalog["languages"]]
        self.language.value = language
        self._choose(self.picture_style, self._looks)
        self._choose(self.scheduler, self._schedulers)
        self._render()

    def _render(self) -> None:
        """Show the canvas's state: status, error, figures, top-5, story, round trip."""
        m = self.m
        key, fields = self._status
        self.status.value = html.escape(m(key, **fields))
        self.error.value = "" if self._error is None else \
            f"<div class='nc-error'>⚠ {html.escape(self._error_text(self._error))}</div>"
        self.figures.value = figures_html(self.canvas.figures, m, self._active)
        hidden = self._held_back()
        if self.canvas.predictions:
            names = ([m("photo", number=i) for i in range(1, len(self.canvas.images) + 1)] if self.kiosk
                     else [name for name, _ in self.canvas.images])
            self.top5.value = top5_html(names, self.canvas.predictions, m, hidden)
        else:
            self.top5.value = f"<div class='nc-placeholder'>{html.escape(m('no_photos_yet'))}</div>"
        self.story.value = self._story_view()
        self.round_trip.value = (round_trip_html(self._trip, m, hidden) if self._trip else "") + \
            (f"<div class='nc-note'>{html.escape(m('random_pictures', model=self.config.imagegen.model))}</div>"
             if self._random_pictures else "")
        self.picture_placeholder.value = f"<div class='nc-placeholder'>{html.escape(m('no_picture_yet'))}</div>"

    def _held_back(self) -> set[str]:
        """In kiosk mode, the labels the rails screen; every label when the rails cannot run (fail closed)."""
        if not self.kiosk or not self.canvas.predictions:
            return set()
        try:
            return self.canvas.screened_labels()
        except Exception as error:  # noqa: BLE001 - an unattended page shows no label it could not check
            self._log.warning("the label screen failed, so every label is held back: %s", error)
            return {label for top in self.canvas.predictions for label, _ in top}

    def _story_view(self) -> str:
        if self._streamed is not None:
            return story_html(self._streamed)
        text = self.canvas.full_text()
        card = blocked_card_html(self._blocked_by, self.m) if self._blocked_by is not None else ""
        if not text and not card:
            return f"<div class='nc-placeholder nc-story'>{html.escape(self.m('no_story_yet'))}</div>"
        return (story_html(text) if text else "") + card

    def _error_text(self, error: BaseException) -> str:
        from course_utils.genai.imagegen import GenerationCancelled

        if isinstance(error, AppError) and error.key:
            return self.m(error.key, **error.fields)
        if isinstance(error, (Cancelled, GenerationCancelled)):
            return self.m("stopped")
        return explain(error)

    def _say(self, key: str, **fields: Any) -> None:
        self._status = (key, fields)
        self.status.value = html.escape(self.m(key, **fields))

    def _show_settings(self) -> None:
        shown = self.settings_toggle.value
        self.settings.layout.display = "flex" if shown else "none"
        self.body.layout.grid_template_columns = _COLUMNS_WITH_SETTINGS if shown else _COLUMNS

    def _show_stage(self) -> None:
        if self.stage_toggle.value:
            self.widget.add_class("nc-stage")
        else:
            self.widget.remove_class("nc-stage")

    # Plumbing: every user action runs as a Task; errors become a message in the app.

    def _refresh_runtimes(self) -> None:
        choice = self._models.get(self.model.value)
        runtimes = self.canvas.runtimes(choice) if choice else []
        self._runtimes = {runtime.label: runtime for runtime in runtimes}
        self.runtime.options = list(self._runtimes)
        self.runtime.value = next(iter(self._runtimes), None)

    def _safely(self, action: Callable[[], None]) -> None:
        try:
            self._error = None
            self.error.value = ""
            action()
        except Exception as error:  # noqa: BLE001 - shown in the app, logged with its traceback
            self._show_error(error)

    def _show_error(self, error: BaseException) -> None:
        from course_utils.genai.imagegen import GenerationCancelled

        self._log.error("%s", error, exc_info=(type(error), error, error.__traceback__))
        self._error = error
        self._streamed = None
        self._say("stopped" if isinstance(error, (Cancelled, GenerationCancelled)) else "failed")
        self._render()

    def _start(self, name: str, work: Callable[[Task], Any]) -> None:
        if self.task is not None and self.task.running:
            self._say("busy", task=self.m(f"task_{self.task.name}"))
            return
        self._error = None
        self.error.value = ""
        self._busy(True)
        self._say("working", task=self.m(f"task_{name}"))
        self.task = Task(name, work, lambda _: self._finished(), self._failed).start()

    def _finished(self) -> None:
        self._busy(False)
        if self._status[0].startswith("working"):
            self._say("done")

    def _failed(self, error: BaseException) -> None:
        self._busy(False)
        self._show_error(error)

    def _busy(self, busy: bool) -> None:
        for button in (self.classify_button, self.story_button, self.continue_button, self.picture_button,
                       self.chain_button, self.next_button):
            button.disabled = busy
        self.cancel_button.disabled = not busy
        self.progress.value = 0 if busy else self.progress.value
        self._step(None)

    def _step(self, active: str | None) -> None:
        self._active = active
        self.figures.value = figures_html(self.canvas.figures, self.m, active)

    def _say_when_idle(self, step: str) -> None:
        if self.task is None or not self.task.running:
            self._say(_WARM_UP_STATUS[step])

    def _warm_up(self) -> None:
        try:
            self.canvas.warm_up(self._models.get(self.model.value), self._runtimes.get(self.runtime.value),
                                self._say_when_idle)
        except Exception as error:  # noqa: BLE001 - a failed warm-up shows when the step is used
            self._log.warning("warm-up failed: %s", error)
            self._say_when_idle("ready")

    # The steps.

    def _on_upload(self) -> None:
        import ipywidgets as w

        files = [(item["name"], bytes(item["content"])) for item in self.upload.value]
        names = self.canvas.load_images(files)
        self.thumbnails.children = [w.Image(value=_png(image, 240), format="png") for _, image in self.canvas.images]
        self.thumbnails.layout.grid_template_columns = f"repeat({min(len(names), 4)},minmax(0,1fr))"
        self._streamed, self._blocked_by, self._trip = None, None, None
        self.picture.layout.display = "none"
        self.picture_placeholder.layout.display = ""
        self._say("photos_ready", count=len(names))
        self._render()
        if self._warm_up_pending:
            self._warm_up_pending = False
            threading.Thread(target=self._warm_up, name="narrative-canvas-warm-up", daemon=True).start()

    def _classify_work(self, task: Task) -> None:
        model, runtime = self._models[self.model.value], self._runtimes[self.runtime.value]
        self._step("classifier")
        self._say("classifying", runtime=runtime.label)
        self.canvas.classify(model, runtime)
        self.progress.value = 1
        self._say("classified", ms=self.canvas.timings["classify_ms"], runtime=runtime.label)
        self._render()

    def _options(self) -> StoryOptions:
        from course_utils.genai.story import StoryOptions

        language = self.m.language if self.language.value == "ui" else self.language.value
        return StoryOptions(style=self.style.value, theme=self.theme.value, language=language,
                            instruction="" if self.kiosk else self.custom.value.strip())

    def _story_stream(self, task: Task, continue_story: bool) -> bool:
        """Write (or continue) the story, streaming it into the page; True when the rails let it through."""
        self._step("story")
        self._say("writing")
        shown = [0.0]
        before = self.canvas.full_text()

        def on_text(text: str) -> None:
            task.check()
            if time.monotonic() - shown[0] > 0.1:  # at most ten updates a second reach the browser
                self._streamed = text
                self.story.value = self._story_view()
                self.figures.value = figures_html(self.canvas.figures, self.m, "story")
                shown[0] = time.monotonic()

        self._streamed = before if continue_story and before else None
        self._blocked_by = None
        write = self.canvas.continue_story if continue_story else self.canvas.write_story
        try:
            result = write(self._options(), on_text, lambda: task.cancelled)
        finally:
            self._streamed = None  # a blocked story's partial text never stays on the page
        self._blocked_by = result.blocked_by if result.blocked else None
        self.progress.value = 1
        self._say("blocked" if result.blocked else "written")
        self._render()
        return not result.blocked

    def _story_work(self, task: Task) -> None:
        self._story_stream(task, continue_story=False)

    def _continue_work(self, task: Task) -> None:
        self._story_stream(task, continue_story=True)

    def _picture_work(self, task: Task) -> None:
        self._step("picture")
        self.config.imagegen.style = self.picture_style.value
        self.config.imagegen.steps = int(self.steps.value)
        self.config.imagegen.scheduler = self.scheduler.value
        self._say("loading_picture")
        self.canvas.generator().use_scheduler(self.scheduler.value)
        self._say("drawing")

        def on_step(done: int, total: int) -> None:
            self.progress.value = done / total

        generation = self.canvas.draw(on_step, lambda: task.cancelled)
        self._trip = self.canvas.round_trip()
        self.picture.value = _png(generation.image.resize((384, 384), resample=0) if generation.image.width < 384
                                  else generation.image)
        self.picture.layout.display = ""
        self.picture_placeholder.layout.display = "none"
        self._say("drawn", seconds=generation.seconds)
        self._render()

    def _chain_work(self, task: Task) -> None:
        self._classify_work(task)
        task.check()
        if self._story_stream(task, continue_story=False):
            task.check()
            self._picture_work(task)

    def _next_work(self, task: Task) -> None:
        """The loop goes on: the next part of the story, then its picture."""
        if self._story_stream(task, continue_story=True):
            task.check()
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
