"""Reading what the dataset is built from: JSON reports with their preview images (batch
output folders, the stack's storage/results), the embeddings parquet of `python -m training
embed`, and a labels CSV.

Where the previews are: the batch writes ``OUTPUT_DIR/previews/<key>_axial.png`` and
``<key>_coronal.png`` (``key`` is the hash in the JSON file name); the stack's adapter writes
``results/<task_id>/previews/study<N>_axial_50.png`` and ``study<N>_coronal_50.png`` for the
N-th study of the task, whose JSON is ``json/study_<NNNN>_<key>.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pydantic import ValidationError

from services.core.previews import study_preview_path
from services.core.reports import JSON_DIR_NAME, study_file_key
from services.core.schemas import StudyReport
from visualisation.errors import VisualisationInputError
from visualisation.records import (
    LabelRows,
    StudyRecord,
    record_from_embedding_row,
    record_from_report,
    source_of,
)

PREVIEWS_DIR_NAME = "previews"  # the batch's (services/batch/preview_files.py) and the stack's
STACK_AXIAL = "study{index}_axial_50.png"  # services/adapter/task_runner.py, write_previews
STACK_CORONAL = "study{index}_coronal_50.png"
JSON_INDEX = re.compile(r"^study_(\d+)_[0-9a-f]+\.json$")
EMBEDDING_COLUMNS = ("name", "embedding", "status")
OPTIONAL_EMBEDDING_COLUMNS = (
    "study_uid",
    "failure_reason",
    "input_path",
    "encoder_version",
    "demo_weights",
)


@dataclass(frozen=True)
class ResultsRead:
    records: list[StudyRecord]
    unreadable: int  # JSON files that are not a StudyReport


def report_files(results_dir: Path) -> list[Path]:
    """Every ``json/*.json`` under the folder: one batch output, one stack task, or the
    stack's whole results folder (its ``<task_id>.json`` messages are not reports)."""
    return sorted(
        path for path in Path(results_dir).rglob("*.json") if path.parent.name == JSON_DIR_NAME
    )


def preview_files(json_path: Path, report: StudyReport) -> tuple[Path | None, Path | None]:
    """(axial, coronal) preview of a report, each None when it is not there."""
    previews = json_path.parent.parent / PREVIEWS_DIR_NAME
    key = study_file_key(report)
    candidates = [
        (study_preview_path(previews, key, "axial"), study_preview_path(previews, key, "coronal"))
    ]
    numbered = JSON_INDEX.match(json_path.name)
    if numbered:
        index = int(numbered.group(1))
        candidates.append(
            (
                previews / STACK_AXIAL.format(index=index),
                previews / STACK_CORONAL.format(index=index),
            )
        )
    for axial, coronal in candidates:
        if axial.is_file() or coronal.is_file():
            return (axial if axial.is_file() else None, coronal if coronal.is_file() else None)
    return None, None


def read_results(results_dir: Path) -> ResultsRead:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise VisualisationInputError(f"results folder not found: {results_dir}")
    records = []
    unreadable = 0
    for path in report_files(results_dir):
        try:
            report = StudyReport.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, ValueError) as error:
            unreadable += 1
            logger.warning("{} is not a study report, skipped: {}", path.name, _first_line(error))
            continue
        axial, coronal = preview_files(path, report)
        records.append(
            record_from_report(
                report,
                source=source_of(report.path_to_study, results_dir),
                axial_preview=axial,
                coronal_preview=coronal,
            )
        )
    return ResultsRead(records=records, unreadable=unreadable)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_embedding_rows(path: Path) -> list[StudyRecord]:
    """Every row of an embeddings parquet (Failure rows too: they show where the pipeline
    refused a data set's volumes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise VisualisationInputError(f"embeddings file not found: {path}")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as error:
        raise VisualisationInputError(f"{path.name} is not a readable parquet file") from error
    missing = [column for column in EMBEDDING_COLUMNS if column not in names]
    if missing:
        raise VisualisationInputError(
            f"{path.name} lacks column(s) {missing}: expected the output of "
            "`python -m training embed`"
        )
    columns = [*EMBEDDING_COLUMNS, *(c for c in OPTIONAL_EMBEDDING_COLUMNS if c in names)]
    rows = pq.read_table(path, columns=columns).to_pylist()
    return [record_from_embedding_row(row, source=path.name) for row in rows]


def read_label_rows(path: Path) -> LabelRows:
    """A CT-RATE-style labels CSV: ``VolumeName`` and one 0/1 column per finding."""
    from training.data import TrainingInputError, read_labels

    try:
        table = read_labels(Path(path))
    except TrainingInputError as error:
        raise VisualisationInputError(str(error)) from error
    positives = {
        key: [name for name, value in zip(table.label_names, row, strict=True) if value == 1]
        for key, row in zip(table.keys, table.values.tolist(), strict=True)
    }
    return LabelRows(source=Path(path).name, label_names=table.label_names, positives=positives)
