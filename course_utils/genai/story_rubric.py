"""The story rubric: does a story follow its labels, its style and its language? Scored automatically.

Each story gets six yes/no marks (``StoryScore``):

* ``labels``: every label is mentioned, by one of its names in ``data/story/labels.yaml`` (the label itself, a
  synonym, a Chinese translation) or its own words;
* ``style``: the style's form rule in ``data/story/catalog.yaml`` (``check``) holds: a poem is short lines, not
  prose paragraphs; a fairy tale begins with "Once upon a time"; a fable ends with a moral …;
* ``right_language``: a language identifier (py3langid, trained on 97 languages) names the requested language
  (for Chinese: any language of the macrolanguage zh, since it tells Mandarin from Wu and Cantonese);
* ``sentences``: the story ends on a whole sentence (a poem: on a whole line);
* ``no_leak``: no instruction text from the prompt templates and no chat markup appears in the story;
* ``image_labels``: every label survives into the image prompt (``image_sentence_labels``: into the model's own
  sentence, before the course anchors the labels onto it);

plus the latency of story + image prompt and the tokens per second, and two diagnostics that leave out what the
course prefilled (the opening, the closing marker): ``own_labels`` and ``own_style`` say whether the model itself
kept to the subject and to the style's keywords. Add a style's ``check`` or a label's names
to the data files and the rubric uses them: no code changes. ``run_rubric`` writes a fixed request set
(``data/story/rubric_requests.yaml``: a dev split to tune on, a test split to report) and caches every row, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from course_utils.core.lazy import lazy_import
from course_utils.genai.story import (
    BASELINE,
    STORY_DATA,
    Catalog,
    PromptRecipe,
    StoryOptions,
    StoryResult,
    StoryTeller,
    label_names,
    load_catalog,
    story_opening,
)

REQUESTS_FILE = STORY_DATA / "rubric_requests.yaml"
CRITERIA = ("labels", "style", "right_language", "sentences", "no_leak", "image_labels")
RATES = ("all", "own labels", "own style")  # every criterion at once; labels and style in the model's own words
SENTENCE_ENDS = ".!?。！？…"
CLOSING_QUOTES = "\"'”’»」』)）"
CHAT_MARKUP = ("<|", "<start_of", "<end_of", "<bos>", "<eos>", "im_start", "im_end")
ROLE_LINE = re.compile(r"^\s*(system|user|assistant)\s*:", re.IGNORECASE | re.MULTILINE)
# The identifier tells Mandarin, Wu and Cantonese apart; all three are written Chinese, the macrolanguage "zh".
SAME_LANGUAGE = {"zh": {"zh", "wuu", "yue"}}
ARTICLE = re.compile(r"^(a|an|the|some)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class RubricRequest:
    """One fixed story request of the rubric set."""

    id: str
    split: str
    language: str
    labels: tuple[str, ...]
    style: str
    theme: str
    length: str

    @property
    def options(self) -> StoryOptions:
        """The request as story options."""
        return StoryOptions(style=self.style, theme=self.theme, length=self.length, language=self.language)


def load_requests(path: Path = REQUESTS_FILE, split: str | None = None,
                  languages: Sequence[str] | None = None) -> list[RubricRequest]:
    """The fixed request set, or one split of it ("dev" or "test"), optionally for some languages only."""
    rows = yaml.safe_load(path.read_text(encoding="utf-8"))["requests"]
    requests = [RubricRequest(**{**row, "labels": tuple(row["labels"])}) for row in rows]
    return [r for r in requests if (split is None or r.split == split) and (not languages or r.language in languages)]


# The prompt changes, measured one after the other on the dev split (each adds one switch to the one before).
RECIPES: dict[str, PromptRecipe] = {"baseline": BASELINE}
for _step, _switch in (("user_message", {"user_message": True}), ("outline", {"outline": True}),
                       ("prefill", {"prefill": True}), ("stops", {"stops": True}), ("closing", {"closing": True}),
                       ("short", {"short": True}), ("penalty", {"frequency_penalty": 0.5})):
    RECIPES[_step] = replace(list(RECIPES.values())[-1], name=_step, **_switch)
RECIPES["tuned"] = PromptRecipe()


# --- The criteria -----------------------------------------------------------------------------------------


def _english_pattern(name: str) -> str:
    words = [re.escape(word) for word in ARTICLE.sub("", name.strip()).split()]
    return r"\b" + r"[\s-]+".join(words) + r"(s|es)?\b"


def label_mentioned(text: str, label: str, language: str) -> bool:
    """True when the story names the label: one of its names in that language, or in English, or its words."""
    names = {*label_names(label, language), *label_names(label, "en"), label}
    lowered = text.lower()
    for name in names:
        if re.search(r"[\u4e00-\u9fff]", name):
            if name in text:
                return True
        elif re.search(_english_pattern(name.lower()), lowered):
            return True
    return False


def missing_labels(text: str, labels: Iterable[str], language: str) -> list[str]:
    """The labels a story never names."""
    return [label for label in labels if not label_mentioned(text, label, language)]


def _contains(text: str, term: str) -> bool:
    if re.search(r"[\u4e00-\u9fff0-9]", term):
        return term in text
    return re.search(r"\b" + re.escape(term.lower()), text.lower()) is not None


def follows_style(text: str, style: str, language: str, catalog: Catalog | None = None,
                  own_words: str | None = None) -> bool:
    """True when the story has the style's form (the ``check`` of its catalog entry; no check: True).

    ``own_words``: the part the model wrote itself (without the prefilled opening and closing); the keyword
    rules (``mentions``, ``ends_with``) are then checked on it alone.
    """
    check: dict[str, Any] = (catalog or load_catalog()).styles[style].get("check", {})
    body = text.strip()
    words = body if own_words is None else own_words
    if "starts_with" in check and not any(body.lower().startswith(term.lower())
                                          for term in check["starts_with"][language]):
        return False
    if "mentions" in check and not any(_contains(words, term) for term in check["mentions"][language]):
        return False
    if "ends_with" in check:
        tail = words[-max(len(words) // 4, 120):]
        if not any(_contains(tail, term) for term in check["ends_with"][language]):
            return False
    if "lines" in check:
        rule = check["lines"]
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        too_long = [line for line in lines if (len(line) > rule["max_chars"] if language == "zh"
                                               else len(line.split()) > rule["max_words"])]
        if len(lines) < rule["min_lines"] or too_long:
            return False
    return True


def identify_language(text: str) -> str:
    """The language a language identifier (py3langid, 97 languages) names for the text, as an ISO 639-1 code."""
    code, _ = lazy_import("py3langid", "story", "the story rubric").classify(text)
    return str(code)


def whole_sentences(text: str, style: str) -> bool:
    """True when the story ends on a whole sentence; a poem may end its last line with any punctuation."""
    body = text.strip().rstrip(CLOSING_QUOTES).rstrip()
    ends = SENTENCE_ENDS + (",;:，；：、" if style == "poem" else "")
    return bool(body) and body[-1] in ends


@lru_cache(maxsize=4)
def instruction_fragments(language: str) -> tuple[str, ...]:
    """Pieces of the prompt templates' own words (fields removed): seeing one in a story means the prompt leaked."""
    catalog = load_catalog()
    templates = [value[language] for value in catalog.prompts.values()
                 if isinstance(value, dict) and isinstance(value.get(language), str)]
    templates.append(catalog.prompts["image_prompt"])
    fragments: set[str] = set()
    for template in templates:
        for piece in re.split(r"\{[a-z_A-Z]+\}|[.!?。！？“”\"()（）\n,，、]", template):
            piece = piece.strip(" ,，、：:")
            long_enough = len(piece) >= 5 if re.search(r"[\u4e00-\u9fff]", piece) else len(piece.split()) >= 4
            if long_enough:
                fragments.add(piece)
    markers = {"en": ["Theme:", "Outline:"], "zh": ["主题：", "提纲："]}.get(language, [])
    return tuple(sorted(fragments | set(markers)))


def leaked_prompt(text: str, language: str) -> str | None:
    """The first instruction fragment or chat markup found in the story, or None."""
    lowered = text.lower()
    for fragment in (*CHAT_MARKUP, *instruction_fragments(language)):
        if fragment.lower() in lowered:
            return fragment
    role = ROLE_LINE.search(text)
    return role.group(0).strip() if role else None


# --- Scoring ----------------------------------------------------------------------------------------------


@dataclass
class StoryScore:
    """One request's story, image prompt, marks and timings."""

    request: str
    split: str
    language: str
    style: str
    length: str
    labels: list[str]
    model: str
    recipe: str
    text: str
    image_prompt: str
    image_sentence: str
    blocked_by: str | None
    marks: dict[str, bool]
    missing: list[str]
    detected_language: str
    leak: str | None
    image_sentence_labels: bool
    own_labels: bool  # the labels named in the model's own words (the prefilled opening left out)
    own_style: bool  # the style's keyword rules hold in the model's own words
    total_s: float
    story_s: float
    tokens: int
    tokens_per_second: float

    @property
    def passed(self) -> bool:
        """True when the story meets every criterion."""
        return all(self.marks.values())


@dataclass
class Generation:
    """What one request produced: the cached part of a rubric row (scores are recomputed from it)."""

    request: str
    model: str
    recipe: str
    rails: str
    text: str
    image_prompt: str
    image_sentence: str
    blocked_by: str | None
    timings: dict[str, float]
    tokens: int

    @classmethod
    def of(cls, request: RubricRequest, result: StoryResult, recipe: str, model: str, rails: str) -> Generation:
        """The generation of a story result."""
        return cls(request.id, model, recipe, rails, result.text, result.image_prompt or "", result.image_sentence,
                   result.blocked_by, dict(result.timings), result.tokens)

    @property
    def key(self) -> str:
        """The cache key: model, recipe, rails and request (``run_rubric`` builds the same one)."""
        return f"{self.model}|{self.recipe}|{self.rails}|{self.request}"


def score_story(request: RubricRequest, generation: Generation) -> StoryScore:
    """Mark one story against its request (a blocked story fails every criterion)."""
    text, prompt = generation.text, generation.image_prompt
    missing = missing_labels(text, request.labels, request.language)
    detected = identify_language(text) if text.strip() else ""
    leak = leaked_prompt(text, request.language)
    marks = {
        "labels": bool(text) and not missing,
        "style": bool(text) and follows_style(text, request.style, request.language),
        "right_language": detected in SAME_LANGUAGE.get(request.language, {request.language}),
        "sentences": whole_sentences(text, request.style),
        "no_leak": bool(text) and leak is None,
        "image_labels": bool(prompt) and not missing_labels(prompt, request.labels, "en"),
    }
    own = _own_words(text, request, generation.recipe)
    sentence = generation.image_sentence
    story_s = generation.timings.get("story_s", 0.0)
    return StoryScore(request.id, request.split, request.language, request.style, request.length,
                      list(request.labels), generation.model, generation.recipe, text, prompt, sentence,
                      generation.blocked_by, marks, missing, detected, leak,
                      bool(sentence) and not missing_labels(sentence, request.labels, "en"),
                      bool(own) and not missing_labels(own, request.labels, request.language),
                      bool(own) and follows_style(text, request.style, request.language, own_words=own),
                      generation.timings.get("total_s", 0.0), story_s, generation.tokens,
                      generation.tokens / story_s if generation.tokens and story_s > 0 else 0.0)


def _own_words(text: str, request: RubricRequest, recipe: str) -> str:
    """The story without what the course prefilled: the style's opening and closing marker."""
    style = load_catalog().styles[request.style]
    opening = story_opening(list(request.labels), request.options)
    own = text[len(opening):] if RECIPES.get(recipe, BASELINE).prefill and text.startswith(opening) else text
    closing = style.get("closing", {}).get(request.language, "").strip()
    return own.replace(closing, " ") if closing else own


def load_generations(cache: Path) -> dict[str, Generation]:
    """The generations cached so far (a JSON object per line), by ``Generation.key``."""
    rows: dict[str, Generation] = {}
    if cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                generation = Generation(**json.loads(line))
            except (json.JSONDecodeError, TypeError):  # a line cut off by an interrupted run: written again
                continue
            rows[generation.key] = generation
    return rows


def run_rubric(teller: StoryTeller, requests: Sequence[RubricRequest], cache: Path | None = None,
               max_new: int | None = None, on_row: Callable[[StoryScore], None] | None = None) -> list[StoryScore]:
    """Write and score every request with ``teller``: cached generations are reused (and scored again, so a
    changed rubric applies to them), at most ``max_new`` new stories are written."""
    cached = load_generations(cache) if cache else {}
    scores, new = [], 0
    for request in requests:
        model = teller.for_language(request.language).config.llm.model
        key = f"{model}|{teller.recipe.name}|{teller.rails.name}|{request.id}"
        fresh = key not in cached
        if fresh:
            if max_new is not None and new >= max_new:
                continue
            result = teller.tell(list(request.labels), request.options)
            cached[key] = Generation.of(request, result, teller.recipe.name, model, teller.rails.name)
            new += 1
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with cache.open("a", encoding="utf-8") as handle:  # one whole line per row: a rerun resumes
                    handle.write(json.dumps(asdict(cached[key]), ensure_ascii=False) + "\n")
        scores.append(score_story(request, cached[key]))
        if fresh and on_row:
            on_row(scores[-1])
    return scores


def rubric_rows(scores: Sequence[StoryScore], by: Sequence[str] = ("language",)) -> list[dict[str, Any]]:
    """Pass rates per group (``by``: StoryScore fields such as language, split, model, recipe, style)."""
    groups: dict[tuple[Any, ...], list[StoryScore]] = {}
    for score in scores:
        groups.setdefault(tuple(getattr(score, name) for name in by), []).append(score)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["stories"] = len(members)
        for criterion in CRITERIA:
            row[criterion] = sum(s.marks[criterion] for s in members) / len(members)
        row["all"] = sum(s.passed for s in members) / len(members)
        row["own labels"] = sum(s.own_labels for s in members) / len(members)
        row["own style"] = sum(s.own_style for s in members) / len(members)
        row["p50 total s"] = statistics.median(s.total_s for s in members)
        row["tokens/s"] = statistics.median(s.tokens_per_second for s in members)
        rows.append(row)
    return rows


def rubric_markdown(scores: Sequence[StoryScore], by: Sequence[str] = ("language",)) -> str:
    """``rubric_rows`` as a Markdown table, rates in percent."""
    rows = rubric_rows(scores, by)
    if not rows:
        return "(no stories scored)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{value:.0%}" if column in (*CRITERIA, *RATES) else
                 f"{value:.1f}" if isinstance(value, float) else str(value) for column, value in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_markdown(scores: Sequence[StoryScore]) -> str:
    """One row per story: its marks (✓/✗), what was missing or leaked, and its latency."""
    header = ["request", "recipe", "model", *CRITERIA, "missing / leak", "total s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for score in scores:
        marks = ["✓" if score.marks[criterion] else "✗" for criterion in CRITERIA]
        notes = ", ".join(score.missing + ([repr(score.leak)] if score.leak else []))
        lines.append("| " + " | ".join([f"{score.request} ({score.style})", score.recipe, score.model, *marks,
                                        notes, f"{score.total_s:.1f}"]) + " |")
    return "\n".join(lines)
