"""Cold start of the Narrative Canvas page: from `serve-app` to the app visible in headless Chromium.

Run after `python -m course_utils prepare-demo` (same spec and workspace), with Debian's chromium installed:
``.venv/bin/python benchmarks/app_cold_start.py --spec smoke --set workspace=/path/to/prepared [--runs 3]``.
Each run starts a fresh Voila server (so a fresh kernel), opens the page in an already running browser and
waits for the app's widgets. Prints a Markdown table: server listening, page opened -> app visible, total.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from course_utils.app.server import CHROMIUM_FLAGS, PageServer
from course_utils.cli import _parse_sets
from course_utils.core.config import load_config


def one_run(config, browser) -> dict[str, float]:
    """Times of one cold start, in seconds."""
    started = time.perf_counter()
    with PageServer(config) as server:
        listening = time.perf_counter()
        page = browser.new_page()
        page.goto(server.url, timeout=180_000)
        page.wait_for_selector(".nc-chain", timeout=180_000)
        visible = time.perf_counter()
        page.close()
    return {"server_listening_s": listening - started, "page_to_app_s": visible - listening,
            "cold_start_s": visible - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smoke")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    config = load_config(args.spec, _parse_sets(args.set))
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed: apt-get install -y chromium")
    with sync_playwright() as driver, tempfile.TemporaryDirectory() as profile:
        browser = driver.chromium.launch_persistent_context(profile, executable_path=chromium,
                                                            args=list(CHROMIUM_FLAGS))
        rows = [one_run(config, browser) for _ in range(args.runs)]
        browser.close()
    print(f"spec {config.spec}, workspace {config.workspace}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| run | server listening s | page opened -> app visible s | cold start s |\n|---|---|---|---|")
    for index, row in enumerate(rows, 1):
        print(f"| {index} | {row['server_listening_s']:.1f} | {row['page_to_app_s']:.1f} | {row['cold_start_s']:.1f} |")
    print(f"| median | | | {statistics.median(r['cold_start_s'] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
