"""Translation files: the prose of every notebook in another language, keyed by cell id, checked against the source.

One YAML file per notebook and language, ``notebooks/translations/<language>/NN_name.yaml``, holds an entry for
each Markdown cell of ``notebooks/NN_name.ipynb``: the translated text and the sha256 of the English text it
translates. When an English cell changes, its hash no longer matches and the entry is **stale**; a Markdown cell
without an entry is **untranslated**; an entry whose cell is gone is an **orphan**. A translation that loses what
must not be translated (fenced and inline code, formulas, inline links' targets, numbers written with digits,
headings, table rows), or whose ``*`` bold and italic markers will not render, is **mangled**.
``translation_issues`` lists them all (``python -m course_utils translations`` prints them, with the English text
to translate and the hash to record) and a test fails on any.

``translator`` turns the files into the ``Translate`` function the editions take: a cell with a current entry gets
its translation, any other keeps its English text (``make editions`` says how many did), so a change to the
English never breaks the build, only shows up.

Only Markdown is translated: code cells, their comments and what they print stay as in the source, so a
translated edition runs exactly the code CI runs. Terms follow ``docs/glossary.md``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nbformat
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from course_utils.core.atomic import write_text_atomic
from course_utils.core.errors import CourseError, first_validation_problem
from course_utils.core.notebooks import NOTEBOOKS_DIR, course_notebooks
from course_utils.lessons.editions import SOURCE_LANGUAGE, EditionFile, build_editions

TRANSLATIONS_DIR = NOTEBOOKS_DIR / "translations"
HEADER = ("# The {language} prose of notebooks/{notebook}.ipynb, one entry per Markdown cell, by cell id.\n"
          "# `source_sha256` is the sha256 of the English text the entry translates: when the English cell changes,\n"
          "# the entry is stale (python -m course_utils translations lists it, with the new text and hash).\n"
          "# Terms: docs/glossary.md. Keep code, formulas, link targets, numbers and headings as they are.\n")
IssueKind = Literal["untranslated", "stale", "orphan", "mangled"]


class TranslationError(CourseError, ValueError):
    """A translation file that cannot be read; the message names the file and what to fix."""


class TranslatedCell(BaseModel):
    """One Markdown cell's translation and the hash of the English text it was made from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    text: str = Field(min_length=1)


class TranslationFile(BaseModel):
    """A notebook's translation file: its language, its notebook and an entry per Markdown cell id."""

    model_config = ConfigDict(extra="forbid")
    language: str
    notebook: str
    cells: dict[str, TranslatedCell]


@dataclass(frozen=True)
class TranslationIssue:
    """A cell whose translation is missing, out of date, left over or mangled, with the English to work from."""

    notebook: str
    cell_id: str
    kind: IssueKind
    detail: str
    english: str
    english_sha256: str


def text_sha256(text: str) -> str:
    """The hash an entry records of the English text it translates."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def translation_path(language: str, notebook: str, folder: Path = TRANSLATIONS_DIR) -> Path:
    """Where the ``language`` prose of ``notebook`` (a stem, ``NN_name``) lives."""
    return Path(folder) / language / f"{notebook}.yaml"


def translated_languages(folder: Path = TRANSLATIONS_DIR) -> list[str]:
    """The languages that have translation files: the folders of ``folder`` that hold a ``*.yaml`` (not hidden)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and any(p.glob("*.yaml"))) if folder.is_dir() else []


class _TranslationLoader(yaml.SafeLoader):
    """Reads keys as the text they are (cell id 01234567 is no octal number) and refuses a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        mapping: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else self.construct_object(key_node, deep)
            if key in mapping:
                raise yaml.MarkedYAMLError(problem=f"{key!r} is given twice", problem_mark=key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep)
        return mapping


def read_translation(path: Path) -> TranslationFile:
    """One translation file, validated; a broken one raises a ``TranslationError`` naming the file and the fix."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TranslationLoader)
    except UnicodeDecodeError:
        raise TranslationError(f"{path}: not UTF-8 text; save it as UTF-8.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TranslationError(f"{path}: not valid YAML ({where}{problem}); fix the file.") from None
    if data is None:
        raise TranslationError(f"{path}: the file is empty; give it language, notebook and cells, or delete it.")
    try:
        return TranslationFile.model_validate(data)
    except ValidationError as error:
        problem = first_validation_problem(error, top="the file")
        raise TranslationError(f"{path}: {problem} (see the comment at the top of the file).") from None


class _BlockStrings(yaml.SafeDumper):
    """Writes multi-line text as ``|`` blocks, which a translator reads and edits like the Markdown it is."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_BlockStrings.add_representer(str, _represent_text)


def write_translation(path: Path, translation: TranslationFile) -> None:
    """Write ``translation`` (atomically) with the header that tells a translator how the file works."""
    body = yaml.dump(translation.model_dump(), Dumper=_BlockStrings, allow_unicode=True, sort_keys=False, width=10**6)
    write_text_atomic(path, HEADER.format(language=translation.language, notebook=translation.notebook) + body)


def load_translations(language: str, folder: Path = TRANSLATIONS_DIR) -> dict[str, TranslationFile]:
    """Every translation file of ``language``, by notebook stem."""
    files = {}
    for path in sorted((Path(folder) / language).glob("*.yaml")):
        translation = read_translation(path)
        if (translation.language, translation.notebook) != (language, path.stem):
            raise TranslationError(f"{path}: says language {translation.language!r}, notebook "
                                   f"{translation.notebook!r}; it must say {language!r}, {path.stem!r}.")
        files[path.stem] = translation
    return files


# What a translation keeps verbatim: fenced code, inline code, formulas, inline link and image targets, numbers.
_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_KEPT = {
    "fenced code": _FENCED,
    "inline code": re.compile(r"`[^`\n]+`"),
    "formulas": re.compile(r"\$[^$\n]+\$"),
    "link targets": re.compile(r"\]\(([^)\s]+)\)"),
    "numbers": re.compile(r"(?<![A-Za-z0-9_.])\d+(?:[.,]\d+)*"),
}
_HEADING = re.compile(r"^(#{1,6}) ", re.MULTILINE)
_TABLE_ROW = re.compile(r"^\s*\|", re.MULTILINE)


def structure_differences(english: str, translation: str) -> list[str]:
    """What ``translation`` lost or added of what must stay as in ``english`` (empty when nothing)."""
    found = []
    for name, pattern in _KEPT.items():
        source, target = Counter(pattern.findall(english)), Counter(pattern.findall(translation))
        if name == "numbers":  # a number written twice in one language and once in the other is still kept
            source, target = Counter(set(source)), Counter(set(target))
        if source != target:
            lost, added = sorted((source - target).elements()), sorted((target - source).elements())
            parts = [f"missing {', '.join(lost)}"] * bool(lost) + [f"not in the English {', '.join(added)}"] * bool(added)
            found.append(f"{name}: {'; '.join(parts)}")
    english, translation = _FENCED.sub("", english), _FENCED.sub("", translation)  # a `# comment` is no heading
    if _HEADING.findall(english) != _HEADING.findall(translation):
        found.append(f"headings: {_HEADING.findall(english)} in the English, {_HEADING.findall(translation)} here")
    if len(_TABLE_ROW.findall(english)) != len(_TABLE_ROW.findall(translation)):
        found.append("table rows: not as many as in the English")
    return found


def _character_kind(text: str, index: int) -> str:
    if index < 0 or index >= len(text) or text[index].isspace():
        return "space"
    return "punctuation" if unicodedata.category(text[index])[0] in "PS" else "word"


def _is_bullet(paragraph: str, index: int) -> bool:
    line_start = paragraph.rfind("\n", 0, index) + 1
    return not paragraph[line_start:index].strip() and paragraph[index + 1:index + 2] == " "


def emphasis_problems(text: str) -> list[str]:
    """Bold or italic markers that CommonMark will not honour, e.g. ``**前置内容：**第`` (shown as literal stars).

    A closing ``**`` right after punctuation must be followed by a space or punctuation, and an opening one right
    before punctuation must follow one: Chinese, with its full-width punctuation and no spaces, breaks the rule
    where English never does. Markers pair up in order within a paragraph (code and formulas left out).
    """
    found = []
    for paragraph in re.sub(r"`[^`\n]+`|\$[^$\n]+\$", "x", _FENCED.sub("", text)).split("\n\n"):
        for marker in ("**", "*"):
            runs = [m.start() for m in re.finditer(rf"(?<!\*){re.escape(marker)}(?!\*)", paragraph)
                    if not (marker == "*" and _is_bullet(paragraph, m.start()))]
            for order, start in enumerate(runs):
                before = _character_kind(paragraph, start - 1)
                after = _character_kind(paragraph, start + len(marker))
                opens, closes = order % 2 == 0, order % 2 == 1
                if (opens and (before, after) == ("word", "punctuation")) or (
                        closes and (before, after) == ("punctuation", "word")):
                    where = paragraph[max(start - 1, 0):start + len(marker) + 1]
                    found.append(f"emphasis: {marker} {'opens' if opens else 'closes'} in {where!r}, which does not "
                                 "render; put a space beside it or move the punctuation outside the markers")
    return found


def _markdown_cells(notebook: Path) -> dict[str, str]:
    """The Markdown cells with prose to translate (an empty one has none), by id."""
    cells = nbformat.read(notebook, as_version=4).cells
    for position, cell in enumerate(cells, start=1):
        if not cell.get("id"):
            raise TranslationError(f"{notebook.name}: cell {position} has no id, which translations are keyed by; "
                                   "save the notebook as nbformat 4.5 or later (JupyterLab does) to give it ids.")
    return {cell.id: cell.source for cell in cells if cell.cell_type == "markdown" and cell.source.strip()}


def _language_files(language: str, folder: Path) -> dict[str, TranslationFile]:
    files = load_translations(language, folder)
    if not files:
        raise TranslationError(f"no translation files for {language!r} in {Path(folder) / language}; the languages "
                               f"there: {', '.join(translated_languages(folder)) or 'none'} (the source is "
                               f"{SOURCE_LANGUAGE!r}).")
    return files


def translation_issues(language: str, source_dir: Path = NOTEBOOKS_DIR,
                       folder: Path = TRANSLATIONS_DIR) -> list[TranslationIssue]:
    """Every untranslated, stale, orphaned or mangled cell of ``language``, in course and cell order."""
    files = _language_files(language, folder)
    notebooks = course_notebooks(source_dir)
    issues = []
    for notebook in notebooks:
        cells = files.get(notebook.stem, TranslationFile(language=language, notebook=notebook.stem, cells={})).cells
        markdown = _markdown_cells(notebook)
        for cell_id, english in markdown.items():
            digest, entry = text_sha256(english), cells.get(cell_id)
            if entry is None:
                issues.append(TranslationIssue(notebook.stem, cell_id, "untranslated", "no entry", english, digest))
            elif entry.source_sha256 != digest:
                issues.append(TranslationIssue(notebook.stem, cell_id, "stale", "the English changed since",
                                               english, digest))
            else:
                issues += [TranslationIssue(notebook.stem, cell_id, "mangled", difference, english, digest)
                           for difference in structure_differences(english, entry.text)
                           + emphasis_problems(entry.text)]
        issues += [TranslationIssue(notebook.stem, cell_id, "orphan", "no such Markdown cell in the notebook", "", "")
                   for cell_id in sorted(cells.keys() - markdown.keys())]
    issues += [TranslationIssue(stem, "-", "orphan", f"no notebook {stem}.ipynb: remove or rename the file", "", "")
               for stem in sorted(files.keys() - {notebook.stem for notebook in notebooks})]
    return issues


@dataclass
class Translator:
    """The ``Translate`` of a language's files: current entries translate, other cells stay English (noted)."""

    cells: Mapping[str, Mapping[str, TranslatedCell]]
    kept_english: set[tuple[str, str]] = field(default_factory=set)

    def __call__(self, notebook: str, cell_id: str, text: str) -> str:
        """The translation of this cell when it has a current one, else ``text`` (and the cell is noted)."""
        if not text.strip():
            return text
        entry = self.cells.get(notebook, {}).get(cell_id)
        if entry is None or entry.source_sha256 != text_sha256(text):
            self.kept_english.add((notebook, cell_id))
            return text
        return entry.text


def translator(language: str, folder: Path = TRANSLATIONS_DIR) -> Translator:
    """The ``Translate`` function ``build_editions`` takes for ``language``, read from its translation files."""
    files = _language_files(language, folder)
    return Translator({stem: translation.cells for stem, translation in files.items()})


def describe_issues(issues: Iterable[TranslationIssue], show_english: bool = False) -> list[str]:
    """Lines for a person to act on: one per issue, with the English text and its hash when ``show_english``."""
    lines = []
    for issue in issues:
        lines.append(f"{issue.notebook} {issue.cell_id}: {issue.kind} ({issue.detail})")
        if show_english and issue.english:
            lines += [f"  source_sha256: {issue.english_sha256}",
                      *(f"  | {line}" for line in issue.english.splitlines())]
    return lines


def build_language_editions(out_dir: Path, language: str, source_dir: Path = NOTEBOOKS_DIR,
                            folder: Path = TRANSLATIONS_DIR) -> tuple[list[EditionFile], set[tuple[str, str]]]:
    """Every edition in ``language`` (the source's, or one with translation files), and the cells kept in English."""
    if language == SOURCE_LANGUAGE:
        return build_editions(out_dir, source_dir), set()
    translate = translator(language, folder)
    return build_editions(out_dir, source_dir, language, translate), translate.kept_english
