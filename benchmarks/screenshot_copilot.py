"""The co-pilot page screenshot (docs/screenshot_copilot.png) from a trained run, in headless Chromium.

    medunifier index build --ckpt runs/demo/run --data runs/demo/data/manifest.jsonl --out runs/demo/index --split train
    python benchmarks/screenshot_copilot.py --run runs/demo/run --index runs/demo/index \
        --image runs/demo/data/images_5x200/000000.png --out docs/screenshot_copilot.png

Serves the run (its priors included) on a free loopback port, uploads the image, waits for the draft
report, the finding bars and the similar cases, synthesises two images from `--prompt`, runs a counterfactual edit that adds
`--edit-finding`, and saves a full-page
screenshot. Needs Playwright (the dev extra) and Debian's /usr/bin/chromium; never downloads a browser.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder (model/ and priors)")
    parser.add_argument("--index", type=Path, default=None, help="an index folder for similar cases")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--prompt", default="Moderate cardiomegaly. Small right pleural effusion.")
    parser.add_argument("--edit-finding", default="cardiomegaly", help="the finding the counterfactual edit adds")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshot_copilot.png"))
    args = parser.parse_args()

    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    from medunifier.serve.api import Copilot
    from medunifier.serve.app import create_app

    copilot = Copilot.from_pretrained(args.run, index=args.index)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(copilot), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu",
                                              "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            page.goto(base + "/")
            page.set_input_files("#file-input", str(args.image))
            page.wait_for_selector('#report-text[data-state="done"]')
            if args.index is not None:
                expect(page.locator("#similar li")).to_have_count(5)
            if copilot.generator is not None:
                page.fill("#synth-text", args.prompt)
                page.fill("#synth-n", "2")
                page.fill("#synth-seed", "5")
                page.click("#synth-form button[type=submit]")
                expect(page.locator("#synth-images img")).to_have_count(2)
                page.select_option("#edit-finding", args.edit_finding)
                page.fill("#edit-strength", "0.7")
                page.click("#edit-form button[type=submit]")
                page.wait_for_selector("#edit-result:not([hidden])")
            page.locator("#report-text").scroll_into_view_if_needed()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            print(f"report: {page.inner_text('#report-text').strip()}")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
