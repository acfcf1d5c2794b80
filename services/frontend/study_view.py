"""Pure functions from one study to what its view shows, as plain data: the call in one line,
findings above threshold first, warnings in plain words with their numbers one click away,
the chest-CT check, the slice viewer's data and the study's files.

Every value is shown as text by the page (services/frontend/static/study.js).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.broker.schemas import StudyResult
from services.core.quality import QUALITY_FLAG_TEXT
from services.core.schemas import ChestCheckEvidence, IntakeSummary, SeriesDecision, StudyReport
from services.frontend.download_names import download_name
from services.frontend.queue_status import QueuePlace
from services.frontend.site_time import SiteClock
from services.frontend.study_header import identity, patient_lines, review_lines
from services.frontend.study_models import (
    ChestCheckLines,
    Download,
    FindingLine,
    Headline,
    OtherStudy,
    Preview,
    StudyDocument,
)
from services.frontend.views import (
    display_name,
    failure_reason,
    progress_text,
    queue_text,
    short_reason,
)
from services.frontend.worklist_rows import (
    BADGE_TEXT,
    Badge,
    call_note,
    has_call,
    record_badge,
)
from services.registry.records import Review, StudyRecord

FileUrl = Callable[[str], str | None]  # storage-relative path -> URL the browser can fetch
ReadJson = Callable[[str], dict[str, Any] | None]  # storage-relative path -> its JSON document

# Readable names of the image detector's numbers (services/core/body_part/); others are shown
# with underscores as spaces.
EVIDENCE_LABELS = {
    "evaluated_slices": "slices evaluated",
    "lung_slices": "slices with lungs",
    "lung_slice_fraction": "share of slices with lungs",
    "lung_extent_mm": "lung extent along the body (mm)",
    "lung_volume_ml": "lung volume (ml)",
    "max_lung_area_fraction": "largest lung area (share of a slice)",
    "evaluated_slice_spacing_mm": "spacing of the evaluated slices (mm)",
    "mean_lung_hu": "mean lung density (HU)",
}
TAG_VERDICTS = {True: "say chest", False: "say another body part", None: "name no body part"}


def split_headline(text: str) -> Headline:
    """ "gantry tilt: the slices stack at 18.5 degrees ..." -> headline and its numbers."""
    head, separator, rest = text.partition(": ")
    if not separator or len(head) > 80:
        return {"headline": text, "detail": ""}
    return {"headline": head, "detail": rest}


def intake_notes(intake: IntakeSummary | None) -> list[str]:
    """What the upload held besides the images read: skipped and unreadable files."""
    if intake is None:
        return []
    notes = []
    if intake.skipped_non_dicom:
        notes.append(
            f"{intake.skipped_non_dicom:,} file(s) in the upload were not DICOM and were skipped"
        )
    if intake.skipped_dicomdir:
        notes.append(f"{intake.skipped_dicomdir:,} DICOMDIR index file(s) were skipped")
    if intake.unreadable_dicom:
        notes.append(f"{intake.unreadable_dicom:,} DICOM file(s) could not be read")
    if intake.nested_archives:
        notes.append(f"{intake.nested_archives:,} archive(s) inside the upload were unpacked")
    return notes


def call_line(record: StudyRecord, place: QueuePlace | None) -> tuple[Badge, str]:
    """The badge and the call in one line."""
    badge = record_badge(record)
    if badge is Badge.QUEUED:
        return badge, f"Queued: {queue_text(place)}"
    if badge is Badge.PROCESSING:
        return badge, f"Processing: {progress_text(record)}"
    if badge in (Badge.FAILED, Badge.NOT_ANALYSED):
        return badge, f"{BADGE_TEXT[badge]}: {short_reason(failure_reason(record))}"
    probability = record.probability_of_pathology or 0.0
    line = f"{BADGE_TEXT[badge]}: P(pathology) {probability:.3f}"
    if badge is Badge.PATHOLOGY and record.most_dangerous_finding:
        line += f"; most dangerous finding: {record.most_dangerous_finding}"
    return badge, line


def findings_list(report: StudyReport) -> list[FindingLine]:
    """Above threshold first (most probable first), then the rest."""
    ordered = sorted(report.findings, key=lambda f: (not f.positive, -f.probability))
    return [
        {
            "label": finding.label,
            "probability": round(finding.probability, 3),
            "threshold": round(finding.threshold, 3),
            "positive": finding.positive,
        }
        for finding in ordered
    ]


def chest_check_lines(evidence: ChestCheckEvidence) -> ChestCheckLines:
    """The verdict (its reason holds the image summary), both halves in words, the numbers."""
    numbers = [
        [EVIDENCE_LABELS.get(key, key.replace("_", " ")), _number_text(key, value)]
        for key, value in evidence.image_evidence.items()
        if key != "summary"
    ]
    numbers.append(["coverage along the body (mm)", f"{evidence.coverage_mm:.0f}"])
    return {
        "verdict": split_headline(evidence.reason),
        "lines": [
            f"DICOM tags {TAG_VERDICTS[evidence.metadata_verdict]}",
            "images: "
            + (
                "lungs found across the series"
                if evidence.image_verdict
                else "no lungs across the series"
            )
            + f" ({evidence.image_detector})",
            *_body_part_regression_line(evidence),
        ],
        "tags": list(evidence.metadata_evidence),
        "numbers": numbers,
    }


def _body_part_regression_line(evidence: ChestCheckEvidence) -> list[str]:
    """What the body-part regression model saw, labelled DEMO when it could not decide."""
    regression = evidence.body_part_regression
    if regression is None:
        return []
    label = "body-part regression" + (
        " (DEMO weights, not used for the verdict)" if regression.demo else ""
    )
    return [f"{label}: {regression.summary}"]


def _number_text(key: str, value: object) -> str:
    if isinstance(value, float) and key.endswith("_fraction"):
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def quality_numbers(report: StudyReport) -> list[list[str]]:
    quality = report.quality
    if quality is None:
        return []
    numbers = [
        ["slices", f"{quality.n_slices} of {quality.rows}×{quality.columns} pixels"],
        ["slice spacing (mm)", f"{quality.slice_spacing_mm:.2f}"],
        ["pixel spacing (mm)", "×".join(f"{value:.2f}" for value in quality.pixel_spacing_mm)],
        ["coverage (mm)", f"{quality.coverage_mm:.0f}"],
        [
            "missing slices",
            f"{quality.missing_slices} ({quality.missing_slices_percent:.1f}%)",
        ],
        ["duplicate positions", str(quality.duplicate_positions)],
        ["gantry tilt (degrees)", f"{quality.gantry_tilt_degrees:.1f}"],
    ]
    for label, value in (
        ("kernel", quality.convolution_kernel),
        ("patient position", quality.patient_position),
        ("slice thickness (mm)", quality.slice_thickness_mm),
    ):
        if value:
            numbers.append([label, str(value)])
    return numbers


def other_studies(record: StudyRecord, studies: list[StudyRecord]) -> list[OtherStudy]:
    """The patient's other studies (same PatientID and issuer): date, call, how to open."""
    return [
        {
            "key": other.key,
            "date": other.study_date or other.received_at.strftime("%Y-%m-%d"),
            "badge": record_badge(other).value,
            "reviewed": other.review is not None,
            "badge_text": BADGE_TEXT[record_badge(other)],
            "description": other.study_description or "",
            "finding": other.most_dangerous_finding or "",
        }
        for other in studies
        if other.key != record.key
    ]


def viewer_data(
    result: StudyResult | None, index: int, file_url: FileUrl, read_json: ReadJson
) -> dict[str, Any] | None:
    """The slice viewer's metadata with the URL of its data, or None if it has none."""
    if result is None:
        return None
    name = f"study{index + 1}.json"
    for item in result.files_of_kind("viewer"):
        if item.path.rsplit("/", 1)[-1] != name:
            continue
        metadata = read_json(item.path)
        folder = item.path.rsplit("/", 1)[0]
        url = file_url(f"{folder}/{metadata['data_file']}") if metadata else None
        if metadata is None or url is None:
            return None
        return {**metadata, "url": url}
    return None


def study_files(
    result: StudyResult | None, index: int, file_url: FileUrl
) -> tuple[list[Preview], list[Download]]:
    """(previews of the model input, downloads) with their URLs."""
    if result is None:
        return [], []
    prefix = f"study{index + 1}_"
    previews: list[Preview] = []
    for item in result.files_of_kind("preview"):
        name = item.path.rsplit("/", 1)[-1]
        url = file_url(item.path)
        if name.startswith(prefix) and url:
            caption = name[len(prefix) :].removesuffix(".png").replace("_", " at ") + "%"
            previews.append({"url": url, "caption": caption})
    downloads: list[Download] = [
        {"url": url, "name": item.path.rsplit("/", 1)[-1], "kind": kind}
        for kind in ("xlsx", "warnings")
        for item in result.files_of_kind(kind)
        if (url := file_url(item.path))
    ]
    return previews, downloads


def series_text(decision: SeriesDecision) -> str:
    number = (
        f"series {decision.series_number}"
        if decision.series_number is not None
        else "a series without a number"
    )
    text = f"{number} ({decision.modality or 'modality not given'}, {decision.n_images} images)"
    return text + (f" '{decision.description}'" if decision.description else "")


def study_view(
    record: StudyRecord,
    result: StudyResult | None,
    *,
    n_studies: int,
    place: QueuePlace | None,
    patient_studies: list[StudyRecord],
    file_url: FileUrl,
    read_json: ReadJson,
    clock: SiteClock | None = None,
    reviews: list[Review] | None = None,
    may_review: bool = False,
    task_records: list[StudyRecord] | None = None,
) -> StudyDocument:
    """Everything the study view shows (its shape: study_models.StudyDocument).
    ``task_records``: the studies of the record's task (its files are the task's; they name
    its downloads), the record alone by default."""
    clock = clock or SiteClock()
    index = record.report_index
    reports = result.reports if result is not None else []
    report = reports[index] if index < len(reports) else None
    badge, line = call_line(record, place)
    previews, downloads = study_files(result, index, file_url)
    for item in downloads:
        item["name"] = download_name(task_records or [record], item["name"])
    positives = len(record.findings) if badge in (Badge.PATHOLOGY, Badge.NORMAL) else 0
    document: StudyDocument = {
        "key": record.key,
        "title": display_name(record, n_studies),
        "badge": badge.value,
        "badge_text": BADGE_TEXT[badge],
        "call": line,
        "call_note": call_note(badge, positives),
        # The whole reason when the call shows it shortened (its numbers in parentheses).
        "call_detail": "",
        "fraction": round(record.progress, 3) if badge is Badge.PROCESSING else None,
        "flags": [QUALITY_FLAG_TEXT[flag] for flag in record.quality_flags],
        "patient": patient_lines(record, clock),
        "identity": identity(record, report, clock),
        "findings": findings_list(report) if report is not None else [],
        "warnings": [split_headline(text) for text in (report.warnings if report else [])],
        "notes": intake_notes(report.intake if report else None),
        "chest_check": chest_check_lines(report.chest_check)
        if report and report.chest_check
        else None,
        "quality": quality_numbers(report) if report else [],
        "series": [
            {
                "text": series_text(decision),
                "selected": decision.selected,
                "reason": decision.reason,
            }
            for decision in (report.series_decisions if report else [])
        ],
        "demo": bool(record.demo_weights),
        "model": record.model_version or "",
        "viewer": viewer_data(result, index, file_url, read_json),
        "previews": previews,
        "downloads": downloads,
        "patient_studies": other_studies(record, patient_studies),
        "reviews": review_lines(reviews or [], clock, badge),
        # Agree with the model's call, or, where it made none (Not analysed, Failed), confirm
        # the outcome or make one's own call.
        "has_call": has_call(badge),
        # A review needs a result of the model or a refusal to agree with.
        "may_review": may_review and record.state.final,
        "finding_labels": [item["label"] for item in findings_list(report)] if report else [],
    }
    if badge in (Badge.FAILED, Badge.NOT_ANALYSED):
        reason = failure_reason(record)
        if short_reason(reason) != reason:
            document["call_detail"] = reason
    if document["viewer"] is None:
        document["viewer_missing"] = (
            "No images to show: the study is not processed yet."
            if badge in (Badge.QUEUED, Badge.PROCESSING)
            else "No images to show: no series of this study could be read as a volume."
        )
    return document
