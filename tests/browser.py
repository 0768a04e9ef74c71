"""Open a report in Debian's headless chromium (Playwright drives it): what a reader's browser sees."""

import shutil

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def open_report(path, screenshot, selectors=()) -> dict:
    """Console errors, failed requests and dialogs, every image's (complete, width, height), and
    the text of each selector; a full-page screenshot is written to `screenshot`."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by `make setup`"
    problems, dialogs = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"request {r.url}"))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        texts = {selector: page.inner_text(selector) for selector in selectors}
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"problems": problems, "dialogs": dialogs, "images": images, "texts": texts}
