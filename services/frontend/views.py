"""Pure functions from task views to what the page shows: tables, the detail text, chart data."""

from __future__ import annotations

import pandas as pd

from services.broker.schemas import StudyResult
from services.core.reports import DEMO_NOTICE
from services.core.schemas import REPORT_COLUMNS, StudyReport
from services.frontend.service import TaskState, TaskView

STATUS_COLUMNS = ("study file", "status", "progress", "details", "submitted (UTC)")
# The customer's columns, then what a radiologist asks next: what is worst, or why it failed.
RESULT_COLUMNS = (*REPORT_COLUMNS, "most_dangerous_pathology_type", "failure_reason")
STATE_LABELS = {
    TaskState.QUEUED: "queued",
    TaskState.PROCESSING: "processing",
    TaskState.DONE: "done",
    TaskState.FAILED: "FAILED",
}

GUIDE = """
1. Choose one or more studies: a **.zip** of a study's DICOM files (one study per zip is
   typical; a zip holding several studies gives one row per study), or the loose **.dcm**
   files of one series (they are screened together as one study).
2. Press **Screen the studies**. Each study is queued and processed by the next free
   worker; the table shows *queued*, *processing* (with progress) and *done*.
3. The **Results** table holds the report columns; pick a study under **Study details** for
   its warnings, the chest-CT check, the finding probabilities and the images the model saw.
4. Download the xlsx of all your studies, or a study's own xlsx and warnings file.

Your studies stay listed after a page reload: this browser keeps a private session key.
Studies that are not chest CTs (or cannot be read) get a *Failure* row with the reason.
"""

DEMO_BANNER_HTML = (
    '<div id="demo-weights-banner" style="background:#b00020;color:white;padding:12px 16px;'
    'border-radius:8px;font-weight:600;font-size:1.05em">' + DEMO_NOTICE + "</div>"
)


def status_frame(views: list[TaskView]) -> pd.DataFrame:
    rows = [
        [
            view.task.original_filename,
            STATE_LABELS[view.state],
            f"{round(view.fraction * 100)}%",
            view.message,
            view.task.submitted_at.strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for view in views
    ]
    return pd.DataFrame(rows, columns=list(STATUS_COLUMNS))


def _cell(report: StudyReport, column: str) -> object:
    value = getattr(report, column)
    if column == "processing_status":
        return value.value
    if column == "probability_of_pathology" and value is not None:
        return round(value, 4)
    if column == "time_of_processing":
        return round(value, 2)
    return "" if value is None else value


def results_frame(views: list[TaskView]) -> pd.DataFrame:
    """The customer's columns, one row per study of every finished task."""
    rows = [
        [_cell(report, column) for column in RESULT_COLUMNS]
        for view in views
        if view.result is not None
        for report in view.result.reports
    ]
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def study_choices(views: list[TaskView]) -> list[tuple[str, str]]:
    """(label, value) for the detail selector; value is ``<task_id>:<report index>``."""
    choices = []
    for view in views:
        reports = view.result.reports if view.result is not None else []
        if len(reports) <= 1:
            choices.append(
                (f"{view.task.original_filename} — {view.state.value}", f"{view.task.task_id}:0")
            )
            continue
        for index, report in enumerate(reports):
            label = f"{view.task.original_filename} — study {index + 1} ({report.processing_status.value})"
            choices.append((label, f"{view.task.task_id}:{index}"))
    return choices


def parse_choice(value: str | None) -> tuple[str, int] | None:
    if not value or ":" not in value:
        return None
    task_id, _, index = value.partition(":")
    return (task_id, int(index)) if index.isdigit() else None


def _bullet_list(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) if items else "- none"


def detail_markdown(view: TaskView, index: int) -> str:
    lines = [
        f"### {view.task.original_filename}",
        f"**Status:** {STATE_LABELS[view.state]} — {view.message}",
    ]
    result = view.result
    if result is None or not result.reports:
        return "\n\n".join(lines)
    report = result.reports[min(index, len(result.reports) - 1)]
    lines.append(
        "| field | value |\n|---|---|\n"
        + "\n".join(
            f"| {column} | {_cell(report, column)} |"
            for column in RESULT_COLUMNS
            if column not in ("path_to_study", "failure_reason")
        )
    )
    if report.failure_reason:
        lines.append(f"**Why it failed:** {report.failure_reason}")
    lines.append("**Warnings**\n\n" + _bullet_list(report.warnings))
    evidence = report.chest_check
    if evidence is not None:
        image = ", ".join(f"{key}: {value}" for key, value in evidence.image_evidence.items())
        lines.append(
            "**Chest-CT check**\n\n"
            + _bullet_list(
                [
                    f"verdict: {evidence.reason}",
                    f"DICOM tags: {_verdict(evidence.metadata_verdict)}"
                    + (
                        f" ({'; '.join(evidence.metadata_evidence)})"
                        if evidence.metadata_evidence
                        else ""
                    ),
                    f"images ({evidence.image_detector}): {_verdict(evidence.image_verdict)}"
                    + (f" ({image})" if image else ""),
                    f"coverage: {evidence.coverage_mm:.0f} mm",
                ]
            )
        )
    quality = report.quality
    if quality is not None:
        lines.append(
            "**Series**\n\n"
            + _bullet_list(
                [
                    f"{quality.n_slices} slices of {quality.rows}×{quality.columns}, "
                    f"spacing {quality.slice_spacing_mm:.2f} mm, pixels "
                    f"{quality.pixel_spacing_mm[0]:.2f}×{quality.pixel_spacing_mm[1]:.2f} mm",
                    f"missing slices: {quality.missing_slices} ({quality.missing_slices_percent:.1f}%), "
                    f"duplicate positions: {quality.duplicate_positions}, "
                    f"gantry tilt: {quality.gantry_tilt_degrees:.1f}°",
                ]
            )
        )
    if report.model is not None:
        lines.append(
            f"**Model:** {report.model.version} ({report.model.backend}, {report.model.flavour})"
            + (" — **demo weights**" if report.demo_weights else "")
        )
    return "\n\n".join(lines)


def _verdict(value: bool | None) -> str:
    return {True: "chest", False: "not chest", None: "undecided"}[value]


def findings_frame(view: TaskView | None, index: int) -> pd.DataFrame:
    """finding / probability / above threshold; typed even when empty (the chart takes its
    axis types from the first frame it is given)."""
    findings = []
    if view is not None and view.result is not None and view.result.reports:
        findings = view.result.reports[min(index, len(view.result.reports) - 1)].findings
    return pd.DataFrame(
        {
            "finding": pd.Series([f.label for f in findings], dtype="str"),
            "probability": pd.Series([round(f.probability, 4) for f in findings], dtype="float64"),
            "above threshold": pd.Series(
                ["yes" if f.positive else "no" for f in findings], dtype="str"
            ),
        }
    )


def preview_files(result: StudyResult | None, index: int) -> list[tuple[str, str]]:
    """(relative path, caption) of the preview images of study ``index`` of a task."""
    if result is None:
        return []
    prefix = f"study{index + 1}_"
    previews = []
    for item in result.files_of_kind("preview"):
        name = item.path.rsplit("/", 1)[-1]
        if name.startswith(prefix):
            caption = name[len(prefix) :].removesuffix(".png").replace("_", " ") + "%"
            previews.append((item.path, caption))
    return previews


def download_files(result: StudyResult | None) -> list[str]:
    if result is None:
        return []
    return [item.path for kind in ("xlsx", "warnings") for item in result.files_of_kind(kind)]
