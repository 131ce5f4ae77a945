"""The Narrative Canvas app's logic, without a browser: uploads, runtimes on offer, classification, story,
picture, cancel, errors as messages, demo preparation and serving."""

from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from course_utils.app import catalog, demo, server, widgets
from course_utils.app.canvas import Cancelled, NarrativeCanvas, Task, explain
from course_utils.core.config import CourseConfig, load_config
from course_utils.core.ledger import Ledger
from course_utils.genai.llm import LLMEndpointError
from course_utils.lessons import exercises
from course_utils.lessons.checks import ExerciseFailed


def _png(colour: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class FakeStory:
    text: str = "An ant found a leaf."
    image_prompt: str | None = "an ant and a leaf"
    blocked: bool = False
    blocked_by: str | None = None
    message: str = ""
    labels: list[str] = field(default_factory=lambda: ["ants"])
    rails: str = "deterministic"
    tokens_per_second: float = 0.0


class FakeStream:
    def __init__(self, chunks: list[str], result: FakeStory) -> None:
        self._chunks, self.result, self.closed = chunks, None, False
        self._final = result

    def __iter__(self):
        yield from self._chunks
        self.result = self._final


class FakeRunner:
    """Logits that favour class ``index % classes`` for row ``index``; records the batch sizes it saw."""

    def __init__(self, classes: int) -> None:
        self.classes, self.batches = classes, []

    def run(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        logits = np.zeros((len(images), self.classes), np.float32)
        logits[np.arange(len(images)), np.arange(len(images)) % self.classes] = 5.0
        return logits


def _loaded(classes: list[str]) -> catalog.LoadedClassifier:
    return catalog.LoadedClassifier(FakeRunner(len(classes)), classes, lambda image: _tensor(), max_batch=2)


def _tensor():
    class Tensor:
        def numpy(self) -> np.ndarray:
            return np.zeros((3, 8, 8), np.float32)
    return Tensor()


def test_uploads_are_limited_to_the_engines_batch_and_must_be_images() -> None:
    images = catalog.decode_uploads([("a.png", _png()), ("b.png", _png())], max_images=8)
    assert [name for name, _ in images] == ["a.png", "b.png"] and images[0][1].mode == "RGB"
    with pytest.raises(catalog.AppError, match="at most 8"):
        catalog.decode_uploads([("a.png", _png())] * 9, max_images=8)
    with pytest.raises(catalog.AppError, match="notes.txt is not an image"):
        catalog.decode_uploads([("notes.txt", b"hello")], max_images=8)
    with pytest.raises(catalog.AppError, match="No image"):
        catalog.decode_uploads([], max_images=8)


def test_a_16_bit_greyscale_upload_decodes_to_the_pixels_training_sees(tmp_path: Path) -> None:
    from course_utils.vision.data import load_rgb

    path = tmp_path / "grey16.png"
    Image.fromarray(np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)).save(path)
    with Image.open(path) as saved:
        assert saved.mode.startswith("I"), "the test needs a 16-bit greyscale PNG"
    [(name, image)] = catalog.decode_uploads([("grey16.png", path.read_bytes())], max_images=8)
    expected = np.asarray(load_rgb(path))
    assert name == "grey16.png" and image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
    assert expected.min() == 0 and expected.max() == 255 and len(np.unique(expected)) == 256, "scaled, not clipped"


def test_top_k_orders_probabilities_and_names_classes() -> None:
    top = catalog.top_k(np.array([[0.0, 3.0, 1.0]]), ["a", "b", "c"], k=2)[0]
    assert [label for label, _ in top] == ["b", "c"]
    assert top[0][1] > top[1][1] and abs(sum(np.exp([0, 3, 1]) / np.exp([0, 3, 1]).sum()) - 1) < 1e-9


def test_classification_runs_in_batches_no_larger_than_the_engine_takes() -> None:
    loaded = _loaded(["ants", "bees"])
    predictions = catalog.classify(loaded, [Image.new("RGB", (8, 8))] * 5)
    assert loaded.runner.batches == [2, 2, 1]
    assert [top[0][0] for top in predictions] == ["ants", "bees", "ants", "bees", "ants"]


def test_html_fragments_escape_what_they_show() -> None:
    chart = widgets.top5_html(["<b>x.png"], [[("cat & dog", 0.5), ("rifle", 0.25)]], hidden={"rifle"})
    assert "&lt;b&gt;x.png" in chart and "cat &amp; dog" in chart and "50.0%" in chart
    assert "rifle" not in chart and "(held back)" in chart
    assert widgets.story_html("line\ntwo\n\n<i>part</i>") == \
        "<div class='nc-story'><p>line<br>two</p><p>&lt;i&gt;part&lt;/i&gt;</p></div>"


def test_the_message_catalog_has_every_entry_in_both_languages_with_the_same_fields() -> None:
    from string import Formatter

    from course_utils.app.messages import load_messages

    catalog = load_messages()
    for section in (catalog.ui, catalog.rails, catalog.choices):
        for key, words in section.items():
            assert set(words) == set(catalog.languages), key
            fields = [{name for _, name, _, _ in Formatter().parse(text) if name} for text in words.values()]
            assert all(found == fields[0] for found in fields), f"{key}: {fields}"


def test_messages_say_which_rail_blocked_in_plain_words() -> None:
    from course_utils.app.messages import MessageError, messages

    english, chinese = messages("en"), messages("zh")
    assert english("upload", most=8) == "Photos (≤ 8)" and chinese("upload", most=8) == "照片（≤ 8）"
    assert english.rail("keyword check input") == "the word filter on the request"
    assert chinese.rail("label screen").startswith("照片标签筛查")
    assert english.rail("a new rail") == "a guardrail (a new rail)" and chinese.choice("fable") == "寓言"
    assert english.rail("keyword check output (image prompt)") == \
        "the word filter on the story, checking the picture's prompt"
    assert english.choice("brand_new_style") == "brand new style"
    with pytest.raises(MessageError, match="no entry 'nope'"):
        english("nope")
    with pytest.raises(MessageError, match="not 'fr'"):
        messages("fr")


def test_the_blocked_card_names_the_rail_and_never_the_blocked_text() -> None:
    from course_utils.app.messages import messages

    card = widgets.blocked_card_html("keyword check output", messages("zh"))
    assert "故事的关键词过滤" in card and "护栏拦下了这个故事" in card
    assert "<script>" not in widgets.blocked_card_html("<script>", messages("en"))


def test_the_pipeline_strip_shows_the_figures_the_steps_measured() -> None:
    from course_utils.app.canvas import Figures
    from course_utils.app.messages import messages

    empty = widgets.figures_html(Figures())
    assert empty.count("—") == 5 and "nc-active" not in empty
    figures = Figures(photos=3, runtime="ONNX Runtime INT8", precision="int8", classify_ms=12.4, rails="guarded",
                      tokens_per_second=23.456, picture_seconds=1.25, picture_steps=2)
    strip = widgets.figures_html(figures, active="story")
    for shown in ("3 uploaded", "ONNX Runtime INT8 · 12 ms", "guarded: passed", "23.5 tokens/s",
                  "1.2 s / picture · 2 steps", "nc-chip nc-active' data-step='story'"):
        assert shown in strip, shown
    figures.blocked_by = "semantic check input"
    assert "被请求的语义检查拦下" in widgets.figures_html(figures, messages("zh"))
    assert "nc-bad" in widgets.figures_html(figures) and "nc-bad" not in strip


def test_only_runtimes_whose_artifacts_exist_are_offered(config: CourseConfig) -> None:
    from course_utils.core.artifacts import FileRef, OnnxRecord, PtqRecord

    course = catalog.ModelChoice(catalog.DEPLOYED, "fine-tuned", "efficientnet-lite0", ("ants", "bees"), "abc")
    imagenet = catalog.ModelChoice("efficientnet-lite0", "ImageNet", "efficientnet-lite0")
    assert [r.key for r in catalog.runtime_choices(config, course)] == ["pytorch_fp32"]
    onnx, int8 = config.workspace / "model.onnx", config.workspace / "model_int8.onnx"
    onnx.parent.mkdir(parents=True)
    onnx.write_bytes(b"onnx")
    int8.write_bytes(b"int8")
    ledger = Ledger(config.workspace)
    exported = ledger.save(OnnxRecord(raw=FileRef.of(onnx, config.workspace), optimized=FileRef.of(onnx, config.workspace),
                                      source="finetuned", backbone="efficientnet-lite0", input_name="images",
                                      output_name="logits", input_size=224, made_from={"model": "abc"}))
    ledger.save(PtqRecord(cpu_int8=FileRef.of(int8, config.workspace), made_from={"onnx": exported.optimized.sha256}))
    int8.unlink()
    assert [r.key for r in catalog.runtime_choices(config, course)] == ["pytorch_fp32", "onnxruntime_fp32"]
    int8.write_bytes(b"int8")
    offered = catalog.runtime_choices(config, course)
    assert [(r.key, r.path) for r in offered] == [("pytorch_fp32", None), ("onnxruntime_fp32", onnx),
                                                  ("onnxruntime_int8", int8)]
    assert [r.key for r in catalog.runtime_choices(config, imagenet)] == ["pytorch_fp32"]


def test_model_choices_find_the_deployed_model_and_cache_the_rest(config: CourseConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.core.artifacts import FileRef, FinetuneRecord
    from course_utils.vision import zoo

    assert catalog.DEPLOYED not in [c.key for c in catalog.model_choices(config)]
    path = zoo.save_classifier(zoo.load("lite0", ["ants", "bees"], pretrained=False),
                               config.workspace / "models" / "finetuned.pt")
    Ledger(config.workspace).save(FinetuneRecord(checkpoint=FileRef.of(path, config.workspace),
                                                 backbone="efficientnet-lite0", dataset="d", classes=["ants", "bees"]))
    choices = catalog.model_choices(config)
    assert choices[0].key == catalog.DEPLOYED and choices[0].classes == ("ants", "bees")
    assert "efficientnet-lite0" in [c.key for c in choices]
    monkeypatch.setattr(catalog, "_discover_models", lambda config: pytest.fail("the cache must answer"))
    assert catalog.model_choices(config) == choices
    loaded = catalog.open_classifier(config, choices[0], catalog.runtime_choices(config, choices[0])[0])
    assert loaded.classes == ["ants", "bees"]


def _canvas(config: CourseConfig, monkeypatch: pytest.MonkeyPatch, stream: FakeStream,
            classes: tuple[str, ...] = ("ants", "bees")) -> NarrativeCanvas:
    from course_utils.genai import story

    monkeypatch.setattr(story, "stream_story", lambda config, labels, **options: stream)
    canvas = NarrativeCanvas(config)
    canvas.load_images([("a.png", _png()), ("b.png", _png((0, 0, 200)))])
    canvas._classifiers[("m", "r")] = _loaded(list(classes))
    canvas.classify(catalog.ModelChoice("m", "m", "efficientnet-lite0"),
                    catalog.RuntimeChoice("r", "ONNX Runtime INT8", "onnxruntime", "int8"))
    return canvas


def test_the_canvas_keeps_the_pipelines_figures_and_tokens_per_second_grow_live(config: CourseConfig,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.genai.story import StoryOptions

    canvas = _canvas(config, monkeypatch, FakeStream(["An ", "ant ", "found ", "a leaf."], FakeStory()))
    assert (canvas.figures.photos, canvas.figures.runtime, canvas.figures.precision) == (2, "ONNX Runtime INT8", "int8")
    assert canvas.figures.classify_ms == canvas.timings["classify_ms"] > 0
    live: list[float | None] = []
    canvas.write_story(StoryOptions(), on_text=lambda text: live.append(canvas.figures.tokens_per_second))
    assert live[0] is None and all(rate is not None and rate > 0 for rate in live[1:])
    assert canvas.figures.tokens_per_second == live[-1] and canvas.figures.rails == "deterministic"
    blocked = FakeStory(text="", blocked=True, blocked_by="keyword check output", tokens_per_second=9.0)
    canvas = _canvas(config, monkeypatch, FakeStream([], blocked))
    canvas.write_story(StoryOptions())
    assert (canvas.figures.blocked_by, canvas.figures.tokens_per_second) == ("keyword check output", 9.0)
    canvas.load_images([("a.png", _png())])
    assert canvas.figures == type(canvas.figures)(photos=1)


def test_screened_labels_are_those_the_rails_hold_back(config: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    canvas = _canvas(config, monkeypatch, FakeStream([], FakeStory()), classes=("rifle", "bees"))
    assert config.llm.rails == "deterministic" and canvas.screened_labels() == {"rifle"}
    config.llm.rails = "none"
    assert canvas.screened_labels() == set()


def test_the_story_streams_about_the_subjects_and_can_be_cancelled(config: CourseConfig,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.genai.story import StoryOptions

    canvas = _canvas(config, monkeypatch, FakeStream(["An ant ", "found ", "a leaf."], FakeStory()))
    assert canvas.subjects() == ["ants", "bees"]
    seen: list[str] = []
    result = canvas.write_story(StoryOptions(), on_text=seen.append)
    assert seen == ["An ant ", "An ant found ", "An ant found a leaf."]
    assert result.text == "An ant found a leaf." and canvas.full_text() == result.text
    canvas = _canvas(config, monkeypatch, FakeStream(["An ant ", "found "], FakeStory()))
    with pytest.raises(Cancelled):
        canvas.write_story(StoryOptions(), cancel=lambda: True)
    with pytest.raises(catalog.AppError, match="classify the photos first"):
        NarrativeCanvas(config).write_story(StoryOptions())


def test_a_blocked_story_gets_no_picture_and_cannot_be_continued(config: CourseConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.genai.imagegen import BlockedStoryError
    from course_utils.genai.story import StoryOptions

    blocked = FakeStory(text="", image_prompt=None, blocked=True, blocked_by="keyword check input")
    canvas = _canvas(config, monkeypatch, FakeStream([], blocked))
    canvas._generator = object()  # never used: the guard comes first
    assert canvas.write_story(StoryOptions()).blocked
    with pytest.raises(BlockedStoryError):
        canvas.draw()
    with pytest.raises(catalog.AppError, match="No story to continue"):
        canvas.continue_story(StoryOptions())


def test_continuing_adds_a_chapter(config: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from course_utils.genai import story
    from course_utils.genai.story import StoryOptions

    canvas = _canvas(config, monkeypatch, FakeStream(["Part one."], FakeStory(text="Part one.")))
    canvas.write_story(StoryOptions())
    asked = {}
    monkeypatch.setattr(story, "continue_story",
                        lambda config, previous, instruction: asked.update(i=instruction) or FakeStory(text="Two."))
    canvas.continue_story(StoryOptions(instruction="Add a friend."))
    assert asked == {"i": "Add a friend."} and canvas.full_text() == "Part one.\n\nTwo."


def test_tasks_report_results_errors_and_cancellation() -> None:
    results: list = []
    Task("ok", lambda task: 42, results.append, results.append).start().join(5)
    Task("bad", lambda task: 1 / 0, results.append, results.append).start().join(5)
    gate = threading.Event()

    def work(task: Task) -> None:
        gate.wait(5)
        task.check()

    cancelled = Task("long", work, results.append, results.append).start()
    cancelled.cancel()
    gate.set()
    cancelled.join(5)
    assert results[0] == 42 and isinstance(results[1], ZeroDivisionError) and isinstance(results[2], Cancelled)


def test_errors_become_messages() -> None:
    assert explain(catalog.AppError("Upload fewer.")) == "Upload fewer."
    assert explain(KeyError("x")) == "KeyError: 'x' (details in the app log)."
    assert explain(LLMEndpointError("Set llm.base_url.")) == "Set llm.base_url."


def test_the_widgets_show_an_error_instead_of_raising(config: CourseConfig) -> None:
    pytest.importorskip("ipywidgets")
    widget_app = widgets.NarrativeCanvasApp(config, warm_up=False)
    widget_app._start("classify", widget_app._classify_work)  # no photos yet
    widget_app.task.join(30)
    assert "No photos yet" in widget_app.error.value and widget_app.status.value == "Failed."
    assert not widget_app.classify_button.disabled and widget_app.cancel_button.disabled
    widget_app._start("next", widget_app._next_work)  # the next part, before any story
    widget_app.task.join(30)
    assert "No story to continue" in widget_app.error.value and not widget_app.next_button.disabled
    widget_app.upload.value = ({"name": "a.png", "type": "image/png", "size": 1, "content": memoryview(_png()),
                                "last_modified": datetime.now(timezone.utc)},)
    assert len(widget_app.thumbnails.children) == 1 and widget_app.error.value == ""


def test_prepare_demo_reports_every_step_and_writes_a_manifest(config: CourseConfig,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(config: CourseConfig, build: bool) -> tuple[str, str]:
        raise catalog.AppError("no disk left")

    monkeypatch.setattr(demo, "PREPARE_STEPS", {"good": lambda c, build: ("ready", "here"), "bad": broken,
                                               "later": lambda c, build: ("built", "made")})
    steps = demo.prepare_demo(config, build=False)
    assert [s.status for s in steps] == ["ready", "failed", "built"] and steps[1].detail == "no disk left"
    assert not demo.demo_manifest_path(config).exists()
    demo.prepare_demo(config)
    manifest = json.loads(demo.demo_manifest_path(config).read_text())
    assert [s["name"] for s in manifest["steps"]] == ["good", "bad", "later"]


def test_the_page_is_served_on_loopback_with_the_same_config(config: CourseConfig) -> None:
    page = server.write_page(config)
    notebook = json.loads(page.read_text())
    assert "launch(stage=True)" in "".join(notebook["cells"][0]["source"])
    command = server.serve_command(page)
    assert "--Voila.ip=127.0.0.1" in command and str(page) in command
    environ = server.serve_environment(config, {"imagegen.steps": 3, "llm.rails": "none"})
    assert environ["COURSE_SPEC"] == "smoke" and environ["COURSE_WORKSPACE"] == str(config.workspace)
    assert environ["COURSE_IMAGEGEN__STEPS"] == "3" and environ["COURSE_LLM__RAILS"] == "none"


def test_serve_environment_round_trips_every_override(config: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.upper().startswith("COURSE_")]:
        monkeypatch.delenv(name)  # CI sets COURSE_DATA_CACHE; the kernel would inherit it
    overrides = {"seed": 7, "train.epochs_head": 1, "engine.precisions": ["fp32"], "imagegen.vae_tiling": None,
                 "engine.extra_profiles": [[1, 1, 1]], "llm.rails": "none", "prune.ratio": 0.5}
    environ = server.serve_environment(config, overrides)
    assert environ["COURSE_SEED"] == "7" and environ["COURSE_ENGINE__PRECISIONS"] == '["fp32"]'
    served = load_config(environ=environ)
    expected = load_config(config.spec, {"workspace": str(config.workspace), **overrides}, environ={})
    assert served.model_dump() == expected.model_dump()
    assert (served.seed, served.train.epochs_head, served.engine.precisions) == (7, 1, ["fp32"])
    assert served.offline is config.offline is False
    assert load_config(environ=server.serve_environment(config.model_copy(update={"offline": True}))).offline


def test_the_demo_exercise_checks_the_set_of_steps() -> None:
    right = {step for step, ahead in exercises.DEMO_STEP_QUIZ.items() if ahead}
    assert exercises.check_demo_steps(right).passed
    assert not exercises.check_demo_steps(right | {"write the story"}).passed
    with pytest.raises(ExerciseFailed):
        exercises.check_demo_steps(right - {"calibrate INT8"}, strict=True)


def test_prepare_demo_looks_before_it_builds_and_names_what_is_missing(config: CourseConfig) -> None:
    steps = {step.name: step for step in demo.prepare_demo(config, build=False)}
    assert steps["fine-tuned model"].status == "missing" and "notebook 02" in steps["fine-tuned model"].detail
    assert steps["ONNX export"].status == "missing" and not (config.workspace / "train").exists()


def _upload_value(*files: tuple[str, bytes]) -> tuple[dict, ...]:
    return tuple({"name": name, "type": "image/png", "size": len(content), "content": memoryview(content),
                  "last_modified": datetime.now(timezone.utc)} for name, content in files)


def test_the_page_speaks_english_or_chinese_and_the_story_follows_unless_set(config: CourseConfig) -> None:
    pytest.importorskip("ipywidgets")
    widget_app = widgets.NarrativeCanvasApp(config, warm_up=False)
    assert widget_app.chain_button.description == "Run the whole chain" and widget_app._options().language == "en"
    widget_app.upload.value = _upload_value(*[("a.png", _png())] * 9)
    assert "at most 8" in widget_app.error.value
    widget_app.style.value = "fable"
    widget_app.ui_language.value = "zh"
    assert widget_app.chain_button.description == "运行整条流程"
    assert widget_app.upload.description == "照片（≤ 8）"
    assert "一次最多 8 张" in widget_app.error.value and "分类器" in widget_app.figures.value
    assert widget_app.style.value == "fable" and widget_app.style.label == "寓言"
    assert widget_app._options().language == "zh"
    widget_app.language.value = "en"
    assert widget_app._options().language == "en"
    assert widgets.NarrativeCanvasApp(config.model_copy(update={"app": config.app.model_copy(
        update={"ui_language": "zh"})}), warm_up=False).chain_button.description == "运行整条流程"


def test_kiosk_mode_hides_free_text_and_runtimes_and_a_blocked_story_shows_only_the_card(
        config: CourseConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ipywidgets")
    blocked = FakeStory(text="", image_prompt=None, blocked=True, blocked_by="keyword check output",
                        message="Sorry, I can't write that story.")
    canvas = _canvas(config, monkeypatch, FakeStream(["The ant ", "went "], blocked), classes=("rifle", "bees"))
    widget_app = widgets.NarrativeCanvasApp(config, canvas, warm_up=False, kiosk=True)
    assert [w.layout.display for w in (widget_app.custom, widget_app.model, widget_app.runtime)] == ["none"] * 3
    assert not widget_app.settings_toggle.value and widget_app.settings.layout.display == "none"
    widget_app.custom.value = "ignored in kiosk mode"
    assert widget_app._options().instruction == ""
    seen: list[str] = []
    widget_app.story.observe(lambda change: seen.append(change["new"]), names="value")
    widget_app._start("story", widget_app._story_work)
    widget_app.task.join(30)
    assert any("The ant" in value for value in seen), "the story streamed into the page"
    assert "nc-blocked-card" in widget_app.story.value and "the word filter on the story" in widget_app.story.value
    shown = widget_app.story.value + widget_app.top5.value + widget_app.figures.value + widget_app.status.value
    assert "The ant" not in shown and "rifle" not in shown and "Sorry" not in shown
    assert "Photo 1" in widget_app.top5.value and "(held back)" in widget_app.top5.value
    assert widget_app.status.value == "Stopped by the guardrails." and widget_app.error.value == ""
    monkeypatch.setattr(canvas, "screened_labels", lambda: 1 / 0)  # the rails cannot run: nothing is shown
    widget_app.ui_language.value = "zh"
    assert "bees" not in widget_app.top5.value and widget_app.top5.value.count("（已隐藏）") == 4  # 2 photos x 2


def test_the_settings_panel_folds_away_and_the_stage_starts_without_it(config: CourseConfig) -> None:
    pytest.importorskip("ipywidgets")
    widget_app = widgets.NarrativeCanvasApp(config, warm_up=False)
    assert widget_app.settings_toggle.value and widget_app.settings.layout.display == "flex"
    assert widget_app.body.layout.grid_template_columns.count("minmax") == 4
    widget_app.settings_toggle.value = False
    assert widget_app.settings.layout.display == "none"
    assert widget_app.body.layout.grid_template_columns.count("minmax") == 3
    staged = widgets.NarrativeCanvasApp(config, warm_up=False, stage=True)
    assert staged.stage_toggle.value and not staged.settings_toggle.value
