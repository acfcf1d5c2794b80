"""``python -m services.registry export-reviews OUT_DIR``: the department's reviews as the
training data of its next heads.

    OUT_DIR/labels.csv          VolumeName + one 0/1 column per finding (the CT-RATE layout
                                that ``python -m training train --labels`` reads)
    OUT_DIR/embeddings.parquet  one row per exported study, in ``training embed``'s columns
                                (name, study_uid, embedding, status, failure_reason,
                                input_path, encoder_version, demo_weights)

One row per reviewed study that kept its embedding (a Success report; the JSON report under
``storage/results/`` holds it), named ``<task_id>-<report_index>`` on both sides: never a
file name or anything of the patient.

How a study's labels are made from its latest review (``label_row``):

* a finding the reader marked is what they marked (present 1, absent 0);
* the reader's call is theirs when they disagreed (the opposite of the model's when they
  gave none), else the model's;
* an unmarked finding of a study the reader calls NORMAL is 0 (a normal study has none);
* an unmarked finding of a study the reader calls PATHOLOGY keeps the model's call (above
  its threshold: 1): the reader saw the findings listed and corrected only those they
  marked.

A finding that no exported study has (every row 0) is left out of labels.csv: a head cannot
learn a finding it never sees, and ``training train --task multilabel`` refuses a column of
one class. The heads trained on the export then lack it, and ``python -m
convertation.build_repository --missing-findings fill`` marks it "not assessed".

``training train`` takes "pathology" to mean "any finding is 1". A study whose labels would
contradict the reader's call (PATHOLOGY with no finding left, or NORMAL with a finding
marked present) is left out and counted: its labels cannot say what the reader said.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from services.broker.storage import load_result
from services.core.errors import ConfigurationError
from services.core.labels import FINDING_LABELS
from services.core.model_metadata import ENCODER_NAME
from services.core.schemas import StudyReport
from services.registry.records import Review, StudyFilter, StudyRecord
from services.registry.registry import Registry

LABELS_FILE = "labels.csv"
EMBEDDINGS_FILE = "embeddings.parquet"
LABEL_KEY_COLUMN = "VolumeName"  # training/data.py reads labels by this column
PAGE_ROWS = 500


class ExportSummary(BaseModel):
    reviewed: int = 0
    exported: int = 0
    without_embedding: int = 0  # failed, not analysed, deleted or purged
    contradicting: int = 0  # labels that cannot say the reader's call
    findings_left_out: list[str] = []  # no exported study has them

    def summary(self) -> str:
        return (
            f"{self.exported} reviewed studies exported of {self.reviewed}; left out: "
            f"{self.without_embedding} without an embedding, {self.contradicting} whose "
            "findings contradict the reader's call; "
            f"{len(self.findings_left_out)} finding column(s) without a positive study left out"
        )


def export_key(record: StudyRecord) -> str:
    return f"{record.task_id}-{record.report_index}"


def label_row(report: StudyReport, review: Review) -> dict[str, int] | None:
    """The 0/1 labels of each finding from the latest review (the rules in the module's
    docstring); None when they would contradict the reader's call."""
    model_call = bool(report.pathology)
    if review.agrees:
        call = model_call
    else:  # a disagreement without a call of its own is the opposite one (as the REST API)
        call = review.pathology if review.pathology is not None else not model_call
    model_positive = {finding.label for finding in report.findings if finding.positive}
    labels: dict[str, int] = {}
    for label in FINDING_LABELS:
        if label in review.findings:
            labels[label] = int(review.findings[label])
        else:
            labels[label] = int(call and label in model_positive)
    if any(labels.values()) != call:
        return None
    return labels


def _reviewed_records(registry: Registry) -> Iterator[StudyRecord]:
    cursor: str | None = None
    while True:
        page = registry.list_studies(StudyFilter(reviewed=True), limit=PAGE_ROWS, cursor=cursor)
        yield from page.items
        if page.next is None:
            return
        cursor = page.next


def _encoder_version(report: StudyReport) -> str | None:
    """As ``training embed`` writes it: the first 12 hex digits of the encoder's sha256."""
    for weight in report.model.weights if report.model else []:
        if weight.get("model") == ENCODER_NAME and weight.get("sha256"):
            return str(weight["sha256"])[:12]
    return None


def _embedding_row(key: str, report: StudyReport) -> dict[str, Any]:
    return {
        "name": key,
        "study_uid": report.study_uid,
        "embedding": report.embedding,
        "status": "Success",
        "failure_reason": None,
        "input_path": key,
        "encoder_version": _encoder_version(report),
        "demo_weights": report.demo_weights,
    }


def export_reviews(registry: Registry, storage_root: Path, out_dir: Path) -> ExportSummary:
    """Writes both files (each atomically; an export without a study writes the headers and
    an empty table, so a pipeline that runs it nightly never meets a missing file)."""
    summary = ExportSummary()
    labels: list[dict[str, Any]] = []
    embeddings: list[dict[str, Any]] = []
    results: dict[str, list[StudyReport]] = {}
    for record in _reviewed_records(registry):
        summary.reviewed += 1
        if record.task_id not in results:
            stored = load_result(storage_root, record.task_id)
            results[record.task_id] = stored.reports if stored is not None else []
        reports = results[record.task_id]
        report = reports[record.report_index] if record.report_index < len(reports) else None
        if report is None or not report.succeeded or report.embedding is None:
            summary.without_embedding += 1
            continue
        kept = registry.reviews(record.task_id, record.report_index)
        row = label_row(report, kept[-1]) if kept else None
        if row is None:
            summary.contradicting += 1
            continue
        key = export_key(record)
        labels.append({LABEL_KEY_COLUMN: key, **row})
        embeddings.append(_embedding_row(key, report))
        summary.exported += 1
    present = [name for name in FINDING_LABELS if any(row[name] for row in labels)]
    columns = present if labels else list(FINDING_LABELS)
    summary.findings_left_out = [name for name in FINDING_LABELS if name not in columns]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_labels(out_dir / LABELS_FILE, columns, labels)
    _write_embeddings(out_dir / EMBEDDINGS_FILE, embeddings)
    return summary


def _replace(target: Path, write: Any) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _write_labels(target: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    def write(path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(
                stream, fieldnames=[LABEL_KEY_COLUMN, *columns], extrasaction="ignore"
            )
            writer.writeheader()
            writer.writerows(rows)

    _replace(target, write)


def _write_embeddings(target: Path, rows: list[dict[str, Any]]) -> None:
    # pyarrow comes with the train extra, not with the services: imported only here.
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ConfigurationError(
            "export-reviews writes parquet: install the train extra (pyarrow)"
        ) from error
    # The columns and types of training/embed.py's EMBEDDING_SCHEMA (the services do not
    # import training: it brings torch).
    schema = pa.schema(
        [
            ("name", pa.string()),
            ("study_uid", pa.string()),
            ("embedding", pa.list_(pa.float32())),
            ("status", pa.string()),
            ("failure_reason", pa.string()),
            ("input_path", pa.string()),
            ("encoder_version", pa.string()),
            ("demo_weights", pa.bool_()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    _replace(target, lambda path: pq.write_table(table, path))
