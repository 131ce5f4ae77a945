"""The page's words in English and Chinese, from one catalog (``data/app/messages.yaml``).

``messages("zh")("chain")`` is the label of the chain button in Chinese; ``.rail(name)`` says which rail
blocked a story in plain words; ``.choice(key)`` labels a story or picture choice. Every entry has both
languages with the same ``{fields}``: a missing translation is a test failure, not a blank on stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from course_utils.core.config import REPO_ROOT
from course_utils.core.errors import CourseError

MESSAGES_FILE = REPO_ROOT / "data" / "app" / "messages.yaml"
IMAGE_PROMPT = " (image prompt)"  # genai.story names a rail that blocked the picture's prompt "<rail> (image prompt)"


class MessageError(CourseError, LookupError):
    """The catalog has no such entry or language (a bug in the app or the catalog, not the user's)."""


@dataclass(frozen=True)
class Catalog:
    """The catalog file: language names, the page's words, the rails' plain words, the choices' labels."""

    languages: dict[str, str]
    ui: dict[str, dict[str, str]]
    rails: dict[str, dict[str, str]]
    choices: dict[str, dict[str, str]]


@lru_cache(maxsize=4)
def load_messages(path: Path = MESSAGES_FILE) -> Catalog:
    """Read the catalog (once per process)."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Catalog(data["languages"], data["ui"], data["rails"], data["choices"])


@dataclass(frozen=True)
class Messages:
    """The catalog in one language: call it with a key and the entry's fields."""

    language: str
    catalog: Catalog

    def __call__(self, key: str, **fields: Any) -> str:
        """The page's words for ``key``, formatted with ``fields``."""
        if key not in self.catalog.ui:
            raise MessageError(f"The app's message catalog has no entry {key!r} ({MESSAGES_FILE}).")
        return self.catalog.ui[key][self.language].format(**fields)

    def rail(self, name: str | None) -> str:
        """Which rail blocked, in plain words (``StoryResult.blocked_by``); an unknown rail by its name."""
        name = name or "?"
        if name.endswith(IMAGE_PROMPT):  # the story's rails, run again on the picture's prompt
            return self.catalog.rails["image_prompt"][self.language].format(rail=self.rail(name[:-len(IMAGE_PROMPT)]))
        words = self.catalog.rails.get(name)
        if words is None:
            return self.catalog.rails["unknown"][self.language].format(name=name)
        return words[self.language]

    def choice(self, key: str) -> str:
        """The label of a story style, theme, picture look or scheduler (its key when the catalog has none)."""
        words = self.catalog.choices.get(key)
        return words[self.language] if words else key.replace("_", " ")


def messages(language: str, path: Path = MESSAGES_FILE) -> Messages:
    """The catalog in ``language`` ("en" or "zh")."""
    catalog = load_messages(path)
    if language not in catalog.languages:
        raise MessageError(f"The app speaks {', '.join(catalog.languages)}, not {language!r}.")
    return Messages(language, catalog)
