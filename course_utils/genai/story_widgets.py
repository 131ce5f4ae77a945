"""Notebook 08's story panel: style, theme, length, language and instruction widgets, a button, streamed output.

The panel works the same when a person clicks "Write the story" and when a headless run (papermill, CI)
calls ``panel.generate()``: widget values change either way, and the returned ``StoryResult`` is what
later cells use.
"""

from __future__ import annotations

import html
from typing import Any

from course_utils.core.config import CourseConfig
from course_utils.genai.story import StoryResult, StoryTeller, load_catalog, storyteller


class StoryPanel:
    """Widgets around a ``StoryTeller``: pick options, press the button, watch the story stream in."""

    def __init__(self, config: CourseConfig, labels: list[str], teller: StoryTeller | None = None) -> None:
        import ipywidgets as widgets

        catalog = load_catalog()
        self.teller = teller or storyteller(config)
        self.labels = list(labels)
        self.result: StoryResult | None = None
        self.style = widgets.Dropdown(options=list(catalog.styles), value="fairy_tale", description="style")
        self.theme = widgets.Dropdown(options=list(catalog.themes), value="friendship", description="theme")
        self.length = widgets.Dropdown(options=list(catalog.lengths), value="short", description="length")
        self.language = widgets.Dropdown(options=[(name, code) for code, name in catalog.languages.items()],
                                         value="en", description="language")
        self.instruction = widgets.Text(placeholder="e.g. Make the cat the hero", description="your idea")
        self.button = widgets.Button(description="Write the story", button_style="primary", icon="pencil")
        self.output = widgets.HTML()
        self.status = widgets.HTML()
        self.button.on_click(lambda _: self.generate())

    def widget(self) -> Any:
        """The panel to ``display()``."""
        import ipywidgets as widgets

        header = widgets.HTML(f"<b>Labels from the classifier:</b> {html.escape(', '.join(self.labels))}")
        options = widgets.HBox([widgets.VBox([self.style, self.theme]), widgets.VBox([self.length, self.language])])
        return widgets.VBox([header, options, self.instruction, self.button, self.output, self.status])

    def generate(self) -> StoryResult:
        """Stream a story with the current choices into the panel and return its result."""
        self.button.disabled = True
        self.status.value = "<i>writing…</i>"
        text = ""
        try:
            stream = self.teller.stream(self.labels, style=self.style.value, theme=self.theme.value,
                                        length=self.length.value, language=self.language.value,
                                        instruction=self.instruction.value)
            for chunk in stream:
                text += chunk
                self.output.value = _paragraphs(text)
            result = stream.result
            assert result is not None
        finally:
            self.button.disabled = False
        self.result = result
        if result.blocked:
            # What streamed before an output rail fired is replaced: the reader keeps only the refusal.
            self.output.value = f"<p>🛑 {html.escape(result.message)}</p>"
            self.status.value = f"<i>blocked by the {html.escape(str(result.blocked_by))} rail ({result.rail_type})</i>"
        else:
            self.status.value = (f"<i>image prompt: {html.escape(result.image_prompt or '')}<br>"
                                 f"{result.timings.get('total_s', 0):.1f} s · {result.tokens_per_second:.0f} tokens/s"
                                 f" · rails: {result.rails}</i>")
        return result


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(part)}</p>" for part in text.split("\n\n") if part.strip())
