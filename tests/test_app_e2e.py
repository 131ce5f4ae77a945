"""The Narrative Canvas page as a person uses it: Voila on loopback, headless Chromium, upload, the whole chain.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python package (the dev
extra), which drives that browser: no browser is downloaded. Smoke spec, offline: the story comes from the
local SmolLM2 server and the picture from the tiny random pipeline. The screenshot is kept as
``workspace/tests/narrative_canvas_e2e.png``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from course_utils.app.server import CHROMIUM_FLAGS, PageServer
from course_utils.core.config import REPO_ROOT, load_config

CHROMIUM = shutil.which("chromium")
SCREENSHOT = REPO_ROOT / "workspace" / "tests" / "narrative_canvas_e2e.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: `apt-get install -y chromium` "
                                                "(no browser is downloaded for this test)"),
]


def test_upload_classify_story_and_picture_in_a_real_browser(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="`pip install -e .[dev]` installs playwright")
    from PIL import Image
    from skimage import data

    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    config = load_config("smoke", {"workspace": str(tmp_path / "workspace")}, environ={"COURSE_OFFLINE": "1"})
    config.workspace.mkdir(parents=True)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with PageServer(config) as server, playwright.sync_playwright() as driver:
        assert server.host == "127.0.0.1"
        browser = driver.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=list(CHROMIUM_FLAGS),
            viewport={"width": 1200, "height": 1700})
        page = browser.new_page()
        try:
            started = time.monotonic()
            page.goto(server.url, timeout=180_000)
            page.wait_for_selector(".nc-chain", timeout=180_000)
            print(f"app visible {time.monotonic() - started:.1f} s after the page was opened")
            with page.expect_file_chooser() as chooser:
                page.click(".nc-upload")
            chooser.value.set_files(str(photo))
            page.wait_for_selector(".nc-thumbnails img", timeout=60_000)
            assert page.locator(".nc-thumbnails img").count() == 1
            page.click(".nc-chain")
            page.wait_for_selector(".nc-top5 .nc-bar-row", timeout=240_000)
            labels = page.locator(".nc-top5 .nc-label").all_inner_texts()
            assert len(labels) == 5 and all(labels), labels
            page.wait_for_selector(".nc-round-trip:has-text('the classifier sees')", timeout=400_000)
            assert page.inner_text(".nc-error-box").strip() == ""
            story = page.inner_text(".nc-story-box")
            assert len(story.split()) >= 5 and "Blocked" not in story, story
            assert page.locator(".nc-picture img, img.nc-picture").is_visible()
            assert "noise" in page.inner_text(".nc-round-trip")  # the random pipeline says so
            size = page.eval_on_selector(".nc-picture img, img.nc-picture", "e => [e.naturalWidth, e.naturalHeight]")
            assert size[0] > 0 and size[1] > 0
        finally:
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
