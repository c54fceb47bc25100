"""The picture of the server's page for the README: docs/serve.png.

    python scripts/page_screenshot.py --model runs/<name>/classifier.h5 [--out docs/serve.png]
        [--text "WINNER!! You have been selected to receive a £900 prize reward"]

Starts `python -m npgpt.serve` on 127.0.0.1 (a free port), opens the page in Debian's Chromium
(Playwright; `playwright install` is not needed), types the text, presses the button, waits for
the bars and the shaded tokens, and saves a screenshot of the page (PNG, a few tens of KB).
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=str(REPO / "docs" / "serve.png"))
    p.add_argument("--text", default="WINNER!! You have been selected to receive a £900 prize reward. Call now")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "npgpt.serve", "--model", args.model, "--port", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+", server.stdout.readline()).group(0)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 760, "height": 420})
            page.set_default_timeout(120_000)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('settings').textContent.includes('labels:')")
            page.fill("#text", args.text)
            page.click("#go")
            page.wait_for_selector("body[data-done='yes']")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(60)
    print(f"{args.out}: {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
