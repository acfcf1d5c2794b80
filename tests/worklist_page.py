"""Reading and driving the web UI's worklist in Chromium (Playwright): shared by the stack tests.
Not a test module."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FINISHED_BADGES = ("pathology", "normal", "failure")

_ROWS_SCRIPT = """
() => Array.from(document.querySelectorAll('#worklist tbody tr')).map((tr) => ({
  key: tr.dataset.key,
  badge: tr.dataset.badge,
  badge_text: tr.querySelector('.badge').textContent,
  probability: tr.querySelector('.c-prob').textContent,
  what: tr.querySelector('.c-what').innerText,
  date: tr.querySelector('.c-date').textContent,
  description: tr.querySelector('.c-desc').textContent,
  accession: tr.querySelector('.c-acc').textContent,
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
    """Choose files, wait until they are on the server, press the button."""
    page.locator("#uploads input[type=file]").set_input_files([str(path) for path in files])
    # The files must be on the server before the button sends their paths.
    expect(page.locator("#uploads table tr")).to_have_count(len(files), timeout=30_000)
    page.locator("#submit").click()
    expect(page.locator("#upload-message")).to_contain_text(expected_message, timeout=30_000)


def download_all(page: Page, target: Path) -> Path:
    """One click on "Download all (xlsx)", saved to ``target``."""
    button = page.locator("a#download-all")  # a link once a study has finished
    expect(button).to_be_visible(timeout=30_000)
    with page.expect_download() as download_info:
        button.click()
    download_info.value.save_as(target)
    return target
