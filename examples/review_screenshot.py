"""The screenshot in docs/commands/review.md of `xraygan review`: the page in headless Chromium, one answer given.

    python examples/review_screenshot.py AUDIT docs/figures/review_page.png

AUDIT is an audit folder with a review sheet (e.g. `study32/audit/dcgan` from `xraygan study`).
Its answers go to AUDIT/review/screenshot.csv (reader "screenshot"); copy the folder first if it
must stay untouched. Needs playwright (pip) and Chromium (apt-get install chromium).
"""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

from xraygan.review import ReviewConfig, make_server


def main() -> None:
    audit, out = Path(sys.argv[1]), Path(sys.argv[2])
    server = make_server(ReviewConfig(audit=audit, reader="screenshot", port=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(url)
            page.wait_for_function("document.getElementById('progress').textContent.includes('/')")
            page.keyboard.press("r")
            page.keyboard.press("4")
            page.keyboard.press("s")
            page.wait_for_timeout(400)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
