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

# Per selector: its top and bottom in page coordinates (px from the top of the page). Under `within`: every
# laid-out element whose content is wider than its box (scrollWidth > clientWidth) or that sticks out of the
# viewport's width, as "tag#id.class scrollWidth>clientWidth right=…".
MEASURE = """([selectors, within]) => {
  const boxes = {};
  for (const s of selectors) {
    const r = document.querySelector(s).getBoundingClientRect();
    boxes[s] = [r.top + window.scrollY, r.bottom + window.scrollY];
  }
  const width = document.documentElement.clientWidth;
  const overflowing = [];
  const root = within ? document.querySelector(within) : null;
  for (const e of root ? [root, ...root.querySelectorAll('*')] : []) {
    const r = e.getBoundingClientRect();
    if (e.clientWidth > 0 && (e.scrollWidth > e.clientWidth || r.right > width)) {
      const name = e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className ? '.' + e.className : '');
      overflowing.push(`${name} ${e.scrollWidth}>${e.clientWidth} right=${r.right}`);
    }
  }
  return {boxes, overflowing, page: [document.documentElement.scrollWidth, width]};
}"""


def open_report(path, screenshot, selectors=(), *, width=1280, within=None) -> dict:
    """Console errors, failed requests and dialogs, every image's (complete, width, height), the text each
    selector shows (`texts`: collapsed <details> hidden), holds (`all_texts`) and prints (`printed`), where each
    selector lies (`boxes`), the page's (scrollWidth, clientWidth) and what overflows under `within` (see MEASURE),
    at a viewport `width` px wide; a full-page screenshot is written to `screenshot`."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by `make setup`"
    problems, dialogs = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"request {r.url}"))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        texts = {selector: page.inner_text(selector) for selector in selectors}
        all_texts = {selector: page.text_content(selector) for selector in selectors}
        layout = page.evaluate(MEASURE, [list(selectors), within])
        page.screenshot(path=str(screenshot), full_page=True)
        page.emulate_media(media="print")
        printed = {selector: page.inner_text(selector) for selector in selectors}
        browser.close()
    return {
        "problems": problems,
        "dialogs": dialogs,
        "images": images,
        "texts": texts,
        "all_texts": all_texts,
        "printed": printed,
        **layout,
    }
