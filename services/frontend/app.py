"""The Gradio page: a compact bar (add studies, alerts, download), the worklist filling the
window, then the study view with its slice viewer. The worklist and the study view are gr.HTML
components fed with typed rows (worklist_rows.py) and plain data (study_view.py) and drawn by
their own scripts (static/*.js), which show every value as text. What each event does is in
page_actions.py.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from services.frontend import views
from services.frontend.auth.access import AccessControl
from services.frontend.page_actions import PageActions
from services.frontend.service import FrontendService
from services.frontend.uploads import UPLOAD_FILE_TYPES
from services.frontend.worklist_rows import BADGE_TEXT_BY_VALUE

REFRESH_SECONDS = 1.0  # a study a PACS sends shows within a second or two
SESSION_STORAGE_KEY = "cts-session"
STATIC = Path(__file__).parent / "static"
UPLOAD_HINT = (
    "**.zip** or **.tar(.gz)** of DICOM files, **.nii(.gz)** volumes, or the **.dcm** files "
    "of one series; or drop them onto the worklist."
)


def asset(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


PAGE_CSS = asset("page.css")


def build_app(service: FrontendService, access: AccessControl) -> gr.Blocks:
    actions = PageActions(service, access)
    with gr.Blocks(title="Chest CT screening", delete_cache=(3600, 86400)) as app:
        session = gr.BrowserState(
            None, storage_key=SESSION_STORAGE_KEY, secret=service.browser_state_secret()
        )
        selected = gr.State(None)
        shown = gr.State({})
        if not access.sign_in_required:
            gr.HTML(views.SIGN_IN_OFF_BANNER_HTML, elem_id="sign-in-off-banner")
        with gr.Row(equal_height=True, elem_id="top-bar"):
            gr.Markdown("# Chest CT screening", elem_id="page-title")
            banner = gr.HTML(
                views.DEMO_BANNER_HTML,
                visible=service.demo_weights_in_use(),
                elem_id="demo-banner",
            )
            user_bar = gr.HTML(
                {},
                html_template=views.USER_BAR_HTML,
                css_template=views.USER_BAR_CSS,
                js_on_load=asset("user_bar.js"),
                elem_id="user-bar",
            )
        with gr.Row(equal_height=True, elem_id="tool-bar"):
            # Ticked before the files are picked: they go ahead of the routine queue.
            stat = gr.Checkbox(
                False,
                label="STAT",
                elem_id="stat",
                scale=0,
                min_width=80,
                container=False,
            )
            # One click: the files picked (or dropped onto the worklist) are sent at once.
            uploads = gr.UploadButton(
                "Add studies…",
                file_count="multiple",
                file_types=UPLOAD_FILE_TYPES,
                variant="primary",
                elem_id="uploads",
                scale=0,
                min_width=150,
            )
            with gr.Column(scale=6, min_width=300):
                upload_message = gr.Markdown(UPLOAD_HINT, elem_id="upload-message")
            download_all = gr.HTML(
                views.download_all_link(False, None),
                elem_id="download-all-box",
                scale=0,
                min_width=170,
            )
        # Closed: at 1280x800 the worklist needs the height (one line says where help is).
        with gr.Accordion("How to use", open=False, elem_id="guide") as guide:
            gr.Markdown(views.GUIDE)
        worklist = gr.HTML(
            {"rows": [], "counts": {}, "badges": BADGE_TEXT_BY_VALUE},
            html_template=asset("worklist.html"),
            css_template=asset("badges.css") + asset("worklist.css"),
            js_on_load=asset("worklist_alerts.js") + asset("worklist.js"),
            elem_id="worklist",
        )
        study = gr.HTML(
            None,
            html_template=asset("study.html"),
            css_template=asset("badges.css") + asset("study.css"),
            js_on_load="".join(
                asset(name)
                for name in ("study.js", "study_viewer.js", "study_review.js", "study_start.js")
            ),
            elem_id="study-view",
        )
        timer = gr.Timer(REFRESH_SECONDS)

        refresh_outputs = [banner, worklist, study, download_all, shown]
        app.load(
            actions.ensure_session,
            inputs=[session],
            outputs=[session, user_bar],
        ).then(actions.refresh, inputs=[session, selected, shown], outputs=refresh_outputs)
        uploads.upload(
            actions.submit,
            inputs=[session, uploads, stat],
            outputs=[upload_message, uploads, guide, stat],
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
        study.study_review(
            actions.review,
            inputs=[session, selected, shown],
            outputs=refresh_outputs,
            show_progress="hidden",
        )
    return app
