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
from course_utils.genai.llm import (
    Endpoint,
    endpoint,
    endpoint_errors,
    language_config,
    make_client,
    prefill_supported,
)
from course_utils.genai.safety_classifier import classifier_cache_dir
from course_utils.genai.story_rails import (
    LABEL_SCREEN,
    STORY_DATA,
    RailConfiguration,
    RailsStreamError,
    SafetyModels,
    Verdict,
    build_rails,
    default_semantic_checker,
    endpoint_cause,
    rails_loop,
    refusal_messages,
    stream_error,
    usable_rails,
    verdict_from_log,
)

CATALOG_FILE = STORY_DATA / "catalog.yaml"
LABELS_FILE = STORY_DATA / "labels.yaml"
DEFAULT_REFUSAL = "Sorry, I can't write that story. Let's try another idea! 抱歉，这个故事我不能写，换个主意吧！"
IMAGE_PROMPT_WORDS = 40
IMAGE_PROMPT_TOKENS = 40
CLOSING_TOKENS = 32
DEFAULT_LANGUAGE = "en"


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
    styles: dict[str, dict[str, Any]]
    themes: dict[str, dict[str, str]]
    lengths: dict[str, dict[str, Any]]
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


@dataclass(frozen=True)
class PromptRecipe:
    """How a story request is put to the model. Each switch is one change measured on the story rubric
    (``benchmarks/story_rubric.py``, docs/benchmarks.md); ``PromptRecipe()`` is the tuned default.

    * ``user_message``: the labels and the style go in a user message after a one-line system message
      (False: the whole request in the system message, as before the rubric);
    * ``outline``: a one-line outline follows the request;
    * ``prefill``: the story's opening, naming the labels, is prefilled as the model's first words through the
      chat template (an endpoint that cannot be prefilled is asked to begin with it instead);
    * ``short``: the request leaves out the word count (the length's token cap bounds the story);
    * ``stops``: stop sequences end the story when the model starts echoing instructions;
    * ``closing``: a style's closing line (the fable's moral) is prefilled after the story;
    * ``frequency_penalty``: discourages the loops small models fall into.
    """

    name: str = "tuned"
    user_message: bool = True
    outline: bool = False
    prefill: bool = True
    short: bool = True
    stops: bool = True
    closing: bool = True
    frequency_penalty: float = 0.0


BASELINE = PromptRecipe("baseline", user_message=False, outline=False, prefill=False, stops=False, closing=False)


@lru_cache(maxsize=2)
def load_label_names(path: Path = LABELS_FILE) -> dict[str, dict[str, list[str]]]:
    """The label table (``data/story/labels.yaml``): each label's names per language (cached)."""
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def label_names(label: str, language: str) -> list[str]:
    """How a label is named in a story of that language: the prompt's name first, then accepted synonyms.

    A label missing from the table is used as it is.
    """
    entry = load_label_names().get(label) or load_label_names().get(label.lower()) or {}
    return list(entry.get(language) or []) or [label]


def _labels_text(labels: list[str], language: str) -> str:
    return ("、" if language == "zh" else ", ").join(labels) or ("一张照片" if language == "zh" else "a photo")


def _noun_phrase(label: str, language: str) -> str:
    """The label's name in the prompt; an English label missing from the table gets an article ("an owl")."""
    name = label_names(label, language)[0]
    if language != "en" or name != label or name.endswith("s") or " " in name and name[0].isupper():
        return name
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name  # a rough rule, enough for class names


def labels_phrase(labels: list[str], language: str) -> str:
    """The labels as a story names them: "a tabby cat and a teapot", "虎斑猫和茶壶"."""
    names = [_noun_phrase(label, language) for label in labels] or (["一张照片"] if language == "zh" else ["a photo"])
    if len(names) == 1:
        return names[0]
    joiner, last = ("、", "和") if language == "zh" else (", ", " and ")
    return joiner.join(names[:-1]) + last + names[-1]


def story_opening(labels: list[str], options: StoryOptions, catalog: Catalog | None = None) -> str:
    """The style's opening with the labels in it ("Once upon a time, a bee and a daisy"): the story's first words."""
    catalog = catalog or load_catalog()
    language = options.language
    subject = labels_phrase(labels[:1], language)
    template = catalog.styles[options.style]["opening"][language]
    return template.format(labels=labels_phrase(labels, language), subject=subject,
                           Labels=_capitalised(labels_phrase(labels, language)), Subject=_capitalised(subject))


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def story_system_prompt(labels: list[str], options: StoryOptions, catalog: Catalog | None = None) -> str:
    """The baseline recipe's system message: the whole story request built from the labels and the options."""
    catalog = catalog or load_catalog()
    language = options.language
    return catalog.prompts["story"][language].format(
        style=catalog.styles[options.style][language], theme=catalog.themes[options.theme][language],
        labels=_labels_text(labels, language), words=catalog.lengths[options.length]["words"])


def story_request(labels: list[str], options: StoryOptions, recipe: PromptRecipe = PromptRecipe(),
                  catalog: Catalog | None = None, prefill: bool = True) -> str:
    """The tuned recipes' request: style, labels and theme (and the outline, and the opening when it cannot be
    prefilled) in the story's language."""
    catalog = catalog or load_catalog()
    language = options.language
    fields = {"style": catalog.styles[options.style][language], "theme": catalog.themes[options.theme][language],
              "labels": labels_phrase(labels, language), "words": catalog.lengths[options.length]["words"]}
    lines = [catalog.prompts["ask_short" if recipe.short else "ask"][language].format(**fields)]
    if recipe.outline:
        lines.append(catalog.prompts["outline"][language].format(**fields))
    if recipe.prefill and not prefill:
        lines.append(catalog.prompts["begin"][language].format(opening=story_opening(labels, options, catalog)))
    return "\n".join(lines)


def story_messages(labels: list[str], options: StoryOptions, catalog: Catalog | None = None,
                   recipe: PromptRecipe = PromptRecipe(), prefill: bool = True) -> list[dict[str, str]]:
    """Chat messages for a story, without the prefilled opening (``story_opening``; the teller adds it).

    The last user message is always the learner's instruction (or the plain "Tell the story."): it is the only
    free text, so it is what the input rails check; the labels are screened separately before they get here.
    The baseline recipe puts the whole request in the system message; the tuned ones put it in a user message
    before the instruction, after a one-line system message. ``prefill`` says whether the endpoint continues a
    prefilled opening (else the request asks for it).
    """
    catalog = catalog or load_catalog()
    catalog.validate(options)
    user = options.instruction.strip() or catalog.prompts["request"][options.language]
    if not recipe.user_message:
        return [{"role": "system", "content": story_system_prompt(labels, options, catalog)},
                {"role": "user", "content": user}]
    return [{"role": "system", "content": catalog.prompts["persona"][options.language]},
            {"role": "user", "content": story_request(labels, options, recipe, catalog, prefill)},
            {"role": "user", "content": user}]


def continue_messages(previous: StoryResult, instruction: str = "", catalog: Catalog | None = None,
                      recipe: PromptRecipe = PromptRecipe(), prefill: bool = True) -> list[dict[str, str]]:
    """Messages for "continue the story": the first exchange, then a request for the next part."""
    catalog = catalog or load_catalog()
    options = previous.options
    request = catalog.prompts["continue"][options.language].format(words=catalog.lengths[options.length]["words"])
    follow_up = f"{request} {instruction.strip()}".strip()
    return story_messages(previous.labels, options, catalog, recipe, prefill) + [
        {"role": "assistant", "content": previous.text}, {"role": "user", "content": follow_up}]


def image_prompt_messages(story: str, catalog: Catalog | None = None, labels: list[str] | None = None
                          ) -> list[dict[str, str]]:
    """Messages that distil a story into one English sentence describing a picture; with ``labels``, the
    sentence's opening naming them is prefilled ("A picture of a bee and a daisy")."""
    catalog = catalog or load_catalog()
    messages = [{"role": "user", "content": catalog.prompts["image_prompt"].format(story=story.strip())}]
    if labels:
        opening = catalog.prompts["image_opening"].format(labels=labels_phrase(labels, "en"))
        messages.append({"role": "assistant", "content": opening})
    return messages


def clean_image_prompt(raw: str, labels: list[str], style: str, catalog: Catalog | None = None,
                       max_words: int = IMAGE_PROMPT_WORDS) -> str:
    """A usable image prompt from the model's answer: first sentence, anchored on the labels and the style.

    A 135M model often rambles or answers in the story's language; the labels (English class names) and the
    style's picture words keep the prompt useful for CLIP whatever the model wrote.
    """
    catalog = catalog or load_catalog()
    line = next((part.strip() for part in raw.strip().splitlines() if part.strip()), "")
    sentence = line.split(". ")[0].strip().rstrip(".,;: ")
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
    opening: str = ""  # the prefilled first words (part of ``text``), "" when none
    image_sentence: str = ""  # the model's own image sentence, before ``clean_image_prompt`` anchored it

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

    ``rails`` overrides ``config.llm.rails`` ("none", "self_check", "deterministic", "guarded"); ``recipe`` says
    how the request is prompted (``PromptRecipe``). With ``llm.model: auto`` a story in another language is
    written by a sibling teller on that language's offline model (``llm.OFFLINE_MODEL_BY_LANGUAGE``).
    """

    def __init__(self, config: CourseConfig, rails: str | None = None, ep: Endpoint | None = None,
                 recipe: PromptRecipe | None = None) -> None:
        self.requested = config
        self.config = language_config(config, DEFAULT_LANGUAGE)
        # An NVIDIA configuration without a key or endpoint falls back (with a warning) to local rails.
        self.rails: RailConfiguration
        self._safety: SafetyModels | None
        self.rails, self._safety = usable_rails(config, rails)
        self.recipe = recipe or PromptRecipe()
        self._endpoint = ep
        self._client: Any = None
        self._app: Any = None
        self._lock = threading.Lock()
        self._siblings: dict[str, StoryTeller] = {}

    def for_language(self, language: str) -> StoryTeller:
        """The teller that writes stories in ``language``: this one, or its sibling on that language's model."""
        config = language_config(self.requested, language)
        if config == self.config:
            return self
        with self._lock:
            if language not in self._siblings:
                self._siblings[language] = StoryTeller(config, self.rails.name, recipe=self.recipe)
        return self._siblings[language]

    @property
    def prefills(self) -> bool:
        """True when the endpoint continues a prefilled opening (the course's local server)."""
        return self.recipe.prefill and prefill_supported(self.config) and \
            (self._endpoint is None or self._endpoint.provider == "local")

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
                self._app = rails_loop().call(lambda: build_rails(
                    self.rails, ep, safety=self._safety, cache_dir=classifier_cache_dir(self.config)))
        return self._app

    def warm_up(self) -> StoryTeller:
        """Start the endpoint, build the rails and load the embedder now rather than on the first story."""
        _ = self.client
        if self.rails.guarded:
            _ = self.app
        if "semantic check input" in self.rails.input or self.rails.dialog:
            default_semantic_checker().nearest("warm up the sentence embedder")
        if self.rails.input:  # the safety classifier trains (or loads from the workspace) on first use
            self.check_input([{"role": "user", "content": "warm up the input rails"}])
        return self

    def _llm_params(self, max_tokens: int, temperature: float | None = None) -> dict[str, Any]:
        cap = self.config.llm.max_tokens
        params: dict[str, Any] = {"max_tokens": min(max_tokens, cap) if cap else max_tokens,
                                  "temperature": self.config.llm.temperature if temperature is None else temperature}
        if self.endpoint.provider == "local":
            params["seed"] = self.config.seed
        return params

    def _story_params(self, options: StoryOptions) -> dict[str, Any]:
        params = self._llm_params(load_catalog().lengths[options.length]["max_tokens"][options.language])
        if self.recipe.stops:
            stops = load_catalog().prompts["stop"][options.language]
            params["stop"] = stops if self.endpoint.provider == "local" else stops[:4]  # OpenAI takes at most 4
        if self.recipe.frequency_penalty:
            params["frequency_penalty"] = self.recipe.frequency_penalty
        return params

    def _prompt(self, kept: list[str], options: StoryOptions) -> tuple[list[dict[str, str]], str]:
        """The story's messages (what the input rails check) and the opening to prefill ("" for none)."""
        messages = story_messages(kept, options, recipe=self.recipe, prefill=self.prefills)
        return messages, story_opening(kept, options) if self.prefills else ""

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
        """(kept, dropped) labels: when the configuration screens labels, each one goes through its input
        rails like typed text (class names come from a user's folder names and can carry an injection)."""
        if not self.rails.labels:
            return list(labels), []
        kept = [label for label in labels if not self.check_input([{"role": "user", "content": label}]).blocked]
        return kept, [label for label in labels if label not in kept]

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
        teller = self.for_language(options.language)
        messages, opening = teller._prompt(kept, options)
        return teller._complete(messages, kept, dropped, options, started, opening)

    def continue_story(self, previous: StoryResult, instruction: str = "") -> StoryResult:
        """The next part of ``previous`` (the new instruction goes through the same rails)."""
        if previous.blocked:
            raise StoryError("A blocked story cannot be continued: generate a new one.")
        teller = self.for_language(previous.options.language)
        messages = continue_messages(previous, instruction, recipe=teller.recipe, prefill=teller.prefills)
        return teller._complete(messages, previous.labels, previous.dropped_labels, previous.options,
                                time.perf_counter())

    def _complete(self, messages: list[dict[str, str]], kept: list[str], dropped: list[str],
                  options: StoryOptions, started: float, opening: str = "") -> StoryResult:
        params = self._story_params(options)
        if self.rails.guarded and (verdict := self.check_input(messages)).blocked:
            # Checked here, as the stream does: with a prefilled opening the messages end on the assistant's
            # turn, and NeMo's generate_async then runs no input rails at all.
            timings = {"input_rails_s": time.perf_counter() - started, "total_s": time.perf_counter() - started}
            return self._blocked(kept, dropped, options, verdict, self._refusal(), timings)
        if opening:
            messages = [*messages, {"role": "assistant", "content": opening}]
        story_started = time.perf_counter()
        if self.rails.guarded:
            app = self.app
            app.llm.last_error = None
            try:
                response = rails_loop().run(app.generate_async(messages=messages, options={
                    "rails": self._generation_rails(), "log": {"activated_rails": True}, "llm_params": params}))
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
        text = complete_sentences((opening + text).strip())
        closing, tokens = self._closing(messages[:-1] if opening else messages, text, options, tokens)
        if closing is not None and (verdict := self.check_output(closing)).blocked:
            timings["total_s"] = time.perf_counter() - started
            return self._blocked(kept, dropped, options, verdict, DEFAULT_REFUSAL, timings)
        return self._finish(text + (closing or ""), kept, dropped, options, started, timings, tokens, opening)

    def _closing(self, messages: list[dict[str, str]], text: str, options: StoryOptions, tokens: int
                 ) -> tuple[str | None, int]:
        """The style's closing line (the fable's moral) when the story lacks it: prefilled, one short line."""
        closing = load_catalog().styles[options.style].get("closing", {}).get(options.language)
        if not (closing and self.recipe.closing and self.prefills) or closing.strip() in text:
            return None, tokens
        with endpoint_errors(self.endpoint):
            reply = self.client.chat.completions.create(
                model=self.endpoint.model, messages=[*messages, {"role": "assistant", "content": text + closing}],
                stop=["\n\n"], **self._llm_params(CLOSING_TOKENS))
        written = (reply.choices[0].message.content or "").strip()  # a base model may start on a new line
        line = complete_sentences(written.splitlines()[0].strip() if written else "")
        tokens += reply.usage.completion_tokens if reply.usage else 0
        if not line:
            return None, tokens
        return closing + (" " if options.language == "en" else "") + line, tokens

    def _finish(self, text: str, kept: list[str], dropped: list[str], options: StoryOptions, started: float,
                timings: dict[str, float], tokens: int, opening: str = "") -> StoryResult:
        prompt_started = time.perf_counter()
        sentence, image_prompt = self.image_prompt(text, kept, options.style)
        verdict = self.check_output(image_prompt)
        timings["image_prompt_s"] = time.perf_counter() - prompt_started
        timings["total_s"] = time.perf_counter() - started
        if verdict.blocked:
            return self._blocked(kept, dropped, options, replace(verdict, rail=f"{verdict.rail} (image prompt)"),
                                 DEFAULT_REFUSAL, timings)
        return self._result(kept, dropped, options, text=text, image_prompt=image_prompt, message=text,
                            timings=timings, tokens=tokens, opening=opening, image_sentence=sentence)

    def image_prompt(self, story: str, labels: list[str], style: str) -> tuple[str, str]:
        """Distil a story into a short English image prompt (one low-temperature call, then cleaned).

        Returns the model's own sentence and the cleaned, anchored prompt.
        """
        messages = image_prompt_messages(story, labels=labels if self.prefills else None)
        opening = messages[-1]["content"] if self.prefills else ""
        with endpoint_errors(self.endpoint):
            reply = self.client.chat.completions.create(
                model=self.endpoint.model, messages=messages, stop=["\n"],
                **self._llm_params(IMAGE_PROMPT_TOKENS, temperature=0.0))
        sentence = opening + (reply.choices[0].message.content or "")
        return sentence, clean_image_prompt(sentence, labels, style)

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
        teller = self.for_language(options.language)
        messages, opening = teller._prompt(kept, options)
        stream._chunks = teller._stream_chunks(stream, messages, kept, dropped, options, started, opening)
        return stream

    def _stream_chunks(self, stream: StoryStream, messages: list[dict[str, str]], kept: list[str],
                       dropped: list[str], options: StoryOptions, started: float, opening: str = "") -> Iterator[str]:
        """Input rails on ``messages``, then the opening (built from screened labels and the catalog), then the
        model's chunks, each passed by the output rails, then the closing line."""
        params = self._story_params(options)
        timings: dict[str, float] = {}
        verdict = self.check_input(messages) if self.rails.guarded else Verdict.allowed()
        timings["input_rails_s"] = time.perf_counter() - started
        if verdict.blocked:
            stream.result = self._blocked(kept, dropped, options, verdict, self._refusal(), timings)
            return
        story_started = time.perf_counter()
        pieces: list[str] = []
        prompt = [*messages, {"role": "assistant", "content": opening}] if opening else messages
        for chunk in self._raw_stream(prompt, params):
            if (blocked := self._chunk_verdict(chunk, not pieces)) is not None:
                timings["story_s"] = time.perf_counter() - story_started
                message = chunk if blocked.rail_type == "dialog" else self._refusal()
                stream.result = self._blocked(kept, dropped, options, blocked, message, timings)
                return
            if not pieces:
                timings["first_chunk_s"] = time.perf_counter() - started
                if opening:  # shown once the first chunk passed the rails (a dialog refusal replaces everything)
                    yield opening
            pieces.append(chunk)
            yield chunk
        timings["story_s"] = time.perf_counter() - story_started
        text = complete_sentences((opening + "".join(pieces)).strip())
        closing, tokens = self._closing(messages, text, options, len(pieces))
        if closing is not None:
            if (verdict := self.check_output(closing)).blocked:
                stream.result = self._blocked(kept, dropped, options, verdict, self._refusal(), timings)
                return
            yield closing
        stream.result = self._finish(text + (closing or ""), kept, dropped, options, started, timings, tokens,
                                     opening)

    def _raw_stream(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Iterator[str]:
        if not self.rails.guarded:
            with endpoint_errors(self.endpoint):
                for chunk in self.client.chat.completions.create(model=self.endpoint.model, messages=messages,
                                                                 stream=True, **params):
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
            return
        loop, app, rails = rails_loop(), self.app, self._generation_rails()
        app.llm.last_error = None
        chunks = loop.call(lambda: app.stream_async(messages=messages, options={"rails": rails, "llm_params": params}))
        yield from loop.iterate(chunks)

    def _generation_rails(self) -> list[str]:
        """The rails NeMo runs while the model writes: the input rails ran before (``check_input``)."""
        return ["dialog", "output"] if self.rails.output else ["dialog"]

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
                  teller: StoryTeller, output_rails: list[Any] | None = None) -> dict[str, Any]:
    """The ledger's ``story`` entry: red-team rates of the configured rails, story latency and speed, endpoint."""
    written = [s for s in stories if not s.blocked]
    # The configured rails' headline rates come from the frozen test part when it was scored (issue 16); the
    # others are reported beside it in "redteam".
    mine = [r for r in redteam if r.configuration == teller.rails.name and not r.skipped]
    configured = next((r for r in mine if getattr(r, "split", "") == "test"), mine[0] if mine else None)
    metrics: dict[str, Any] = {
        "endpoint": teller.endpoint.describe(),
        "rails": teller.rails.name,
        "p50_latency_s": statistics.median(s.timings["total_s"] for s in written) if written else None,
        "tokens_per_second": statistics.median(s.tokens_per_second for s in written) if written else None,
        "redteam": {" ".join(filter(None, [r.configuration, getattr(r, "split", "")])): {
            "block_rate": r.block_rate, "false_positive_rate": r.false_positive_rate, "prompts": len(r.items),
            "by_category": r.by_category, "by_language": r.by_language()} for r in redteam if not r.skipped},
    }
    if configured is not None:
        metrics.update(block_rate=configured.block_rate, false_positive_rate=configured.false_positive_rate,
                       redteam_prompts=len(configured.items), redteam_split=getattr(configured, "split", ""),
                       p50_rails_s=configured.p50_latency_s)
    if output_rails:  # OutputRailResult rows: catch and false-positive rates on labeled story passages
        metrics["output_rails"] = {f"{r.configuration} {r.split}".strip(): r.row() for r in output_rails}
    if overhead is not None:
        metrics.update(rails_overhead=overhead.overhead, overhead_rails=overhead.rails,
                       unguarded_story_s=statistics.median(overhead.unguarded_s),
                       guarded_story_s=statistics.median(overhead.guarded_s))
    return {k: v for k, v in metrics.items() if v is not None}
