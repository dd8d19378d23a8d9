"""End to end in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Loads the app (subprocess on 127.0.0.1, see compare_app_server.py), types a prompt, clicks Generate,
waits for the gallery and checks it holds one image per selected adapter (+ base), each labelled with
the adapter's name. The screenshot goes to the test's temp folder; set COMPARE_SCREENSHOT=docs/compare.png
to also write it there (that is how the README's screenshot is made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from compare_app_server import SDXL_NAMES, app_url  # tests/ is on sys.path (pytest's rootdir insertion)

CHROMIUM = "/usr/bin/chromium"
# loopback only: no background traffic to Google's hosts (refused by this network anyway)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install -y chromium`; .ci/run does it)",
)


def test_generate_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    url = app_url()
    expected = ["base", *SDXL_NAMES]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#prompt textarea", timeout=60_000)
            page.fill("#prompt textarea", "a handwritten digit sks")
            page.click("#generate")
            page.wait_for_function(
                f"document.querySelectorAll('#gallery img').length >= {len(expected)}", timeout=180_000
            )
            page.wait_for_selector("#sdxl-status :text('Done')", timeout=30_000)
            images = page.locator("#gallery img")
            assert images.count() == len(expected)
            gallery_text = page.inner_text("#gallery")
            assert all(name in gallery_text for name in expected)
            # the adapters table lists the unreadable folder with its reason instead of crashing
            page.get_by_text("Adapters found").click()
            page.wait_for_function("document.body.innerText.includes('unreadable adapter')", timeout=30_000)
            shot = tmp_path / "compare.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("COMPARE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["COMPARE_SCREENSHOT"])
