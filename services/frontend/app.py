"""The Gradio page: upload, progress, results table, study details, downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from services.frontend import views
from services.frontend.service import FrontendService, TaskView, is_session_token, session_summary

REFRESH_SECONDS = 2.0
SESSION_STORAGE_KEY = "cts-session"


def build_app(service: FrontendService) -> gr.Blocks:
    def current_views(token: str | None) -> list[TaskView]:
        return service.session_views(token) if is_session_token(token) else []

    def find_view(token: str | None, choice: str | None) -> tuple[TaskView | None, int]:
        parsed = views.parse_choice(choice)
        if parsed is None:
            return None, 0
        task_id, index = parsed
        for view in current_views(token):
            if view.task.task_id == task_id:
                return view, index
        return None, 0

    def ensure_session(token: str | None) -> str:
        return token if is_session_token(token) else service.new_session_token()

    def submit(token: str | None, files: list[str] | None) -> tuple[str, Any]:
        if not is_session_token(token):
            return "The page is still starting; please try again in a second.", gr.skip()
        outcome = service.submit_uploads(token, [Path(path) for path in files or []])
        # Clear the picker once the files are queued, keep it if everything was refused.
        return outcome.message, (None if outcome.submitted else gr.skip())

    def refresh(token: str | None, choice: str | None, shown: str | None) -> tuple[Any, ...]:
        task_views = current_views(token)
        choices = views.study_choices(task_views)
        values = [value for _label, value in choices]
        if choice not in values:
            choice = values[0] if values else None
        view, index = find_view(token, choice)
        # Redraw the details only when what they show changed (no flicker every tick).
        signature = f"{choice}|{view.state.value if view else ''}|{view.message if view else ''}"
        details = detail_outputs(view, index) if signature != shown else (gr.skip(),) * 4
        return (
            gr.update(visible=service.demo_weights_in_use(task_views)),
            f"**Your studies:** {session_summary(task_views)}",
            views.status_frame(task_views),
            views.results_frame(task_views),
            gr.update(choices=choices, value=choice),
            signature,
            *details,
        )

    def detail_outputs(view: TaskView | None, index: int) -> tuple[Any, ...]:
        if view is None:
            return "Nothing selected yet.", None, [], []
        result = view.result
        previews = [
            (str(path), caption)
            for relative, caption in views.preview_files(result, index)
            if (path := service.file_path(relative)) is not None
        ]
        downloads = [
            str(path)
            for relative in views.download_files(result)
            if (path := service.file_path(relative)) is not None
        ]
        findings = views.findings_frame(view, index)
        return (
            views.detail_markdown(view, index),
            # None, not an empty frame: after an empty frame Gradio's coloured bar chart
            # stops drawing bars.
            findings if len(findings) else None,
            previews,
            downloads or None,
        )

    def select(token: str | None, choice: str | None) -> tuple[Any, ...]:
        view, index = find_view(token, choice)
        signature = f"{choice}|{view.state.value if view else ''}|{view.message if view else ''}"
        return (signature, *detail_outputs(view, index))

    def session_xlsx(token: str | None) -> Any:
        if not is_session_token(token):
            return None
        path = service.session_xlsx(token)
        if path is None:
            gr.Info("No finished study yet.")
            return None
        return str(path)

    # Uploads that were never queued (refused, page closed) are deleted after a day.
    with gr.Blocks(title="Chest CT screening", delete_cache=(3600, 86400)) as app:
        session = gr.BrowserState(
            None, storage_key=SESSION_STORAGE_KEY, secret=service.browser_state_secret()
        )
        shown_detail = gr.State(None)
        banner = gr.HTML(
            views.DEMO_BANNER_HTML, visible=service.demo_weights_in_use(), elem_id="demo-banner"
        )
        gr.Markdown(
            "# Chest CT screening\nScreens chest CT studies: P(pathology), 20 findings, data-quality warnings."
        )
        with gr.Accordion("How to use", open=True):
            gr.Markdown(views.GUIDE)
        with gr.Row():
            uploads = gr.File(
                label="Studies: .zip files of DICOM studies, or .dcm files of one series",
                file_count="multiple",
                file_types=[".zip", ".dcm"],
                elem_id="uploads",
                scale=3,
            )
            with gr.Column(scale=2):
                submit_button = gr.Button("Screen the studies", variant="primary", elem_id="submit")
                upload_message = gr.Markdown(elem_id="upload-message")
        summary = gr.Markdown(elem_id="summary")
        status_table = gr.Dataframe(
            value=views.status_frame([]),
            label="Uploaded studies",
            interactive=False,
            elem_id="status-table",
            wrap=True,
        )
        results_table = gr.Dataframe(
            value=views.results_frame([]),
            label="Results (the full UIDs are in the xlsx)",
            interactive=False,
            elem_id="results-table",
            max_chars=32,  # UIDs are long; the headers (<= 29 characters) stay whole
            column_widths=["13%", "17%", "17%", "11%", "8%", "10%", "10%", "14%"],
        )
        with gr.Row():
            session_xlsx_button = gr.Button(
                "Download all results (xlsx)", elem_id="session-xlsx-button"
            )
            session_xlsx_file = gr.File(
                label="All results", interactive=False, elem_id="session-xlsx"
            )
        gr.Markdown("## Study details")
        selected = gr.Dropdown(label="Study", choices=[], elem_id="study-select", interactive=True)
        with gr.Row():
            with gr.Column(scale=3):
                detail = gr.Markdown(elem_id="study-detail")
            with gr.Column(scale=2):
                chart = gr.BarPlot(
                    value=None,
                    x="finding",
                    y="probability",
                    color="above threshold",
                    y_lim=[0, 1],
                    x_label_angle=-45,
                    sort="-y",
                    color_map={"yes": "#c62828", "no": "#78909c"},
                    title="Finding probabilities",
                    height=360,
                    elem_id="findings-chart",
                )
        with gr.Row():
            previews = gr.Gallery(
                label="What the model saw (after preprocessing)",
                columns=4,
                height=300,
                elem_id="previews",
            )
            study_files = gr.File(
                label="This study's report files",
                file_count="multiple",
                interactive=False,
                elem_id="study-files",
            )
        timer = gr.Timer(REFRESH_SECONDS)

        refresh_outputs = [banner, summary, status_table, results_table, selected, shown_detail]
        detail_components = [detail, chart, previews, study_files]
        app.load(ensure_session, inputs=session, outputs=session).then(
            refresh,
            inputs=[session, selected, shown_detail],
            outputs=refresh_outputs + detail_components,
        )
        submit_button.click(
            submit, inputs=[session, uploads], outputs=[upload_message, uploads]
        ).then(
            refresh,
            inputs=[session, selected, shown_detail],
            outputs=refresh_outputs + detail_components,
        )
        timer.tick(
            refresh,
            inputs=[session, selected, shown_detail],
            outputs=refresh_outputs + detail_components,
            show_progress="hidden",
        )
        selected.input(
            select, inputs=[session, selected], outputs=[shown_detail, *detail_components]
        )
        session_xlsx_button.click(session_xlsx, inputs=session, outputs=session_xlsx_file)
    return app
