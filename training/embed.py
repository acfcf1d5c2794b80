"""``python -m training embed INPUT OUTPUT.parquet``: the screening pipeline and the encoder over
a data set, one parquet row per study (the file `training.data` reads).

Every study goes through the same `process_input` as the batch and the stack (intake, chest
check, CT-CLIP preprocessing, the model), so a head is trained on exactly the embeddings the
deployed service computes. The run is resumable: inputs already in OUTPUT (or in the part
files of an interrupted run) are skipped; rows are written to ``OUTPUT.parts/`` every
`FLUSH_EVERY_INPUTS` inputs and merged into OUTPUT at the end. Mixing embeddings of two
encoders in one file is refused (the ``encoder_version`` column: the first 12 hex digits of
the encoder weights' sha256, whatever heads the repository has).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from loguru import logger
from tqdm import tqdm

from services.batch.inputs import list_inputs
from services.core.config import Settings, load_settings
from services.core.inference import create_backend
from services.core.inference.base import InferenceBackend
from services.core.model_metadata import ENCODER_NAME
from services.core.nifti import has_nifti_suffix
from services.core.pipeline import process_input
from services.core.schemas import StudyReport
from training.data import TrainingInputError

FLUSH_EVERY_INPUTS = 32
PARTS_SUFFIX = ".parts"
SUCCESS = "Success"
FAILURE = "Failure"

EMBEDDING_SCHEMA = pa.schema(
    [
        ("name", pa.string()),  # the input's file name (CT-RATE: VolumeName)
        ("study_uid", pa.string()),
        ("embedding", pa.list_(pa.float32())),  # null for a failed study
        ("status", pa.string()),  # Success | Failure
        ("failure_reason", pa.string()),
        ("input_path", pa.string()),  # the input relative to INPUT
        ("encoder_version", pa.string()),  # sha256[:12] of the encoder's weights
        ("demo_weights", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class EmbedOptions:
    input: Path
    output: Path
    model_repository: Path | None = None
    ct_rate_metadata: Path | None = None
    config: Path | None = None
    backend: str | None = None  # onnxruntime | triton; None: the config's
    retry_failures: bool = False


@dataclass
class EmbedSummary:
    inputs_total: int = 0
    inputs_skipped: int = 0
    inputs_embedded: int = 0
    studies_success: int = 0
    studies_failure: int = 0
    seconds: float = 0.0
    seconds_per_embedded_input: list[float] = field(default_factory=list)


def embedding_inputs(root: Path) -> list[Path]:
    """The inputs of a data set: every NIfTI file anywhere under ``root`` is one input (CT-RATE
    nests them in folders per patient); the other top-level entries are inputs as in the
    batch (a zip, a tar, a folder of one study's DICOM files, a file)."""
    if root.is_file():
        return [root]
    inputs: list[Path] = []
    for entry in list_inputs(root):
        nifti = sorted(_nifti_files(entry)) if entry.is_dir() else []
        if nifti:
            inputs.extend(nifti)
        else:
            inputs.append(entry)
    return inputs


def _nifti_files(folder: Path) -> Iterator[Path]:
    for directory, folders, files in os.walk(folder, followlinks=False):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if has_nifti_suffix(name) and not name.startswith("."):
                yield Path(directory) / name


def report_rows(
    reports: Sequence[StudyReport], input_path: Path, root: Path
) -> list[dict[str, Any]]:
    """One row per study of an input."""
    relative = input_path.relative_to(root).as_posix() if input_path != root else input_path.name
    rows = []
    for report in reports:
        success = report.succeeded and report.embedding is not None
        rows.append(
            {
                "name": input_path.name,
                "study_uid": report.study_uid,
                "embedding": report.embedding if success else None,
                "status": SUCCESS if success else FAILURE,
                "failure_reason": None
                if success
                else (report.failure_reason or "no embedding was computed"),
                "input_path": relative,
                "encoder_version": encoder_version(report),
                "demo_weights": report.demo_weights,
            }
        )
    return rows


def encoder_version(report: StudyReport) -> str | None:
    """The first 12 hex digits of the encoder weights' sha256 (None for an input that failed
    before the model was asked)."""
    for weight in report.model.weights if report.model else []:
        if weight.get("model") == ENCODER_NAME and weight.get("sha256"):
            return str(weight["sha256"])[:12]
    return None


def _parts_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


def _read_tables(output: Path) -> list[pa.Table]:
    """The finished file and the part files of an interrupted run, in the output schema."""
    paths = [output] if output.is_file() else []
    parts = _parts_dir(output)
    if parts.is_dir():
        paths += sorted(parts.glob("part-*.parquet"))
    tables = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise TrainingInputError(f"{path} is not a readable parquet file: {error}") from error
        missing = [name for name in EMBEDDING_SCHEMA.names if name not in table.column_names]
        if missing:
            raise TrainingInputError(f"{path} lacks column(s) {missing}: not written by embed")
        tables.append(table.select(EMBEDDING_SCHEMA.names).cast(EMBEDDING_SCHEMA))
    return tables


def _done_inputs(existing: pa.Table | None, retry_failures: bool) -> set[str]:
    """Input paths that need no new run: every one with a row (or, with retry_failures, every
    one with at least one successful study)."""
    if existing is None or existing.num_rows == 0:
        return set()
    paths = existing["input_path"].to_pylist()
    statuses = existing["status"].to_pylist()
    if not retry_failures:
        return set(paths)
    return {path for path, status in zip(paths, statuses, strict=True) if status == SUCCESS}


def _check_encoder(existing: pa.Table | None, version: str, output: Path) -> None:
    if existing is None:
        return
    versions = {value for value in existing["encoder_version"].to_pylist() if value is not None}
    others = versions - {version}
    if others:
        raise TrainingInputError(
            f"{output} holds embeddings of encoder(s) {sorted(others)}, this repository's is "
            f"{version}: embeddings of two encoders cannot share a file (choose another OUTPUT)"
        )


class _PartWriter:
    """Rows written atomically to OUTPUT.parts/part-NNNNN.parquet, a batch at a time."""

    def __init__(self, output: Path) -> None:
        self.folder = _parts_dir(output)
        self.pending: list[dict[str, Any]] = []
        self.index = len(list(self.folder.glob("part-*.parquet"))) if self.folder.is_dir() else 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.pending.extend(rows)

    def flush(self) -> None:
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        while (self.folder / f"part-{self.index:05d}.parquet").exists():
            self.index += 1
        target = self.folder / f"part-{self.index:05d}.parquet"
        _write_atomically(pa.Table.from_pylist(self.pending, schema=EMBEDDING_SCHEMA), target)
        self.pending = []
        self.index += 1


def _write_atomically(table: pa.Table, target: Path) -> None:
    temporary = target.with_name(target.name + ".tmp")
    pq.write_table(table, temporary)
    temporary.replace(target)


def _merge(output: Path) -> pa.Table:
    """Everything (file + parts) into OUTPUT; a re-run input keeps only its newest rows."""
    tables = _read_tables(output)
    if not tables:
        table = EMBEDDING_SCHEMA.empty_table()
    else:
        rows: dict[str, list[dict[str, Any]]] = {}
        for table in tables:  # oldest first: a later run of an input replaces its rows
            grouped: dict[str, list[dict[str, Any]]] = {}
            for row in table.to_pylist():
                grouped.setdefault(row["input_path"], []).append(row)
            rows.update(grouped)
        table = pa.Table.from_pylist(
            [row for group in rows.values() for row in group], schema=EMBEDDING_SCHEMA
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(table, output)
    parts = _parts_dir(output)
    if parts.is_dir():
        for path in parts.glob("part-*.parquet"):
            path.unlink()
        parts.rmdir()
    return table


def embed_settings(options: EmbedOptions) -> Settings:
    settings = load_settings(options.config)
    inference_update: dict[str, object] = {}
    if options.model_repository is not None:
        inference_update["model_repository"] = options.model_repository.resolve()
    if options.backend is not None:
        inference_update["backend"] = options.backend
    intake_update: dict[str, object] = {}
    if options.ct_rate_metadata is not None:
        intake_update["ct_rate_metadata"] = options.ct_rate_metadata.resolve()
    return settings.model_copy(
        update={
            "inference": settings.inference.model_copy(update=inference_update),
            "intake": settings.intake.model_copy(update=intake_update),
        }
    )


def embed(options: EmbedOptions) -> EmbedSummary:
    """Embed every input of ``options.input`` not yet in ``options.output``; merge at the end."""
    root = options.input
    if not root.exists():
        raise TrainingInputError(f"input not found: {root}")
    if options.ct_rate_metadata is not None and not options.ct_rate_metadata.is_file():
        raise TrainingInputError(f"CT-RATE metadata not found: {options.ct_rate_metadata}")
    settings = embed_settings(options)
    if settings.intake.ct_rate_metadata is not None:
        from services.core.nifti.ct_rate import read_ct_rate_metadata

        rows = read_ct_rate_metadata(settings.intake.ct_rate_metadata)
        logger.info("CT-RATE metadata: {} volumes", len(rows))
    tables = _read_tables(options.output)
    existing = pa.concat_tables(tables) if tables else None
    inputs = embedding_inputs(root)
    done = _done_inputs(existing, options.retry_failures)
    summary = EmbedSummary(inputs_total=len(inputs))
    todo = [path for path in inputs if _relative(path, root) not in done]
    summary.inputs_skipped = len(inputs) - len(todo)
    logger.info(
        "{} inputs, {} already embedded, {} to run", len(inputs), summary.inputs_skipped, len(todo)
    )
    started = time.perf_counter()
    if todo:
        backend = create_backend(settings)
        try:
            _check_encoder(existing, repository_encoder_version(backend), options.output)
            if backend.metadata.demo:
                logger.warning("DEMO weights: these embeddings mean nothing (README, Real weights)")
            _run(todo, root, backend, settings, options.output, summary)
        finally:
            backend.close()
    table = _merge(options.output)
    summary.seconds = time.perf_counter() - started
    logger.info(
        "{}: {} rows ({} embedded now: {} Success, {} Failure) in {:.1f} s",
        options.output,
        table.num_rows,
        summary.inputs_embedded,
        summary.studies_success,
        summary.studies_failure,
        summary.seconds,
    )
    return summary


def repository_encoder_version(backend: InferenceBackend) -> str:
    for weight in backend.metadata.weights:
        if weight.model == ENCODER_NAME:
            return weight.sha256[:12]
    raise TrainingInputError("the model repository's metadata lists no encoder weights")


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else path.name


def _run(
    todo: list[Path],
    root: Path,
    backend: InferenceBackend,
    settings: Settings,
    output: Path,
    summary: EmbedSummary,
) -> None:
    writer = _PartWriter(output)
    try:
        with tqdm(todo, desc="embed", unit="input", file=sys.stderr) as bar:
            for count, input_path in enumerate(bar, start=1):
                input_started = time.perf_counter()
                reports = process_input(
                    input_path,
                    backend=backend,
                    settings=settings,
                    display_name=_relative(input_path, root),
                )
                rows = report_rows(reports, input_path, root)
                writer.add(rows)
                summary.inputs_embedded += 1
                summary.seconds_per_embedded_input.append(time.perf_counter() - input_started)
                succeeded = sum(row["status"] == SUCCESS for row in rows)
                summary.studies_success += succeeded
                summary.studies_failure += len(rows) - succeeded
                bar.set_postfix(success=summary.studies_success, failure=summary.studies_failure)
                if count % FLUSH_EVERY_INPUTS == 0:
                    writer.flush()
    finally:
        writer.flush()  # an interrupted run keeps what it computed
