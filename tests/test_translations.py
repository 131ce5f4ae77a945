"""The Chinese edition's translation files (course_utils.lessons.translations): complete, current, intact."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from course_utils.cli import main
from course_utils.core.config import REPO_ROOT
from course_utils.core.notebooks import course_notebooks
from course_utils.lessons.editions import render_edition
from course_utils.lessons.translations import (
    TranslatedCell,
    TranslationError,
    TranslationFile,
    build_language_editions,
    describe_issues,
    emphasis_problems,
    load_translations,
    structure_differences,
    text_sha256,
    translation_issues,
    translation_path,
    translator,
    write_translation,
)

NOTEBOOKS = course_notebooks()
CHINESE = "zh-CN"
# Terms every translation must render as the glossary does, wherever the English prose uses them.
GLOSSARY_TERMS = {r"\bquantiz": "量化", r"\bcalibrat": "校准", r"\bprun": "剪枝", r"\binference\b": "推理",
                  r"\bdynamic shape": "动态形状", r"\btiming cache": "计时缓存", r"\bguardrail|\brails?\b": "护栏",
                  r"\bdistillation\b": "蒸馏", r"\bfine-tun": "微调"}


def test_every_markdown_cell_of_the_chinese_edition_is_translated_current_and_intact() -> None:
    issues = translation_issues(CHINESE)
    assert not issues, "\n".join(describe_issues(issues))
    assert main(["translations", CHINESE]) == 0


def _prose(text: str) -> str:
    """``text`` without code, links' targets and names that hold a term (Torch-Pruning, NeMo Guardrails)."""
    text = re.sub(r"```.*?```", " ", text, flags=re.DOTALL)
    return re.sub(r"`[^`\n]+`|\]\([^)]*\)|Torch-Pruning|NeMo Guardrails", " ", text)


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_glossary_terms_are_used_wherever_the_english_uses_them(source: Path) -> None:
    entries = load_translations(CHINESE)[source.stem].cells
    for cell in nbformat.read(source, as_version=4).cells:
        entry = entries.get(cell.id)
        if cell.cell_type != "markdown" or entry is None:
            continue
        for english, chinese in GLOSSARY_TERMS.items():
            if re.search(english, _prose(cell.source), flags=re.IGNORECASE):
                assert chinese in entry.text, f"{source.stem} {cell.id}: {english!r} is {chinese} (docs/glossary.md)"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_chinese_learner_edition_runs_the_english_code(source: Path) -> None:
    """So CI's smoke run of the Chinese learner edition is a run of the English one as well."""
    english = nbformat.reads(render_edition(source, "learner"), as_version=4)
    chinese = nbformat.reads(render_edition(source, "learner", CHINESE, translator(CHINESE)), as_version=4)
    assert [(c.id, c.cell_type) for c in chinese.cells] == [(c.id, c.cell_type) for c in english.cells]
    for ours, theirs in zip(chinese.cells, english.cells):
        if ours.cell_type == "code":
            assert (ours.source, ours.metadata) == (theirs.source, theirs.metadata)
        elif re.search(r"[A-Za-z]{3,}", _prose(theirs.source)):  # a cell with English prose gets Chinese prose
            assert re.search(r"[\u4e00-\u9fff]", ours.source), f"{source.stem} {ours.id} is not in Chinese"
    assert chinese.metadata["course_edition"]["language"] == CHINESE


def _sources(folder: Path, *texts: str) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=[new_markdown_cell(text) for text in texts] + [new_code_cell("SHOW_SOLUTIONS = False", metadata={"tags": ["parameters"]})])
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / "00_first.ipynb")
    return notebook


def _write(folder: Path, notebook: nbformat.NotebookNode, texts: dict[int, str]) -> Path:
    path = translation_path("xx", "00_first", folder)
    cells = {notebook.cells[i].id: TranslatedCell(source_sha256=text_sha256(notebook.cells[i].source), text=text)
             for i, text in texts.items()}
    write_translation(path, TranslationFile(language="xx", notebook="00_first", cells=cells))
    return path


def test_a_changed_english_cell_turns_stale_and_keeps_its_english_until_translated(tmp_path: Path) -> None:
    sources, folder = tmp_path / "notebooks", tmp_path / "translations"
    notebook = _sources(sources, "# 00 · First\n\nRun `make course` twice.  \n", "Two")
    _write(folder, notebook, {0: "# 00 · 第一\n\n运行 `make course` 两次。  \n", 1: "二"})
    assert translation_issues("xx", sources, folder) == []
    assert load_translations("xx", folder)["00_first"].cells[notebook.cells[0].id].text.endswith("两次。  \n")

    notebook.cells[1].source = "Two, now three"
    notebook.cells.append(new_markdown_cell("Four"))
    nbformat.write(notebook, sources / "00_first.ipynb")
    issues = translation_issues("xx", sources, folder)
    assert [(i.cell_id, i.kind) for i in issues] == [(notebook.cells[1].id, "stale"),
                                                       (notebook.cells[3].id, "untranslated")]
    assert issues[0].english_sha256 == text_sha256("Two, now three")
    assert f"  source_sha256: {text_sha256('Four')}" in describe_issues(issues, show_english=True)

    files, kept = build_language_editions(tmp_path / "editions", "xx", sources, folder)
    learner = nbformat.read(next(f.path for f in files if f.edition == "learner"), as_version=4)
    assert [c.source for c in learner.cells if c.cell_type == "markdown"] == [
        "# 00 · 第一\n\n运行 `make course` 两次。  \n", "Two, now three", "Four"]
    assert kept == {("00_first", notebook.cells[1].id), ("00_first", notebook.cells[3].id)}

    del notebook.cells[0]
    nbformat.write(notebook, sources / "00_first.ipynb")
    assert "orphan" in {i.kind for i in translation_issues("xx", sources, folder)}
    (sources / "00_first.ipynb").rename(sources / "00_renamed.ipynb")
    assert ("00_first", "orphan") in {(i.notebook, i.kind) for i in translation_issues("xx", sources, folder)}


@pytest.mark.parametrize(("translation", "lost"), [
    ("运行 `make course`，见 [文档](docs/x.md)，耗时 15 min。", None),
    ("运行 make course，见 [文档](docs/x.md)，耗时 15 min。", "inline code: missing `make course`"),
    ("运行 `make course`，见 [文档](docs/y.md)，耗时 15 min。", "link targets: missing docs/x.md"),
    ("运行 `make course`，见 [文档](docs/x.md)，耗时十五分钟。", "numbers: missing 15"),
    ("## 运行 `make course`，见 [文档](docs/x.md)，耗时 15 min。", "headings"),
])
def test_a_translation_that_loses_code_links_figures_or_headings_is_mangled(translation: str, lost: str | None) -> None:
    english = "Run `make course`, see [the docs](docs/x.md); it takes 15 min."
    differences = structure_differences(english, translation)
    assert (differences == []) if lost is None else any(d.startswith(lost) for d in differences), differences


@pytest.mark.parametrize(("text", "problem"), [
    ("- **前置内容：** 第 04 号 notebook", None),
    ("- **前置内容：**第 04 号 notebook", "** closes in '：**第'"),
    ("模型的**（ASR）**把语音", "** opens in '的**（'"),
    ("*字*错误率（CER）", None),
    ("所以 *字（character）*错误率", "* closes in '）*错'"),
    ("**fake\nquantizers**: in the forward pass", None),
    ("* a bullet, not an italic\n* and `a * b` is code", None),
    ("* 所以 *字（character）*错误率", "* closes in '）*错'"),
    ("```python\ndef f(*args, **kwargs):\n```\n**粗体**", None),
])
def test_bold_and_italic_that_would_not_render_are_found(text: str, problem: str | None) -> None:
    problems = emphasis_problems(text)
    assert (problems == []) if problem is None else any(problem in found for found in problems), problems


@pytest.mark.parametrize(("content", "message"), [
    ("cells: [unclosed", "not valid YAML (line 1: expected"),
    ("", "the file is empty"),
    ("language: xx\nnotebook: 00_first\ncells:\n  abc:\n    source_sha256: nothex\n    text: 一", "source_sha256"),
    ("language: xx\nnotebook: 01_other\ncells: {}\n", "it must say 'xx', '00_first'"),
    ("language: xx\nnotebook: 00_first\ncells: {}\nextra: 1\n", "extra"),
    ("language: xx\nnotebook: 00_first\ncells:\n  ab: {}\n  ab: {}\n", "'ab' is given twice"),
])
def test_a_broken_translation_file_is_refused_in_one_line_naming_it(tmp_path: Path, content: str,
                                                                     message: str) -> None:
    path = translation_path("xx", "00_first", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TranslationError, match=re.escape(message)) as error:
        load_translations("xx", tmp_path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_a_file_not_in_utf8_is_refused_and_an_unquoted_id_stays_as_written(tmp_path: Path) -> None:
    path = translation_path("xx", "00_first", tmp_path)
    path.parent.mkdir(parents=True)
    text = f"language: xx\nnotebook: 00_first\ncells:\n  01234567:\n    source_sha256: {'a' * 64}\n    text: 中文\n"
    path.write_bytes(text.encode("gbk"))
    with pytest.raises(TranslationError, match="save it as UTF-8"):
        load_translations("xx", tmp_path)
    path.write_text(text, encoding="utf-8")
    assert list(load_translations("xx", tmp_path)["00_first"].cells) == ["01234567"]  # not the octal 342391


def test_a_notebook_without_cell_ids_is_refused_naming_the_fix(tmp_path: Path) -> None:
    notebook = _sources(tmp_path / "notebooks", "One")
    _write(tmp_path / "translations", notebook, {0: "一"})
    del notebook.cells[0]["id"]
    notebook.nbformat_minor = 4
    nbformat.write(notebook, tmp_path / "notebooks" / "00_first.ipynb", version=nbformat.NO_CONVERT)
    with pytest.raises(TranslationError, match="cell 1 has no id.*nbformat 4.5"):
        translation_issues("xx", tmp_path / "notebooks", tmp_path / "translations")


def test_a_language_without_files_is_refused_naming_those_there(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "xx").mkdir()
    (tmp_path / "xx" / "00_first.yaml").write_text("language: xx\nnotebook: 00_first\ncells: {}\n")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # neither a hidden folder nor an empty one is a language
    (tmp_path / "fr").mkdir()
    for call in (translator, translation_issues):
        with pytest.raises(TranslationError, match=r"the languages there: xx \(the source is 'en'\)"):
            call("fr", folder=tmp_path)
    assert main(["translations", "en"]) != 0  # the source is no translation: one line, not 189 cells
    assert "no translation files for 'en'" in capsys.readouterr().err


def test_the_glossary_has_every_term_the_tests_hold_the_translations_to() -> None:
    glossary = (REPO_ROOT / "docs" / "glossary.md").read_text(encoding="utf-8")
    rows = [line.strip("| ").split(" | ") for line in glossary.splitlines() if line.startswith("| ")]
    for english, chinese in GLOSSARY_TERMS.items():
        assert any(re.search(english, row[0], flags=re.IGNORECASE) and chinese in row[1] for row in rows), english


def test_the_cli_lists_what_to_fix_and_fails(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from course_utils.lessons import translations

    stale = translations.TranslationIssue("00_first", "abc", "stale", "the English changed since", "One", "f" * 64)
    monkeypatch.setattr(translations, "translation_issues", lambda language: [stale])
    assert main(["translations", CHINESE, "--english"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{CHINESE} 00_first abc: stale (the English changed since)", f"{CHINESE}   source_sha256: {'f' * 64}",
                       f"{CHINESE}   | One", f"{CHINESE}: 1 cell(s) to translate or fix"]
