"""End to end: the co-pilot page in headless Chromium against a real server on loopback.

Needs Playwright for Python (the dev extra) and Debian's Chromium at /usr/bin/chromium (`.ci/run` installs
it); Playwright never downloads a browser here. Outside CI the test skips when either is missing; in CI
(CI=true) it fails instead, so that it cannot silently stop running.
Set MEDUNIFIER_SCREENSHOT=path to also save the screenshot there (docs/screenshot_copilot.png).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")


def _require_browser():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("playwright (pip install -e .[dev])")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(make_copilot):
    """create_app on 127.0.0.1:<free port> in a uvicorn thread; yields (base URL, copilot)."""
    import uvicorn

    from medunifier.serve.app import create_app

    copilot = make_copilot(index=True, generator=True)
    port = free_port()
    config = uvicorn.Config(create_app(copilot), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield base, copilot
    server.should_exit = True
    thread.join(timeout=10)


def test_page_shows_report_findings_cases_synthesis_and_edit(server, case_index, tmp_path) -> None:
    sync_playwright = _require_browser()
    from playwright.sync_api import expect

    base, copilot = server
    image = case_index.root / "images" / "case-1.png"
    expected_report = copilot.report(image)[0]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.set_default_timeout(20_000)
            expect.set_options(timeout=20_000)
            page.goto(base + "/")
            # (the page's CSP forbids eval, so waits use locators rather than wait_for_function)
            expect(page.locator("#model-info")).to_contain_text("indexed cases")

            # 1. upload -> draft report, finding bars, similar cases
            page.set_input_files("#file-input", str(image))
            page.wait_for_selector('#report-text[data-state="done"]')
            assert page.inner_text("#report-text").strip() == expected_report.strip()
            expect(page.locator("#similar li")).to_have_count(5)
            assert page.locator("#findings .bar-fill").count() == 5
            widths = page.eval_on_selector_all("#findings .bar-fill", "els => els.map(e => parseFloat(e.style.width))")
            assert abs(sum(widths) - 100) < 1.0  # probabilities over the five findings
            assert page.locator("#preview").get_attribute("src").startswith("data:image/png")
            assert "Done" in page.inner_text("#status")

            # 2. synthesis: images carry a SYNTHETIC badge
            page.fill("#synth-text", "Moderate cardiomegaly. Small right pleural effusion.")
            page.fill("#synth-n", "2")
            page.fill("#synth-seed", "5")
            page.click("#synth-form button[type=submit]")
            expect(page.locator("#synth-images img")).to_have_count(2)
            assert page.locator("#synth-images .badge").count() == 2

            # 3. counterfactual edit: source, edited and difference side by side, shown only once there is one
            expect(page.locator("#edit-result")).to_be_hidden()
            page.select_option("#edit-finding", "pleural_effusion")
            page.fill("#edit-strength", "0.7")
            page.click("#edit-form button[type=submit]")
            page.wait_for_selector("#edit-result:not([hidden])")
            expect(page.locator("#edit-result")).to_be_visible()
            for sel in ("#edit-source", "#edit-edited", "#edit-diff"):
                assert page.locator(sel).get_attribute("src").startswith("data:image/png")
            assert "mean" in page.inner_text("#edit-diff-caption")

            # 4. image to image: a translation, a mask, and an upscale the uploaded size cannot take (a 4xx shown)
            page.select_option("#i2i-op", "translate:bone")
            page.click("#i2i-form button[type=submit]")
            page.wait_for_selector("#i2i-result:not([hidden])")
            assert page.locator("#i2i-output").get_attribute("src").startswith("data:image/png")
            expect(page.locator("#i2i-caption")).to_contain_text("bone image")
            page.select_option("#i2i-op", "segment:heart")
            page.click("#i2i-form button[type=submit]")
            expect(page.locator("#i2i-caption")).to_contain_text("% of the image")
            page.select_option("#i2i-op", "upscale:4")
            page.click("#i2i-form button[type=submit]")
            expect(page.locator("#i2i-status.error")).to_contain_text("input")
            errors[:] = [e for e in errors if "422" not in e]  # the browser logs the refused request itself

            page.locator("#report-text").scroll_into_view_if_needed()
            shot = tmp_path / "screenshot_copilot.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    target = os.environ.get("MEDUNIFIER_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def test_qc_report_renders_with_thumbnails(tmp_path) -> None:
    """`data qc`'s HTML report in Chromium: the counts table and every dropped image's thumbnail load."""
    sync_playwright = _require_browser()
    import json

    import numpy as np

    from medunifier.data.images import save_png
    from medunifier.data.qc import run_qc

    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        save_png(rng.random((32, 32)).astype(np.float32), tmp_path / "images" / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"images/{i}.png", "text": "The lungs are clear today."})
    save_png(np.full((32, 32), 0.5, np.float32), tmp_path / "images" / "blank.png")
    records += [{"id": "blank", "image": "images/blank.png", "text": "The lungs are clear today."},
                {"id": "copy", "image": "images/0.png", "text": "The lungs are clear today."},
                {"id": "short", "image": "images/1.png", "text": "<b>Ok"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_qc(tmp_path / "m.jsonl", tmp_path / "qc" / "m.jsonl")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(result.report_html.as_uri())
            assert "kept 4, dropped 3" in page.inner_text("body")
            counts = page.inner_text("#counts")
            for reason in ("blank_image", "exact_duplicate", "short_report"):
                assert reason in counts
            images = page.locator("figure img")
            assert images.count() >= 3
            loaded = page.eval_on_selector_all("figure img", "els => els.map(e => e.complete && e.naturalWidth)")
            assert all(w and w > 0 for w in loaded), loaded
            assert "<b>Ok" in page.inner_text("#short_report")  # report text shown escaped, not as markup
        finally:
            browser.close()
    assert not errors, errors
