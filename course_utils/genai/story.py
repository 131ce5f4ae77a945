"""The guarded story: classifier labels -> an LLM story (streamed or not) -> a short English image prompt.

The public entry points for the next stages (story -> image, the app):

* ``generate_story(config, labels, style=..., theme=..., length=..., language=..., instruction=...)``
  returns a ``StoryResult`` (``text``, ``image_prompt``, ``blocked``, ``blocked_by``, ``timings`` …);
* ``stream_story(config, labels, ...)`` returns a ``StoryStream``: iterate it for text chunks (each one
  already passed the output rails), then read ``.result``;
* ``continue_story(config, previous, instruction)`` adds a next part to a story.

A blocked story has ``blocked=True``, ``text=""`` and ``image_prompt=None``: it never reaches the image step.
Styles, themes, lengths and prompt templates live in ``data/story/catalog.yaml``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from course_utils.core.config import CourseConfig
from course_utils.core.errors import CourseError
from course_utils.genai.llm import Endpoint, endpoint, endpoint_errors, make_client
from course_utils.genai.story_rails import (
    LABEL_SCREEN,
    STORY_DATA,
    RailConfiguration,
    RailsStreamError,
    Verdict,
    build_rails,
    default_blocklist,
    default_semantic_checker,
    endpoint_cause,
    rail_configuration,
    rails_loop,
    refusal_messages,
    stream_error,
    verdict_from_log,
)

CATALOG_FILE = STORY_DATA / "catalog.yaml"
DEFAULT_REFUSAL = "Sorry, I can't write that story. Let's try another idea! 抱歉，这个故事我不能写，换个主意吧！"
IMAGE_PROMPT_WORDS = 40
IMAGE_PROMPT_TOKENS = 40


class StoryError(CourseError, ValueError):
    """A story request the course cannot serve (an unknown style, a blocked story to continue); says what to do."""


@dataclass(frozen=True)
class StoryOptions:
    """What the learner chooses: style, theme, length, language ("en" or "zh") and a free instruction."""

    style: str = "fairy_tale"
    theme: str = "friendship"
    length: str = "short"
    language: str = "en"
    instruction: str = ""


@dataclass(frozen=True)
class Catalog:
    """Styles, themes, lengths, languages and prompt templates (``data/story/catalog.yaml``)."""

    languages: dict[str, str]
    styles: dict[str, dict[str, str]]
    themes: dict[str, dict[str, str]]
    lengths: dict[str, dict[str, int]]
    prompts: dict[str, Any]

    def validate(self, options: StoryOptions) -> StoryOptions:
        """Return ``options`` unchanged, or raise ``ValueError`` listing the valid choices."""
        for name, value, known in (("style", options.style, self.styles), ("theme", options.theme, self.themes),
                                   ("length", options.length, self.lengths),
                                   ("language", options.language, self.languages)):
            if value not in known:
                raise StoryError(f"Unknown {name} {value!r}: choose one of {', '.join(known)} "
                                 f"(or add it to {CATALOG_FILE.name}).")
        return options


@lru_cache(maxsize=4)
def load_catalog(path: Path = CATALOG_FILE) -> Catalog:
    """Read the story catalog (cached)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Catalog(data["languages"], data["styles"], data["themes"], data["lengths"], data["prompts"])


# --- Prompts -----------------------------------------------------------------------------------------------


def _labels_text(labels: list[str], language: str) -> str:
    return ("、" if language == "zh" else ", ").join(labels) or ("一张照片" if language == "zh" else "a photo")


def story_system_prompt(labels: list[str], options: StoryOptions, catalog: Catalog | None = None) -> str:
    """The system message: the story request built from the labels and the options."""
    catalog = catalog or load_catalog()
    language = options.language
    return catalog.prompts["story"][language].format(
        style=catalog.styles[options.style][language], theme=catalog.themes[options.theme][language],
        labels=_labels_text(labels, language), words=catalog.lengths[options.length]["words"])


def story_messages(labels: list[str], options: StoryOptions, catalog: Catalog | None = None) -> list[dict[str, str]]:
    """Chat messages for a story: the request as system message, the learner's instruction as user message.

    The instruction is the only free text, so it is what the input rails check; the labels are screened
    separately before they get here.
    """
    catalog = catalog or load_catalog()
    catalog.validate(options)
    user = options.instruction.strip() or catalog.prompts["request"][options.language]
    return [{"role": "system", "content": story_system_prompt(labels, options, catalog)},
            {"role": "user", "content": user}]


def continue_messages(previous: StoryResult, instruction: str = "",
                      catalog: Catalog | None = None) -> list[dict[str, str]]:
    """Messages for "continue the story": the first exchange, then a request for the next part."""
    catalog = catalog or load_catalog()
    options = previous.options
    request = catalog.prompts["continue"][options.language].format(words=catalog.lengths[options.length]["words"])
    follow_up = f"{request} {instruction.strip()}".strip()
    return story_messages(previous.labels, options, catalog) + [
        {"role": "assistant", "content": previous.text}, {"role": "user", "content": follow_up}]


def image_prompt_messages(story: str, catalog: Catalog | None = None) -> list[dict[str, str]]:
    """Messages that distil a story into one English sentence describing a picture."""
    catalog = catalog or load_catalog()
    return [{"role": "user", "content": catalog.prompts["image_prompt"].format(story=story.strip())}]


def clean_image_prompt(raw: str, labels: list[str], style: str, catalog: Catalog | None = None,
                       max_words: int = IMAGE_PROMPT_WORDS) -> str:
    """A usable image prompt from the model's answer: first sentence, anchored on the labels and the style.

    A 135M model often rambles or answers in the story's language; the labels (English class names) and the
    style's picture words keep the prompt useful for CLIP whatever the model wrote.
    """
    catalog = catalog or load_catalog()
    line = next((part.strip() for part in raw.strip().splitlines() if part.strip()), "")
    sentence = line.split(". ")[0].strip().rstrip(".")
    if not sentence.isascii() or len(sentence.split()) < 3:
        sentence = "A picture of " + ", ".join(labels or ["a photo"])
    anchors = [label for label in labels if label.lower() not in sentence.lower()]
    parts = [sentence] + anchors + [catalog.styles[style]["image"]]
    words = ", ".join(parts).split()
    return " ".join(words[:max_words])


# --- Results -----------------------------------------------------------------------------------------------


@dataclass
class StoryResult:
    """A story and how it came about. ``blocked_by`` names the rail ("keyword check input", "label screen",
    "off topic politics", …); ``timings`` holds seconds per step (``story_s``, ``image_prompt_s``, ``total_s`` …).
    """

    text: str
    image_prompt: str | None
    blocked: bool
    blocked_by: str | None
    rail_type: str | None
    message: str
    labels: list[str]
    dropped_labels: list[str]
    options: StoryOptions
    rails: str
    endpoint: str
    timings: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    reason: str | None = None

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of story generation (0 when nothing was generated)."""
        seconds = self.timings.get("story_s", 0.0)
        return self.tokens / seconds if self.tokens and seconds > 0 else 0.0

    def _repr_markdown_(self) -> str:
        if self.blocked:
            return f"🛑 **Blocked by {self.blocked_by}** ({self.rail_type} rail): {self.message}"
        dropped = f"\n\n*Labels left out by the label screen: {', '.join(self.dropped_labels)}*" \
            if self.dropped_labels else ""
        return (f"{self.text}\n\n**Image prompt:** {self.image_prompt}{dropped}\n\n"
                f"*{self.rails} rails · {self.timings.get('total_s', 0):.1f} s · {self.tokens_per_second:.0f} tokens/s*")


class StoryStream:
    """Iterate for the story's text chunks (each already passed the output rails); then read ``result``.

    When an output rail blocks mid-story, iteration stops and ``result.blocked`` is True: what was shown so
    far must be replaced by ``result.message`` (the widgets do).
    """

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self.result: StoryResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._chunks

    def collect(self) -> StoryResult:
        """Consume the whole stream and return the result."""
        for _ in self._chunks:
            pass
        assert self.result is not None
        return self.result


# --- The storyteller ---------------------------------------------------------------------------------------


def complete_sentences(text: str) -> str:
    """Drop a last sentence cut off by the token cap ("…and the"), unless it is most of the text."""
    ends = [text.rfind(mark) for mark in (".", "!", "?", "。", "！", "？", "…")]
    last = max(ends)
    if last < 0 or last == len(text) - 1 or last < len(text) // 4:
        return text
    closing = len(text) > last + 1 and text[last + 1] in "\"'”’»」"
    return text[: last + 1 + closing]


class StoryTeller:
    """Writes stories through one endpoint and one rail configuration; reuse it across cells.

    ``rails`` overrides ``config.llm.rails`` ("none", "self_check", "deterministic", "guarded").
    """

    def __init__(self, config: CourseConfig, rails: str | None = None, ep: Endpoint | None = None) -> None:
        self.config = config
        self.rails: RailConfiguration = rail_configuration(rails or config.llm.rails)
        self._endpoint = ep
        self._client: Any = None
        self._app: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = self._endpoint.describe() if self._endpoint else "endpoint not started"
        return f"StoryTeller(rails={self.rails.name!r}, {where})"

    @property
    def endpoint(self) -> Endpoint:
        """The LLM endpoint (for the local provider, starting the server on first use)."""
        if self._endpoint is None:
            self._endpoint = endpoint(self.config)
        return self._endpoint

    @property
    def client(self) -> Any:
        """The synchronous ``openai`` client."""
        if self._client is None:
            self._client = make_client(self.endpoint)
        return self._client

    @property
    def app(self) -> Any:
        """The NeMo ``LLMRails`` of this configuration (built once, on the rails loop)."""
        with self._lock:
            if self._app is None:
                ep = self.endpoint
                self._app = rails_loop().call(lambda: build_rails(self.rails, ep))
        return self._app

    def warm_up(self) -> StoryTeller:
        """Start the endpoint, build the rails and load the embedder now rather than on the first story."""
        _ = self.client
        if self.rails.guarded:
            _ = self.app
        if "semantic check input" in self.rails.input or self.rails.dialog:
            default_semantic_checker().nearest("warm up the sentence embedder")
        return self

    def _llm_params(self, max_tokens: int, temperature: float | None = None) -> dict[str, Any]:
        cap = self.config.llm.max_tokens
        params: dict[str, Any] = {"max_tokens": min(max_tokens, cap) if cap else max_tokens,
                                  "temperature": self.config.llm.temperature if temperature is None else temperature}
        if self.endpoint.provider == "local":
            params["seed"] = self.config.seed
        return params

    def _result(self, labels: list[str], dropped: list[str], options: StoryOptions, **fields: Any) -> StoryResult:
        defaults: dict[str, Any] = {"text": "", "image_prompt": None, "blocked": False, "blocked_by": None,
                                    "rail_type": None, "message": ""}
        defaults.update(fields)
        return StoryResult(labels=labels, dropped_labels=dropped, options=options, rails=self.rails.name,
                           endpoint=self._endpoint.describe() if self._endpoint else "", **defaults)

    def _blocked(self, labels: list[str], dropped: list[str], options: StoryOptions, verdict: Verdict,
                 message: str, timings: dict[str, float]) -> StoryResult:
        return self._result(labels, dropped, options, blocked=True, blocked_by=verdict.rail,
                            rail_type=verdict.rail_type, message=message or DEFAULT_REFUSAL,
                            reason=verdict.reason, timings=timings)

    def screen(self, labels: list[str]) -> tuple[list[str], list[str]]:
        """(kept, dropped) labels: the deterministic input check screens them when the configuration says so."""
        return default_blocklist().screen_labels(labels) if self.rails.labels else (list(labels), [])

    def _prepare(self, labels: list[str], options: StoryOptions | None, overrides: dict[str, Any]
                 ) -> tuple[StoryOptions, list[str], list[str], StoryResult | None]:
        options = load_catalog().validate(replace(options or StoryOptions(), **overrides))
        kept, dropped = self.screen(list(labels))
        if labels and not kept:
            verdict = Verdict(True, LABEL_SCREEN, "input", f"every label was screened out: {', '.join(dropped)}")
            return options, kept, dropped, self._blocked(kept, dropped, options, verdict, DEFAULT_REFUSAL, {})
        return options, kept, dropped, None

    def tell(self, labels: list[str], options: StoryOptions | None = None, **overrides: Any) -> StoryResult:
        """A whole story at once (``overrides`` are ``StoryOptions`` fields, e.g. ``style="poem"``)."""
        started = time.perf_counter()
        options, kept, dropped, early = self._prepare(labels, options, overrides)
        if early is not None:
            return early
        messages = story_messages(kept, options)
        return self._complete(messages, kept, dropped, options, started)

    def continue_story(self, previous: StoryResult, instruction: str = "") -> StoryResult:
        """The next part of ``previous`` (the new instruction goes through the same rails)."""
        if previous.blocked:
            raise StoryError("A blocked story cannot be continued: generate a new one.")
        return self._complete(continue_messages(previous, instruction), previous.labels, previous.dropped_labels,
                              previous.options, time.perf_counter())

    def _complete(self, messages: list[dict[str, str]], kept: list[str], dropped: list[str],
                  options: StoryOptions, started: float) -> StoryResult:
        params = self._llm_params(load_catalog().lengths[options.length]["max_tokens"])
        story_started = time.perf_counter()
        if self.rails.guarded:
            app = self.app
            app.llm.last_error = None
            try:
                response = rails_loop().run(app.generate_async(
                    messages=messages, options={"log": {"activated_rails": True}, "llm_params": params}))
            except Exception as error:  # noqa: BLE001 (NeMo wraps endpoint errors in its own types)
                raise endpoint_cause(error, app) from None
            text = response.response[-1]["content"]
            verdict = verdict_from_log(response)
            tokens = int(response.log.stats.llm_calls_total_completion_tokens or 0)
        else:
            with endpoint_errors(self.endpoint):
                reply = self.client.chat.completions.create(model=self.endpoint.model, messages=messages, **params)
            text, verdict = reply.choices[0].message.content or "", Verdict.allowed()
            tokens = reply.usage.completion_tokens if reply.usage else 0
        timings = {"story_s": time.perf_counter() - story_started}
        if verdict.blocked:
            timings["total_s"] = time.perf_counter() - started
            return self._blocked(kept, dropped, options, verdict, text, timings)
        return self._finish(text.strip(), kept, dropped, options, started, timings, tokens)

    def _finish(self, text: str, kept: list[str], dropped: list[str], options: StoryOptions, started: float,
                timings: dict[str, float], tokens: int) -> StoryResult:
        text = complete_sentences(text)
        prompt_started = time.perf_counter()
        image_prompt = self.image_prompt(text, kept, options.style)
        verdict = self.check_output(image_prompt)
        timings["image_prompt_s"] = time.perf_counter() - prompt_started
        timings["total_s"] = time.perf_counter() - started
        if verdict.blocked:
            return self._blocked(kept, dropped, options, replace(verdict, rail=f"{verdict.rail} (image prompt)"),
                                 DEFAULT_REFUSAL, timings)
        return self._result(kept, dropped, options, text=text, image_prompt=image_prompt, message=text,
                            timings=timings, tokens=tokens)

    def image_prompt(self, story: str, labels: list[str], style: str) -> str:
        """Distil a story into a short English image prompt (one low-temperature call, then cleaned)."""
        with endpoint_errors(self.endpoint):
            reply = self.client.chat.completions.create(
                model=self.endpoint.model, messages=image_prompt_messages(story), stop=["\n"],
                **self._llm_params(IMAGE_PROMPT_TOKENS, temperature=0.0))
        return clean_image_prompt(reply.choices[0].message.content or "", labels, style)

    def check_output(self, text: str) -> Verdict:
        """Run this configuration's output rails on a text (the image prompt; also handy in tests)."""
        if not self.rails.output:
            return Verdict.allowed()
        from nemoguardrails.rails.llm.options import RailStatus, RailType

        result = rails_loop().run(self.app.check_async([{"role": "assistant", "content": text}],
                                                       rail_types=[RailType.OUTPUT]))
        return Verdict(True, result.rail, "output") if result.status == RailStatus.BLOCKED else Verdict.allowed()

    def check_input(self, messages: list[dict[str, str]]) -> Verdict:
        """Run this configuration's input rails on the messages' last user turn."""
        if not self.rails.input:
            return Verdict.allowed()
        from nemoguardrails.rails.llm.options import RailStatus, RailType

        result = rails_loop().run(self.app.check_async(messages, rail_types=[RailType.INPUT]))
        return Verdict(True, result.rail, "input") if result.status == RailStatus.BLOCKED else Verdict.allowed()

    def stream(self, labels: list[str], options: StoryOptions | None = None, **overrides: Any) -> StoryStream:
        """The story as a ``StoryStream`` of text chunks; the rails check each chunk before it is yielded."""
        started = time.perf_counter()
        options, kept, dropped, early = self._prepare(labels, options, overrides)
        stream = StoryStream(iter(()))
        if early is not None:
            stream.result = early
            return stream
        stream._chunks = self._stream_chunks(stream, story_messages(kept, options), kept, dropped, options, started)
        return stream

    def _stream_chunks(self, stream: StoryStream, messages: list[dict[str, str]], kept: list[str],
                       dropped: list[str], options: StoryOptions, started: float) -> Iterator[str]:
        params = self._llm_params(load_catalog().lengths[options.length]["max_tokens"])
        timings: dict[str, float] = {}
        verdict = self.check_input(messages) if self.rails.guarded else Verdict.allowed()
        timings["input_rails_s"] = time.perf_counter() - started
        if verdict.blocked:
            stream.result = self._blocked(kept, dropped, options, verdict, self._refusal(), timings)
            return
        story_started = time.perf_counter()
        pieces: list[str] = []
        for chunk in self._raw_stream(messages, params):
            if (blocked := self._chunk_verdict(chunk, not pieces)) is not None:
                timings["story_s"] = time.perf_counter() - story_started
                message = chunk if blocked.rail_type == "dialog" else self._refusal()
                stream.result = self._blocked(kept, dropped, options, blocked, message, timings)
                return
            if not pieces:
                timings["first_chunk_s"] = time.perf_counter() - started
            pieces.append(chunk)
            yield chunk
        timings["story_s"] = time.perf_counter() - story_started
        stream.result = self._finish("".join(pieces).strip(), kept, dropped, options, started, timings, len(pieces))

    def _raw_stream(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Iterator[str]:
        if not self.rails.guarded:
            with endpoint_errors(self.endpoint):
                for chunk in self.client.chat.completions.create(model=self.endpoint.model, messages=messages,
                                                                 stream=True, **params):
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
            return
        rails = ["dialog", "output"] if self.rails.output else ["dialog"]
        loop, app = rails_loop(), self.app
        app.llm.last_error = None
        chunks = loop.call(lambda: app.stream_async(messages=messages, options={"rails": rails, "llm_params": params}))
        yield from loop.iterate(chunks)

    def _chunk_verdict(self, chunk: str, first: bool) -> Verdict | None:
        if not self.rails.guarded:
            return None
        try:
            if (verdict := stream_error(chunk)) is not None:
                return verdict
        except RailsStreamError as error:
            raise endpoint_cause(error, self.app) from None
        if first and self.rails.dialog and (intent := refusal_messages(self.app).get(chunk.strip())):
            return Verdict(True, intent, "dialog")
        return None

    def _refusal(self) -> str:
        messages = self.app.config.bot_messages.get("refuse to respond") if self.rails.guarded else None
        return messages[0] if messages else DEFAULT_REFUSAL


_TELLERS: dict[tuple[Any, ...], StoryTeller] = {}


def storyteller(config: CourseConfig, rails: str | None = None) -> StoryTeller:
    """The process-wide ``StoryTeller`` for these LLM settings and rails (reused across cells)."""
    key = (config.llm.model_dump_json(), rails or config.llm.rails, str(config.workspace), config.seed)
    if key not in _TELLERS:
        _TELLERS[key] = StoryTeller(config, rails)
    return _TELLERS[key]


def generate_story(config: CourseConfig, labels: list[str], options: StoryOptions | None = None,
                   rails: str | None = None, **overrides: Any) -> StoryResult:
    """A guarded story from labels. Pass ``options`` and/or ``StoryOptions`` fields as keywords (style, theme,
    length, language, instruction); ``rails`` overrides ``config.llm.rails``. Check ``result.blocked`` before
    passing ``result.image_prompt`` on."""
    return storyteller(config, rails).tell(labels, options, **overrides)


def stream_story(config: CourseConfig, labels: list[str], options: StoryOptions | None = None,
                 rails: str | None = None, **overrides: Any) -> StoryStream:
    """Like ``generate_story`` but streamed: iterate for chunks, then read ``.result``."""
    return storyteller(config, rails).stream(labels, options, **overrides)


def continue_story(config: CourseConfig, previous: StoryResult, instruction: str = "",
                   rails: str | None = None) -> StoryResult:
    """The next part of a story, through the same rails."""
    return storyteller(config, rails or previous.rails).continue_story(previous, instruction)


def labels_from_predictions(predictions: list[list[tuple[str, float]]], k: int = 3, min_probability: float = 0.05
                            ) -> list[str]:
    """The top-``k`` labels of each image (``zoo.predict`` output) above ``min_probability``, deduplicated."""
    labels: list[str] = []
    for top in predictions:
        labels += [name for name, p in top[:k] if p >= min_probability and name not in labels]
    return labels


# --- Measurements ------------------------------------------------------------------------------------------


@dataclass
class OverheadResult:
    """Median story latency without rails and with a rail configuration, on the same request."""

    rails: str
    unguarded_s: list[float]
    guarded_s: list[float]
    tokens_per_second: float

    @property
    def overhead(self) -> float:
        """Extra time the rails add, as a fraction of the unguarded median."""
        base = statistics.median(self.unguarded_s)
        return (statistics.median(self.guarded_s) - base) / base if base > 0 else 0.0


def rails_overhead(config: CourseConfig, labels: list[str], rails: str = "deterministic", runs: int = 3,
                   **options: Any) -> OverheadResult:
    """Time the same story (temperature 0, fixed seed) without rails and with ``rails``, alternating runs."""
    settings = config.model_copy(update={"llm": config.llm.model_copy(update={"temperature": 0.0})})
    plain, guarded = StoryTeller(settings, "none"), StoryTeller(settings, rails)
    guarded._endpoint = plain.endpoint
    guarded.warm_up()
    plain_s, guarded_s, rates = [], [], []
    for _ in range(runs):
        a = plain.tell(labels, **options)
        b = guarded.tell(labels, **options)
        plain_s.append(a.timings["story_s"])
        guarded_s.append(b.timings["story_s"])
        rates.append(a.tokens_per_second)
    return OverheadResult(rails, plain_s, guarded_s, statistics.median(rates))


def story_metrics(stories: list[StoryResult], redteam: list[Any], overhead: OverheadResult | None,
                  teller: StoryTeller) -> dict[str, Any]:
    """The ledger's ``story`` entry: red-team rates of the configured rails, story latency and speed, endpoint."""
    written = [s for s in stories if not s.blocked]
    configured = next((r for r in redteam if r.configuration == teller.rails.name and not r.skipped), None)
    metrics: dict[str, Any] = {
        "endpoint": teller.endpoint.describe(),
        "rails": teller.rails.name,
        "p50_latency_s": statistics.median(s.timings["total_s"] for s in written) if written else None,
        "tokens_per_second": statistics.median(s.tokens_per_second for s in written) if written else None,
        "redteam": {r.configuration: {"block_rate": r.block_rate, "false_positive_rate": r.false_positive_rate,
                                      "prompts": len(r.items)} for r in redteam if not r.skipped},
    }
    if configured is not None:
        metrics.update(block_rate=configured.block_rate, false_positive_rate=configured.false_positive_rate,
                       redteam_prompts=len(configured.items))
    if overhead is not None:
        metrics.update(rails_overhead=overhead.overhead, overhead_rails=overhead.rails,
                       unguarded_story_s=statistics.median(overhead.unguarded_s),
                       guarded_story_s=statistics.median(overhead.guarded_s))
    return {k: v for k, v in metrics.items() if v is not None}
