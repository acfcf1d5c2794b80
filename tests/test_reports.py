"""The report files read back: xlsx columns and cell types, warnings file, JSON per study."""

from __future__ import annotations

import json

from openpyxl import load_workbook
from report_support import screened_report

from services.core.labels import FINDING_LABELS
from services.core.reports import (
    ABOUT_SHEET,
    DEMO_NOTICE,
    REPORT_SHEET,
    finding_column,
    report_columns,
    write_reports,
)
from services.core.schemas import (
    REPORT_COLUMNS,
    ProcessingStatus,
    StudyReport,
)

PATIENT_NAME = "DOE^JANE"


def _success(demo: bool = True) -> StudyReport:
    return screened_report(demo=demo, path_to_study=f"incoming/{PATIENT_NAME}.zip")


def _failure() -> StudyReport:
    return StudyReport(
        path_to_study="incoming/head.zip",
        study_uid="9.8.7",
        processing_status=ProcessingStatus.FAILURE,
        time_of_processing=0.75,
        failure_reason="not a chest CT: BodyPartExamined HEAD",
        warnings=["gantry tilt 12 degrees"],
    )


def _rows(path):
    sheet = load_workbook(path)[REPORT_SHEET]
    rows = list(sheet.iter_rows(values_only=True))
    header, body = list(rows[0]), rows[1:]
    return header, [dict(zip(header, row, strict=True)) for row in body]


def test_xlsx_columns_start_with_the_customers_seven(tmp_path):
    files = write_reports([_success(), _failure()], tmp_path)
    header, rows = _rows(files.xlsx)
    assert tuple(header[:7]) == REPORT_COLUMNS
    assert header[7] == "most_dangerous_pathology_type"
    assert header[8 : 8 + len(FINDING_LABELS)] == [
        finding_column(label) for label in FINDING_LABELS
    ]
    assert header == report_columns()
    assert len(rows) == 2


def test_xlsx_cell_types(tmp_path):
    files = write_reports([_success(), _failure()], tmp_path)
    _, (success, failure) = _rows(files.xlsx)
    assert isinstance(success["path_to_study"], str)
    assert success["study_uid"] == "1.2.3.4"
    assert success["series_uid"] == "1.2.3.4.5"
    assert isinstance(success["probability_of_pathology"], float)
    assert 0.0 <= success["probability_of_pathology"] <= 1.0
    assert success["pathology"] == 1
    assert isinstance(success["pathology"], int)
    assert success["processing_status"] == "Success"
    assert success["time_of_processing"] == 12.5
    assert success["most_dangerous_pathology_type"] == "Lymphadenopathy"
    assert success[finding_column("Cancer")] == 19 / 40
    assert success["warnings"] == "uneven slice spacing"
    assert success["model_version"] == "demo-abcdef012345"
    assert success["demo_weights"] == 1
    assert success["notice"] == DEMO_NOTICE

    assert failure["processing_status"] == "Failure"
    assert isinstance(failure["time_of_processing"], float)
    for empty in ("series_uid", "probability_of_pathology", "pathology", "model_version"):
        assert failure[empty] is None
    assert failure["most_dangerous_pathology_type"] is None
    assert failure[finding_column("Cancer")] is None
    assert failure["failure_reason"] == "not a chest CT: BodyPartExamined HEAD"


def test_demo_notice_is_visible_only_with_demo_weights(tmp_path):
    demo = write_reports([_success(demo=True)], tmp_path / "demo")
    about = dict(load_workbook(demo.xlsx)[ABOUT_SHEET].iter_rows(values_only=True))
    assert about["demo_weights"] == 1
    assert about["notice"] == DEMO_NOTICE
    assert "DEMO WEIGHTS" in demo.warnings.read_text()

    real = write_reports([_success(demo=False)], tmp_path / "real")
    _, (row,) = _rows(real.xlsx)
    assert row["demo_weights"] == 0
    assert row["notice"] is None
    about = dict(load_workbook(real.xlsx)[ABOUT_SHEET].iter_rows(values_only=True))
    assert about["demo_weights"] == 0
    assert "notice" not in about
    assert "DEMO WEIGHTS" not in real.warnings.read_text()


def test_warnings_file_lists_every_study_with_reasons(tmp_path):
    files = write_reports([_success(), _failure()], tmp_path)
    text = files.warnings.read_text()
    assert "incoming/head.zip" in text
    assert "study_uid: 9.8.7" in text
    assert "status: Failure" in text
    assert "status: Success" in text
    assert "failure: not a chest CT: BodyPartExamined HEAD" in text
    assert "warning: gantry tilt 12 degrees" in text
    assert "warning: uneven slice spacing" in text


def test_one_json_per_study_round_trips_without_patient_data_in_names(tmp_path):
    reports = [_success(), _failure()]
    files = write_reports(reports, tmp_path)
    assert len(files.json_files) == 2
    assert sorted(p.name for p in (tmp_path / "json").iterdir()) == sorted(
        p.name for p in files.json_files
    )
    for path, report in zip(files.json_files, reports, strict=True):
        assert PATIENT_NAME.split("^")[0] not in path.name
        assert report.study_uid not in path.name
        assert StudyReport.model_validate_json(path.read_text()) == report
        assert json.loads(path.read_text())["processing_status"] == report.processing_status.value


def test_empty_report_list_still_writes_valid_files(tmp_path):
    files = write_reports([], tmp_path)
    header, rows = _rows(files.xlsx)
    assert tuple(header[:7]) == REPORT_COLUMNS
    assert rows == []
    assert files.json_files == []


def test_xlsx_is_readable_as_is_widths_filter_frozen_header(tmp_path):
    failure = _failure().model_copy(update={"demo_weights": True})
    files = write_reports([_success(), failure], tmp_path)
    sheet = load_workbook(files.xlsx)[REPORT_SHEET]
    header = [cell.value for cell in sheet[1]]
    assert sheet.freeze_panes == "B2"
    assert sheet.auto_filter.ref == f"A1:{sheet.cell(row=1, column=len(header)).column_letter}3"
    widths = {
        name: sheet.column_dimensions[sheet.cell(row=1, column=index).column_letter].width
        for index, name in enumerate(header, start=1)
    }
    assert widths["path_to_study"] >= len(f"incoming/{PATIENT_NAME}.zip")
    assert widths["probability_of_pathology"] >= len("probability_of_pathology")
    assert all(8 <= width <= 60 for width in widths.values())
    status = header.index("processing_status") + 1
    assert sheet.cell(row=3, column=status).font.color.rgb.endswith("C00000")  # Failure in red
    # A Failure row of a demo deployment carries the flag and the notice like the others.
    _, (_success_row, failure_row) = _rows(files.xlsx)
    assert failure_row["demo_weights"] == 1
    assert failure_row["notice"] == DEMO_NOTICE
