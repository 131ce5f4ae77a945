"""The Narrative Canvas page as a presenter uses it: Voila on loopback, headless Chromium, uploads, the chain.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python package (the dev
extra), which drives that browser: no browser is downloaded. Smoke spec, offline: the story comes from the
local SmolLM2 server and the picture from the tiny random pipeline. Three bee photos come from the data cache
(``COURSE_DATA_CACHE``, CI's pre-seeded hymenoptera set), else from scikit-image. The screenshots are kept in
``workspace/tests/app_e2e/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from course_utils.app.server import CHROMIUM_FLAGS, PageServer
from course_utils.core.config import REPO_ROOT, load_config

CHROMIUM = shutil.which("chromium")
SCREENSHOTS = REPO_ROOT / "workspace" / "tests" / "app_e2e"
SIZES = [(1920, 1080), (1280, 720)]
WHAT_THE_AUDIENCE_SEES = {"photos": ".nc-thumbnails img", "top-5": ".nc-top5-card", "story": ".nc-story-box .nc-story",
                          "picture": "img.nc-picture"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: `apt-get install -y chromium` "
                                                "(no browser is downloaded for this test)"),
]

# For each element: is all of it inside the viewport and inside every ancestor that clips it (overflow other
# than visible, up to the stage's fixed box, whose own ancestors clip nothing), i.e. on screen without
# scrolling anything?
UNSCROLLED = """selector => [...document.querySelectorAll(selector)].map(element => {
  const box = element.getBoundingClientRect(), inside = (outer, slack = 0.5) => box.left >= outer.left - slack
    && box.top >= outer.top - slack && box.right <= outer.right + slack && box.bottom <= outer.bottom + slack;
  if (box.width === 0 || box.height === 0 || !inside({left: 0, top: 0, right: innerWidth, bottom: innerHeight}))
    return false;
  for (let up = element.parentElement; up; up = up.parentElement) {
    const style = getComputedStyle(up);
    if ((style.overflowX !== 'visible' || style.overflowY !== 'visible') && !inside(up.getBoundingClientRect()))
      return false;
    if (style.position === 'fixed') break;
  }
  return true;
})"""


def _photos(folder: Path) -> list[Path]:
    """Three bee photos: the data cache's hymenoptera bees, else three scikit-image pictures."""
    cache = os.environ.get("COURSE_DATA_CACHE")
    bees = sorted((Path(cache) / "hymenoptera_data" / "val" / "bees").glob("*.jpg"))[:3] if cache else []
    if len(bees) == 3:
        return bees
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        paths.append(folder / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(paths[-1])
    return paths


def _browser(driver: Any, profile: Path) -> Any:
    return driver.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=list(CHROMIUM_FLAGS),
                                                     viewport={"width": SIZES[0][0], "height": SIZES[0][1]})


def _upload(page: Any, *files: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click(".nc-upload")
    chooser.value.set_files([str(path) for path in files])


def _run_chain(page: Any) -> None:
    """Press "Run the whole chain" and wait until the chain button is enabled again."""
    page.click(".nc-chain")
    page.wait_for_selector(".nc-chain:disabled", timeout=30_000)
    page.wait_for_selector(".nc-chain:enabled", timeout=400_000)


def _assert_on_one_screen(page: Any, width: int, height: int, name: str) -> None:
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_timeout(300)  # the layout follows the viewport
    page.screenshot(path=str(SCREENSHOTS / f"{name}_{width}x{height}.png"))
    scroll = page.evaluate("[document.scrollingElement.scrollWidth, document.scrollingElement.scrollHeight]")
    assert scroll[0] <= width and scroll[1] <= height, f"{name} {width}x{height}: the page scrolls ({scroll})"
    for what, selector in WHAT_THE_AUDIENCE_SEES.items():
        seen = page.evaluate(UNSCROLLED, selector)
        assert seen and all(seen), f"{name} {width}x{height}: the {what} ({selector}) is not all on screen: {seen}"
    story_px = page.eval_on_selector(".nc-story", "e => parseFloat(getComputedStyle(e).fontSize)")
    assert story_px >= 20, f"{name} {width}x{height}: story text {story_px} px"


def test_the_whole_chain_fits_one_screen_at_both_sizes_in_both_languages(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="`pip install -e .[dev]` installs playwright")
    from PIL import Image

    photos = _photos(tmp_path)
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (200, 160, 40)).save(small)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    config = load_config("smoke", {"workspace": str(tmp_path / "workspace")}, environ={"COURSE_OFFLINE": "1"})
    config.workspace.mkdir(parents=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with PageServer(config) as server, playwright.sync_playwright() as driver:
        assert server.host == "127.0.0.1"
        browser = _browser(driver, tmp_path / "chromium-profile")
        page = browser.new_page()
        try:
            page.goto(server.url, timeout=180_000)
            page.wait_for_selector(".nc-chain", timeout=180_000)
            _upload(page, *[small] * 9)
            page.wait_for_selector(".nc-error-box:has-text('at most 8')", timeout=60_000)
            _upload(page, notes)
            page.wait_for_selector(".nc-error-box:has-text('notes.txt is not an image')", timeout=60_000)
            assert page.locator(".nc-error").is_visible()
            _upload(page, *photos)
            page.wait_for_selector(".nc-thumbnails img >> nth=2", timeout=60_000)
            assert page.inner_text(".nc-error-box").strip() == ""
            _run_chain(page)
            assert page.inner_text(".nc-error-box").strip() == ""
            labels = page.locator(".nc-top5-card").first.locator(".nc-label").all_inner_texts()
            assert len(labels) == 5 and all(labels), labels
            assert len(page.inner_text(".nc-story").split()) >= 5 and not page.locator(".nc-blocked-card").count()
            assert "the classifier sees" in page.inner_text(".nc-round-trip")
            assert "noise" in page.inner_text(".nc-round-trip")  # the random pipeline says so
            assert "ms" in page.inner_text(".nc-chip[data-step='classifier']")
            assert "tokens/s" in page.inner_text(".nc-chip[data-step='story']")
            assert "s / picture" in page.inner_text(".nc-chip[data-step='picture']")
            for width, height in SIZES:
                _assert_on_one_screen(page, width, height, "en")
            page.click(".nc-ui-language button:has-text('中文')")
            page.wait_for_selector(".nc-chain:has-text('运行整条流程')", timeout=30_000)
            _run_chain(page)  # the story now follows the page's language
            assert page.inner_text(".nc-error-box").strip() == ""
            assert "噪声" in page.inner_text(".nc-round-trip") and "毫秒" in page.inner_text(".nc-figures")
            for width, height in reversed(SIZES):
                _assert_on_one_screen(page, width, height, "zh")
        finally:
            page.screenshot(path=str(SCREENSHOTS / "last.png"))
            browser.close()


def test_kiosk_mode_hides_the_controls_and_a_blocked_story_shows_only_the_card(tmp_path: Path) -> None:
    """An unattended demo: no instruction box, no runtime choices; a classifier whose labels the rails screen
    (weapons) gets the card, and no screened word appears anywhere on the page."""
    playwright = pytest.importorskip("playwright.sync_api", reason="`pip install -e .[dev]` installs playwright")
    from course_utils.core.artifacts import FileRef, FinetuneRecord
    from course_utils.core.ledger import Ledger
    from course_utils.vision import zoo

    blocked = ["rifle", "revolver"]
    config = load_config("smoke", {"workspace": str(tmp_path / "workspace"), "app.kiosk": True},
                         environ={"COURSE_OFFLINE": "1"})
    path = zoo.save_classifier(zoo.load("lite0", blocked, pretrained=False), config.workspace / "models" / "ft.pt")
    Ledger(config.workspace).save(FinetuneRecord(checkpoint=FileRef.of(path, config.workspace),
                                                 backbone="efficientnet-lite0", dataset="d", classes=blocked))
    photo = _photos(tmp_path)[0]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with PageServer(config, overrides={"app.kiosk": True}) as server, playwright.sync_playwright() as driver:
        browser = _browser(driver, tmp_path / "chromium-profile")
        page = browser.new_page()
        page.set_viewport_size({"width": 1280, "height": 720})
        try:
            page.goto(server.url, timeout=180_000)
            page.wait_for_selector(".nc-chain", timeout=180_000)
            page.click(".nc-settings-toggle")
            page.wait_for_selector(".nc-settings", state="visible", timeout=30_000)
            for hidden in (".nc-instruction", ".nc-runtime", ".nc-model"):
                assert page.locator(hidden).is_hidden(), hidden
            page.click(".nc-settings-toggle")
            _upload(page, photo)
            page.wait_for_selector(".nc-thumbnails img", timeout=60_000)
            _run_chain(page)
            page.wait_for_selector(".nc-blocked-card", timeout=30_000)
            assert all(page.evaluate(UNSCROLLED, ".nc-blocked-card"))
            assert "label screen" in page.inner_text(".nc-blocked-card")
            shown = page.inner_text("body").lower()
            assert not [word for word in blocked if word in shown], shown
            assert page.locator("img.nc-picture").is_hidden() and page.inner_text(".nc-error-box").strip() == ""
        finally:
            page.screenshot(path=str(SCREENSHOTS / "kiosk_blocked_1280x720.png"))
            browser.close()
