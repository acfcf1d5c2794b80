"""Driving the triage parts of the page in Chromium (Playwright): a notification recorder,
a review from the study view, screenshots for the README. Not a test module."""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, ViewportSize, expect

from services.broker.schemas import StudyResult, TaskStatus
from services.broker.storage import store_result
from services.core.schemas import PatientIdentity, ProcessingStatus, StudyReport
from services.registry import Door, Registry, Submission

SIZES: tuple[ViewportSize, ...] = (
    {"width": 1280, "height": 800},
    {"width": 1920, "height": 1080},
)
# Set to docs/screenshots to refresh the README's pictures from a run of the stack test.
SCREENSHOTS_ENV = "CTS_SCREENSHOTS_DIR"

# The page's Notification calls are recorded (and still made): what a test can observe of a
# desktop notification in headless Chromium.
NOTIFICATION_RECORDER = """
(() => {
  const Original = window.Notification;
  window.__notifications = [];
  class Recorded extends Original {
    constructor(title, options) {
      super(title, options);
      window.__notifications.push({ title: title, body: (options && options.body) || "" });
    }
  }
  window.Notification = Recorded;
})();
"""


def record_notifications(context: BrowserContext, origin: str) -> None:
    context.grant_permissions(["notifications"], origin=origin)
    context.add_init_script(NOTIFICATION_RECORDER)


def notifications(page: Page) -> list[dict[str, str]]:
    return page.evaluate("() => window.__notifications || []")


def turn_alerts_on(page: Page) -> None:
    button = page.locator("#worklist .wl-alerts-button")
    button.click()
    expect(button).to_have_text("Alerts: on")


def review(
    page: Page, *, agrees: bool, call: str = "", finding: str = "", comment: str = ""
) -> None:
    """Record a review of the open study as a radiologist does."""
    form = page.locator("#study-view .sv-review-form")
    form.locator(".sv-agree" if agrees else ".sv-disagree").click()
    if not agrees and call:
        form.locator(".sv-review-pathology").select_option(call)
    if not agrees and finding:
        form.locator(".sv-review-findings summary").click()
        form.locator(f'select[data-label="{finding}"]').select_option("true")
    if comment:
        form.locator(".sv-review-comment").fill(comment)
    form.locator(".sv-review-save").click()


# True once the page has not scrolled for 200 ms (a smooth scroll has ended).
SCROLL_SETTLED = """
() => new Promise((done) => {
  const before = window.scrollY;
  setTimeout(() => done(window.scrollY === before), 200);
})
"""


def scroll_settled(page: Page, timeout_s: float = 10.0) -> None:
    """Waits until the page stops scrolling (page.evaluate awaits the check's promise)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(SCROLL_SETTLED) and time.monotonic() < deadline:
        pass


def show_study(page: Page) -> None:
    """The study view at the top of the window, as a reader who opened it sees it: after the
    smooth scroll that opening it started (Chromium carries a smooth scroll on past an instant
    one made during it, to the page's end)."""
    scroll_settled(page)
    page.locator("#study-view .sv-head").evaluate("node => node.scrollIntoView({block: 'start'})")
    scroll_settled(page)


def screenshot(page: Page, folder: Path, name: str) -> Path:
    """``name``-WIDTHxHEIGHT.png in ``folder``; also into $CTS_SCREENSHOTS_DIR when set."""
    size = page.viewport_size or {"width": 0, "height": 0}
    path = folder / f"{name}-{size['width']}x{size['height']}.png"
    page.screenshot(path=str(path))
    if target := os.environ.get(SCREENSHOTS_ENV):
        shutil.copy(path, Path(target) / path.name)
    return path


def pathology_arrives(registry: Registry, storage: Path, task_id: str) -> None:
    """A PATHOLOGY result recorded in the stack's registry as an adapter's reply would be
    (the tiny demo model's call on the fixtures is whatever its seeded weights say)."""
    report = StudyReport(
        path_to_study=task_id,
        study_uid=f"1.2.826.0.1.3680043.10.{int(datetime.now(UTC).timestamp())}",
        probability_of_pathology=0.93,
        pathology=1,
        processing_status=ProcessingStatus.SUCCESS,
        most_dangerous_pathology_type="Lung nodule",
        identity=PatientIdentity(patient_name="Arrival^Alert", patient_id="PID-ALERT"),
        demo_weights=True,
    )
    result_arrives(registry, storage, task_id, report)


def result_arrives(registry: Registry, storage: Path, task_id: str, report: StudyReport) -> None:
    """A study sent by the PACS, recorded with its result ``report`` as an adapter's reply."""
    now = datetime.now(UTC)
    registry.record_submission(
        Submission(
            task_id=task_id,
            door=Door.DICOM,
            sender="ORTHANC",
            original_filename="",
            study_path=f"incoming/{task_id}",
            received_at=now,
            queued_at=now,
        )
    )
    result = StudyResult(
        task_id=task_id, status=TaskStatus.COMPLETED, reports=[report], finished_at=now
    )
    store_result(storage, result)
    registry.record_result(result)
