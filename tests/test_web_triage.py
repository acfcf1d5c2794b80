"""A radiologist's screen in headless Chromium on the real web server (no model, results
recorded as an adapter leaves them), at 1280x800 and 1920x1080: the worklist's column
headers read in full and its bar stays inside the window; the study view opens with the
patient's identity at the top and the viewer, its slider and window/level controls, inside
the window; a Not analysed study is confirmed or given the reader's own call (there is no
call to agree with), and the row says what the reader decided. Screenshots are kept in the
test's folder."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect
from stack_support import stack_settings
from triage_page import SIZES, result_arrives, review
from web_support import (
    WebFrontend,
    finished_study,
    sign_in_page,
    web_frontend,
)

from services.adapter.viewer_data import ViewerStack, encode_hu, write_viewer
from services.core.access import Role
from services.core.config import Settings
from services.core.schemas import FailureKind, PatientIdentity, ProcessingStatus, StudyReport

pytestmark = [pytest.mark.rabbitmq, pytest.mark.browser]

# Each header's text fits its cell (no ellipsis), measured in the page.
TRUNCATED_HEADERS = """
() => Array.from(document.querySelectorAll('#worklist thead th'))
  .filter((th) => th.offsetParent !== null && th.scrollWidth > th.clientWidth + 1)
  .map((th) => th.textContent)
"""


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with stack_settings(tmp_path / "storage", "triage") as settings:
        yield settings


def phantom_viewer(frontend: WebFrontend, task_id: str) -> None:
    """Viewer data the page can draw in place of the placeholder bytes: a body of soft tissue
    with two lungs, 24 slices of 96x96."""
    rows, columns = np.mgrid[0:96, 0:96]
    body = ((rows - 48) / 40) ** 2 + ((columns - 48) / 46) ** 2 < 1
    lungs = (((rows - 46) / 26) ** 2 + ((np.abs(columns - 48) - 20) / 14) ** 2) < 1
    hu = np.where(lungs, -850.0, np.where(body, 40.0, -1000.0))
    stack = ViewerStack(
        codes=np.repeat(encode_hu(hu)[None], 24, axis=0),
        spacing_mm=(5.0, 3.5, 3.5),
        source_shape=(24, 96, 96),
        factors=(1, 1, 1),
    )
    folder = frontend.settings.storage.root / "results" / task_id / "viewer"
    write_viewer(stack, folder, "study1")


def not_analysed_study(frontend: WebFrontend) -> str:
    """A head CT from the PACS that the chest check refused, as an adapter records it."""
    task_id = uuid.uuid4().hex
    report = StudyReport(
        path_to_study=task_id,
        study_uid=f"1.2.826.0.1.3680043.10.{int(uuid.uuid4().int % 10**12)}",
        processing_status=ProcessingStatus.FAILURE,
        failure_reason="not a chest CT: the images do not show lungs across the series",
        failure_kind=FailureKind.NOT_ANALYSED,
        accession_number="ACC-HEAD-1",
        identity=PatientIdentity(patient_name="Head^Harry", patient_id="PID-HEAD"),
    )
    result_arrives(frontend.registry, frontend.settings.storage.root, task_id, report)
    return task_id


def inside_window(page: Page, selector: str) -> bool:
    """The element's box lies wholly inside the window (no scrolling needed to see it)."""
    box = page.locator(selector).first.bounding_box()
    size = page.viewport_size
    assert box is not None, selector
    assert size is not None
    return (
        box["x"] >= 0
        and box["y"] >= 0
        and box["x"] + box["width"] <= size["width"]
        and box["y"] + box["height"] <= size["height"]
    )


def test_the_screen_fits_and_a_refused_study_is_confirmed_not_agreed_with(
    settings: Settings, browser: Browser, tmp_path: Path
) -> None:
    with web_frontend(settings) as frontend:
        head = not_analysed_study(frontend)
        chest, _ = finished_study(frontend, sender="ORTHANC")
        phantom_viewer(frontend, chest)
        page = browser.new_page(viewport=SIZES[0])
        name = frontend.add_user("dr.triage", Role.RADIOLOGIST)
        sign_in_page(page, frontend.url, name)
        chest_row = page.locator(f'#worklist tr[data-key="{chest}:0"]')
        head_row = page.locator(f'#worklist tr[data-key="{head}:0"]')
        expect(head_row).to_have_count(1, timeout=30_000)
        for size in SIZES:
            page.set_viewport_size(size)
            page.evaluate("() => window.scrollTo(0, 0)")
            page.wait_for_timeout(300)
            label = f"{size['width']}x{size['height']}"
            page.screenshot(path=str(tmp_path / f"worklist-{label}.png"))
            assert page.evaluate(TRUNCATED_HEADERS) == [], label
            # Sorted by any column, its label stays whole too (the arrow takes no width).
            for header in page.locator("#worklist th[data-sort]").all():
                header.click()
                assert page.evaluate(TRUNCATED_HEADERS) == [], (label, header.text_content())
            page.locator('#worklist th[data-sort="urgency"]').click()
            expect(page.locator('#worklist th[data-sort="urgency"]')).to_have_attribute(
                "data-direction", "▲"
            )
            assert inside_window(page, "#download-all"), label
            assert inside_window(page, "#worklist .wl-alerts"), label
            chest_row.click()
            expect(page.locator("#study-view .sv-patient")).to_contain_text("PID-WEB-1")
            expect(page.locator("#study-view .vw")).to_have_attribute(
                "data-ready", "1", timeout=15_000
            )
            page.wait_for_timeout(800)  # the smooth scroll to the study view
            page.screenshot(path=str(tmp_path / f"study-{label}.png"))
            # The identity at the top, the viewer with its controls below it, all in view.
            for selector in (
                "#study-view .sv-title",
                "#study-view .sv-patient",
                "#study-view .vw-stage",
                "#study-view .vw-level",
                "#study-view .vw-help",
            ):
                assert inside_window(page, selector), (label, selector)
        page.set_viewport_size(SIZES[0])
        head_row.click()
        form = page.locator("#study-view .sv-review-form")
        expect(form.locator(".sv-agree")).to_have_text("Confirm: Not analysed")
        expect(form.locator(".sv-disagree")).to_have_text("Make my own call")
        form.locator(".sv-disagree").click()
        expect(form.locator(".sv-review-save")).to_be_disabled()  # no call chosen yet
        review(page, agrees=False, call="true", comment="seen on the scout")
        expect(head_row.locator(".c-review")).to_contain_text("own call: PATHOLOGY · dr.triage")
        # The review's own redraw of the study is in (a later one would reopen it over the next).
        expect(page.locator("#study-view .sv-reviews")).to_contain_text("own call: PATHOLOGY")
        (kept,) = frontend.registry.reviews(head)
        assert (kept.agrees, kept.pathology) == (False, True)
        # A study with a call: disagreeing starts from the other call, and the row says it.
        chest_row.click()
        expect(form.locator(".sv-agree")).to_have_text("Agree with the call")
        review(page, agrees=False)
        expect(chest_row.locator(".c-review")).to_contain_text("disagreed: NORMAL · dr.triage")
        page.context.close()
