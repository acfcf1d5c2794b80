"""The Gradio page: a worklist first (upload, triage, open), then the study view with its slice
viewer. The worklist and the study view are gr.HTML components fed with plain data (views.py,
study_view.py) and drawn by their own scripts (static/*.js), which show every value as text.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr
from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.frontend import views
from services.frontend.queue_status import QueuePlace
from services.frontend.service import FrontendService
from services.frontend.sessions import browser_viewer, is_session_token, new_session_token
from services.frontend.study_view import study_view
from services.frontend.uploads import UPLOAD_FILE_TYPES
from services.registry import StudyRecord

REFRESH_SECONDS = 2.0
SESSION_STORAGE_KEY = "cts-session"
GUIDE_STORAGE_KEY = "cts-guide-seen"
STATIC = Path(__file__).parent / "static"
FILE_ROUTE = "gradio_api/file="  # relative: works behind a proxy's path prefix too
UPLOAD_HINT = (
    "Add studies: **.zip** or **.tar(.gz)** of DICOM files, **.nii(.gz)** volumes, "
    "or the **.dcm** files of one series."
)


def asset(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


PAGE_CSS = asset("page.css")


def signature(value: object) -> str:
    """A short fingerprint of what a component shows: redraw only when it changed."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PageActions:
    """What the page's events do, over one FrontendService; each method is one event."""

    def __init__(self, service: FrontendService) -> None:
        self.service = service
        # Result files never change once written: cached per path.
        self.read_json = lru_cache(maxsize=256)(self._read_json)

    def _read_json(self, relative: str) -> dict[str, Any] | None:
        path = self.service.file_path(relative)
        if path is None:
            return None
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def file_url(self, relative: str) -> str | None:
        path = self.service.file_path(relative)
        return None if path is None else FILE_ROUTE + quote(str(path), safe="/")

    def records(self, token: str | None) -> list[StudyRecord]:
        if not is_session_token(token):
            return []
        return self.service.worklist_records(browser_viewer(token))

    def study_of(
        self, records: list[StudyRecord], key: str | None, places: dict[str, QueuePlace]
    ) -> dict[str, Any] | None:
        parsed = views.parse_row_key(key)
        if parsed is None:
            return None
        task_id, index = parsed
        siblings = [record for record in records if record.task_id == task_id]
        if not siblings:  # not on the list (hidden, older): a patient's other study, say
            siblings = self.service.registry.task_studies(task_id)
        record = next((r for r in siblings if r.report_index == index), None)
        if record is None:
            return None
        identity = record.identity
        patient = (
            self.service.registry.patient_studies(
                identity.patient_id, identity.issuer_of_patient_id
            )
            if identity is not None and identity.patient_id
            else []
        )
        return study_view(
            record,
            self.service.result(task_id) if record.state.final else None,
            n_studies=len(siblings),
            place=places.get(task_id),
            patient_studies=patient,
            file_url=self.file_url,
            read_json=self.read_json,
        )

    def ensure_session(self, token: str | None, guide_seen: bool | None) -> tuple[Any, ...]:
        token = token if is_session_token(token) else new_session_token()
        # The guide is open on the first visit only.
        return token, True, gr.update(open=not guide_seen)

    def submit(self, token: str | None, files: list[str] | None) -> tuple[Any, ...]:
        if not is_session_token(token):
            return "The page is still starting; please try again in a second.", gr.skip(), gr.skip()
        outcome = self.service.submit_uploads(
            browser_viewer(token), None, [Path(path) for path in files or []]
        )
        # Clear the picker once the files are taken, keep it if everything was refused; the
        # guide makes room for the worklist.
        taken = outcome.submitted or outcome.screened_before
        return (
            views.markdown_text(outcome.message),
            None if taken else gr.skip(),
            gr.update(open=False) if taken else gr.skip(),
        )

    def refresh(
        self, token: str | None, key: str | None, shown: dict[str, str] | None
    ) -> tuple[Any, ...]:
        shown = dict(shown or {})
        try:
            records = self.records(token)
            places = self.service.queue_places()
        except SQLAlchemyError as error:
            # The registry's database is away (restarting): the page keeps what it shows.
            logger.warning("worklist not refreshed: {}", type(error).__name__)
            return (gr.skip(),) * 4 + (shown,)
        finished = [
            (record.key, str(record.finished_at)) for record in records if record.state.final
        ]
        drawn = {
            "worklist": views.worklist(records, places),
            "study": self.study_of(records, key, places),
            "xlsx": finished,
        }
        redraw = {name for name, value in drawn.items() if changed(shown, name, value)}
        updates = {name: value if name in redraw else gr.skip() for name, value in drawn.items()}
        download = gr.skip()
        if "xlsx" in redraw:
            path = (
                self.service.xlsx_for(browser_viewer(token), records)
                if finished and is_session_token(token)
                else None
            )
            download = gr.update(value=str(path) if path else None, interactive=path is not None)
        return (
            gr.update(visible=self.service.demo_weights_in_use(records)),
            updates["worklist"],
            updates["study"],
            download,
            shown,
        )

    def open_study(
        self, token: str | None, shown: dict[str, str] | None, event: gr.EventData
    ) -> Any:
        key = event_key(event)
        study = self.study_of(self.records(token), key, self.service.queue_places())
        shown = {**(shown or {}), "study": signature(study)}
        return (key if study else None), study, shown

    def remove_study(
        self, token: str | None, key: str | None, shown: dict[str, str] | None, event: gr.EventData
    ) -> Any:
        removed = views.parse_row_key(event_key(event))
        if removed is not None and is_session_token(token):
            self.service.hide(browser_viewer(token), *removed)
        selected = views.parse_row_key(key)
        if selected is not None and removed is not None and selected == removed:
            key = None
        return (key, *self.refresh(token, key, {**(shown or {}), "worklist": ""}))


def changed(shown: dict[str, str], name: str, value: object) -> bool:
    """Whether ``value`` differs from what the page shows; notes its fingerprint in ``shown``."""
    fingerprint = signature(value)
    previous = shown.get(name)
    shown[name] = fingerprint
    return previous != fingerprint


def event_key(event: gr.EventData) -> str | None:
    """The row key a worklist event carries."""
    data = event._data
    key = data.get("key") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None


def build_app(service: FrontendService) -> gr.Blocks:
    actions = PageActions(service)
    with gr.Blocks(title="Chest CT screening", delete_cache=(3600, 86400)) as app:
        session = gr.BrowserState(
            None, storage_key=SESSION_STORAGE_KEY, secret=service.browser_state_secret()
        )
        guide_seen = gr.BrowserState(
            False, storage_key=GUIDE_STORAGE_KEY, secret=service.browser_state_secret()
        )
        selected = gr.State(None)
        shown = gr.State({})
        with gr.Row(equal_height=True):
            gr.Markdown(
                "# Chest CT screening\nP(pathology), 20 findings and data-quality warnings "
                "per study, most urgent first.",
                elem_id="page-title",
            )
            banner = gr.HTML(
                views.DEMO_BANNER_HTML,
                visible=service.demo_weights_in_use(),
                elem_id="demo-banner",
            )
        with gr.Accordion("How to use", open=False, elem_id="guide") as guide:
            gr.Markdown(views.GUIDE)
        with gr.Row(equal_height=True):
            uploads = gr.File(
                label="Studies",
                show_label=False,
                file_count="multiple",
                file_types=UPLOAD_FILE_TYPES,
                elem_id="uploads",
                height=130,
                scale=5,
            )
            with gr.Column(scale=3, elem_id="submit-column"):
                submit_button = gr.Button("Screen the studies", variant="primary", elem_id="submit")
                upload_message = gr.Markdown(UPLOAD_HINT, elem_id="upload-message")
            download_all = gr.DownloadButton(
                "Download all (xlsx)",
                value=None,
                interactive=False,
                elem_id="download-all",
                scale=2,
            )
        worklist = gr.HTML(
            {"rows": [], "counts": {}, "badges": views.BADGE_TEXT_BY_VALUE},
            html_template=asset("worklist.html"),
            css_template=asset("badges.css") + asset("worklist.css"),
            js_on_load=asset("worklist.js"),
            elem_id="worklist",
        )
        study = gr.HTML(
            None,
            html_template=asset("study.html"),
            css_template=asset("badges.css") + asset("study.css"),
            js_on_load=asset("study.js"),
            elem_id="study-view",
        )
        timer = gr.Timer(REFRESH_SECONDS)

        refresh_outputs = [banner, worklist, study, download_all, shown]
        app.load(
            actions.ensure_session,
            inputs=[session, guide_seen],
            outputs=[session, guide_seen, guide],
        ).then(actions.refresh, inputs=[session, selected, shown], outputs=refresh_outputs)
        submit_button.click(
            actions.submit, inputs=[session, uploads], outputs=[upload_message, uploads, guide]
        ).then(actions.refresh, inputs=[session, selected, shown], outputs=refresh_outputs)
        timer.tick(
            actions.refresh,
            inputs=[session, selected, shown],
            outputs=refresh_outputs,
            show_progress="hidden",
        )
        worklist.study_open(
            actions.open_study,
            inputs=[session, shown],
            outputs=[selected, study, shown],
            show_progress="hidden",
        )
        worklist.study_remove(
            actions.remove_study,
            inputs=[session, selected, shown],
            outputs=[selected, *refresh_outputs],
            show_progress="hidden",
        )
    return app
