"""Writing finished StudyReports: the customer's xlsx, the warnings file, one JSON per study.

The xlsx starts with exactly the customer's seven columns (REPORT_COLUMNS) and then
adds ``most_dangerous_pathology_type``, the per-finding probabilities, warnings,
the failure reason and the model. File names never carry patient data: the JSON
files are numbered and keyed by a hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpyxl import Workbook
from openpyxl.comments import Comment
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from services.core.labels import FINDING_LABELS
from services.core.schemas import REPORT_COLUMNS, StudyReport

XLSX_NAME = "output.xlsx"
WARNINGS_NAME = "warnings_and_errors.txt"
JSON_DIR_NAME = "json"
REPORT_SHEET = "report"
ABOUT_SHEET = "about"
DEMO_NOTICE = (
    "DEMO WEIGHTS: this model has seeded, untrained weights; "
    "its probabilities mean nothing and must not be used for any decision."
)
EXTRA_COLUMNS: tuple[str, ...] = ("most_dangerous_pathology_type",)
TRAILING_COLUMNS: tuple[str, ...] = (
    "warnings",
    "failure_reason",
    "model_version",
    "demo_weights",
    "notice",
)


def finding_column(label: str) -> str:
    """Column name of one finding's probability, e.g. ``probability_lung_nodule``."""
    return "probability_" + re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


def report_columns(labels: Sequence[str] = FINDING_LABELS) -> list[str]:
    return [
        *REPORT_COLUMNS,
        *EXTRA_COLUMNS,
        *(finding_column(label) for label in labels),
        *TRAILING_COLUMNS,
    ]


def report_row(report: StudyReport, labels: Sequence[str] = FINDING_LABELS) -> list[Any]:
    """One xlsx row: plain str / float / int / None cells in ``report_columns`` order."""
    probabilities = {finding.label: finding.probability for finding in report.findings}
    return [
        report.path_to_study,
        report.study_uid,
        report.series_uid,
        None if report.probability_of_pathology is None else float(report.probability_of_pathology),
        None if report.pathology is None else int(report.pathology),
        report.processing_status.value,
        float(report.time_of_processing),
        report.most_dangerous_pathology_type,
        *(None if label not in probabilities else float(probabilities[label]) for label in labels),
        "; ".join(report.warnings) or None,
        report.failure_reason,
        report.model.version if report.model else None,
        int(report.demo_weights),
        DEMO_NOTICE if report.demo_weights else None,
    ]


def _labels_of(reports: Sequence[StudyReport]) -> list[str]:
    """The model's labels in output order (from the first report that has findings)."""
    for report in reports:
        if report.findings:
            return [finding.label for finding in report.findings]
    return list(FINDING_LABELS)


# Column widths in characters: wide enough for the header or the longest value, within limits
# (a UID is 64 characters; the warnings and failure reason wrap instead of spreading).
MIN_COLUMN_WIDTH = 8
MAX_COLUMN_WIDTH = 48
WRAPPED_COLUMNS = ("warnings", "failure_reason", "notice")
WRAPPED_WIDTH = 60
FAILURE_FONT = Font(bold=True, color="C00000")
PATHOLOGY_FILL = PatternFill("solid", fgColor="FFE0B2")


def _cell_text_length(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, float):
        return len(f"{value:.4f}")
    return len(str(value))


def format_report_sheet(sheet: Worksheet, columns: Sequence[str]) -> None:
    """Widths, a frozen header and first column, an autofilter, Failure and pathology marks."""
    for index, name in enumerate(columns, start=1):
        letter = get_column_letter(index)
        if name in WRAPPED_COLUMNS:
            sheet.column_dimensions[letter].width = WRAPPED_WIDTH
            for row in sheet.iter_rows(min_row=2, min_col=index, max_col=index):
                row[0].alignment = Alignment(wrap_text=True, vertical="top")
            continue
        longest = max(
            _cell_text_length(row[0])
            for row in sheet.iter_rows(min_col=index, max_col=index, values_only=True)
        )
        sheet.column_dimensions[letter].width = min(
            max(longest + 2, MIN_COLUMN_WIDTH), MAX_COLUMN_WIDTH
        )
    sheet.freeze_panes = "B2"  # the header and the study's path stay in view
    sheet.auto_filter.ref = sheet.dimensions
    status = columns.index("processing_status") + 1
    pathology = columns.index("pathology") + 1
    for row in sheet.iter_rows(min_row=2):
        if row[status - 1].value == "Failure":
            row[status - 1].font = FAILURE_FONT
        if row[pathology - 1].value == 1:
            row[pathology - 1].fill = PATHOLOGY_FILL


def write_xlsx(reports: Sequence[StudyReport], path: Path) -> Path:
    labels = _labels_of(reports)
    workbook = Workbook()
    sheet = workbook.active
    sheet.title = REPORT_SHEET
    columns = report_columns(labels)
    sheet.append(columns)
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    for report in reports:
        sheet.append(report_row(report, labels))
    format_report_sheet(sheet, columns)
    demo = any(report.demo_weights for report in reports)
    if demo:
        # Visible where the numbers are: the notice column is red, the header carries a comment.
        notice_column = columns.index("notice") + 1
        red = Font(bold=True, color="C00000")
        fill = PatternFill("solid", fgColor="FFE0E0")
        for row in sheet.iter_rows(min_row=1, min_col=notice_column, max_col=notice_column):
            for cell in row:
                cell.font = red
                cell.fill = fill
        probability_header = sheet.cell(
            row=1, column=REPORT_COLUMNS.index("probability_of_pathology") + 1
        )
        probability_header.comment = Comment(DEMO_NOTICE, "chest-ct-screening")
    about = workbook.create_sheet(ABOUT_SHEET)
    about.append(["studies", len(reports)])
    about.append(["succeeded", sum(report.succeeded for report in reports)])
    about.append(["failed", sum(not report.succeeded for report in reports)])
    versions = sorted({report.model.version for report in reports if report.model})
    about.append(["model_version", ", ".join(versions) or None])
    about.append(["demo_weights", int(demo)])
    if demo:
        about.append(["notice", DEMO_NOTICE])
        about.cell(row=about.max_row, column=2).font = Font(bold=True, color="C00000")
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook.save(path)
    return path


def warnings_text(reports: Sequence[StudyReport]) -> str:
    """Per study: where it came from, its UIDs, status, every warning and the failure reason."""
    blocks = []
    for index, report in enumerate(reports, start=1):
        lines = [
            f"[{index}] {report.path_to_study}",
            f"  study_uid: {report.study_uid or '-'}",
            f"  series_uid: {report.series_uid or '-'}",
            f"  status: {report.processing_status.value}",
        ]
        if report.failure_reason:
            lines.append(f"  failure: {report.failure_reason}")
        lines.extend(f"  warning: {warning}" for warning in report.warnings)
        if not report.failure_reason and not report.warnings:
            lines.append("  no warnings")
        if report.demo_weights:
            lines.append(f"  note: {DEMO_NOTICE}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def study_file_key(report: StudyReport) -> str:
    """12 hex digits of a hash of source and UID: names a study's files without patient data
    (its JSON report here, the batch's preview images in services/core/previews.py)."""
    key = f"{report.path_to_study}\0{report.study_uid or ''}".encode()
    return hashlib.sha256(key).hexdigest()[:12]


def json_file_name(index: int, report: StudyReport) -> str:
    """``study_0001_<key>.json``: numbered, keyed by ``study_file_key``."""
    return f"study_{index:04d}_{study_file_key(report)}.json"


@dataclass(frozen=True)
class ReportFiles:
    xlsx: Path
    warnings: Path
    json_files: list[Path]


def write_reports(reports: Sequence[StudyReport], output_dir: Path) -> ReportFiles:
    """Write output.xlsx, warnings_and_errors.txt and json/*.json into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    xlsx = write_xlsx(reports, output_dir / XLSX_NAME)
    warnings = output_dir / WARNINGS_NAME
    warnings.write_text(warnings_text(reports), encoding="utf-8")
    json_dir = output_dir / JSON_DIR_NAME
    json_dir.mkdir(exist_ok=True)
    json_files = []
    for index, report in enumerate(reports, start=1):
        path = json_dir / json_file_name(index, report)
        # The patient's identity stays out of files (it travels in the result and the registry).
        document = report.model_dump_json(indent=2, exclude={"identity"})
        path.write_text(document + "\n", encoding="utf-8")
        json_files.append(path)
    return ReportFiles(xlsx=xlsx, warnings=warnings, json_files=json_files)
