"""Reading and driving the web UI's worklist in Chromium (Playwright): shared by the stack tests.
Not a test module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FINISHED_BADGES = ("pathology", "normal", "failed", "not_analysed")


@contextmanager
def chromium() -> Iterator[Browser]:
    """The system's headless Chromium, closed afterwards."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


_ROWS_SCRIPT = """
() => Array.from(document.querySelectorAll('#worklist tbody tr')).map((tr) => ({
  key: tr.dataset.key,
  badge: tr.dataset.badge,
  badge_text: tr.querySelector('.badge').textContent,
  probability: tr.querySelector('.c-prob').textContent,
  what: tr.querySelector('.c-what').innerText,
  date: tr.querySelector('.c-study .wl-line').textContent,
  description: tr.querySelector('.c-study .wl-sub').textContent,
  patient: tr.querySelector('.c-patient').innerText,
  accession: tr.querySelector('.c-acc').textContent,
  received: tr.querySelector('.c-time').textContent,
  turnaround: tr.querySelector('.c-tat').textContent,
  review: tr.querySelector('.c-review').textContent,
  quality: Array.from(tr.querySelectorAll('.wl-chip')).map((chip) => chip.dataset.flag),
  file: tr.querySelector('.c-file').textContent,
  flags: Array.from(tr.querySelectorAll('.wl-flag')).map((flag) => flag.textContent),
}))
"""


def worklist_rows(page: Page, files: set[str] | None = None) -> list[dict[str, object]]:
    """Every row of the worklist as the page shows it (text, never markup); only the rows of
    ``files`` when given (the worklist is the department's: other tests' studies are there)."""
    rows = page.evaluate(_ROWS_SCRIPT)
    return rows if files is None else [row for row in rows if row["file"] in files]


def finished_rows(page: Page, files: set[str] | None = None) -> int:
    return sum(row["badge"] in FINISHED_BADGES for row in worklist_rows(page, files))


def upload(page: Page, files: list[Path], expected_message: str) -> None:
    """Pick files with "Add studies…": they are sent as soon as they are on the server."""
    page.locator("#tool-bar input[type=file]").set_input_files([str(path) for path in files])
    expect(page.locator("#upload-message")).to_contain_text(expected_message, timeout=60_000)


def download_all(page: Page, target: Path) -> Path:
    """One click on "Download all (xlsx)", saved to ``target``."""
    button = page.locator("a#download-all")  # a link once a study has finished
    expect(button).to_be_visible(timeout=30_000)
    with page.expect_download() as download_info:
        button.click()
    download_info.value.save_as(target)
    return target
