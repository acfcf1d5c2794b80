"""Screen a folder of studies: ``python -m services.batch INPUT OUTPUT_DIR``.

INPUT is a folder whose top-level entries (zips, tars, NIfTI files, folders, DICOM files)
are one input each, or a single file. A folder holding only loose files that are neither
archives nor NIfTI (one series copied off a CD) is one input.
Writes OUTPUT_DIR/output.xlsx, warnings_and_errors.txt, json/*.json, sr/*.dcm (a DICOM SR
per DICOM study) and previews/*.png (what the model saw of each study). Failed studies are rows, so the exit code is 0 whenever
the run itself worked; it is 2 for usage errors and a missing model repository.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger
from tqdm import tqdm

from services.batch.inputs import list_inputs
from services.batch.model_input_files import ModelInputSaver
from services.batch.preview_files import PREVIEWS_DIR_NAME, PreviewWriter
from services.batch.sr_files import StructuredReportFiles
from services.core.config import Settings, load_settings
from services.core.errors import ConfigurationError
from services.core.findings import resolve_thresholds
from services.core.inference import create_backend
from services.core.inference.base import InferenceBackend
from services.core.logging_setup import configure_logging, route_python_warnings_to_log
from services.core.nifti.ct_rate import read_ct_rate_metadata
from services.core.pipeline import EventFanOut, PipelineEvents, process_input
from services.core.process_exit import exit_without_teardown
from services.core.process_memory import apply_memory_settings
from services.core.reports import write_reports
from services.core.schemas import StudyReport
from services.sr.document import document_context

if TYPE_CHECKING:
    from services.batch.registry_records import BatchRecorder

USAGE_ERROR = 2
SR_DIR_NAME = "sr"  # one DICOM structured report per DICOM study
LOG_FILE_NAME = "batch.log"  # in the output folder, when the run shows a progress bar


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.batch",
        description="Screen chest CT studies (zips, folders, DICOM files) and write the report.",
    )
    parser.add_argument("input", type=Path, help="folder of studies, or one zip")
    parser.add_argument("output_dir", type=Path, help="where output.xlsx and the rest go")
    parser.add_argument(
        "--model-repository",
        type=Path,
        help="model repository (default: inference.model_repository of the config)",
    )
    parser.add_argument(
        "--save-model-input",
        type=Path,
        metavar="DIR",
        help="also save each study's model input as DIR/<input name>.npy and the body-part "
        "regression input of every slice as DIR/<input name>.bpr.npy",
    )
    parser.add_argument("--config", type=Path, help="config file (default: configs/config.yaml)")
    parser.add_argument(
        "--registry-url",
        metavar="URL",
        help="also record every input in this study registry (SQLAlchemy URL, e.g. "
        "sqlite:////data/registry.sqlite3 or postgresql+psycopg://user@host/db)",
    )
    parser.add_argument(
        "--ct-rate-metadata",
        type=Path,
        metavar="CSV",
        help="CT-RATE metadata: NIfTI files named in it are read as CT-CLIP's loader reads them "
        "(slope, intercept and spacing from the CSV, affine ignored)",
    )
    return parser.parse_args(argv)


def _settings(arguments: argparse.Namespace) -> Settings:
    settings = load_settings(arguments.config)
    if arguments.model_repository is not None:
        inference = settings.inference.model_copy(
            update={
                "backend": "onnxruntime",
                "model_repository": arguments.model_repository.resolve(),
            }
        )
        settings = settings.model_copy(update={"inference": inference})
    if arguments.ct_rate_metadata is not None:
        # Read once here: an unusable CSV is a usage error before any study runs.
        read_ct_rate_metadata(arguments.ct_rate_metadata)
        intake = settings.intake.model_copy(
            update={"ct_rate_metadata": arguments.ct_rate_metadata.resolve()}
        )
        settings = settings.model_copy(update={"intake": intake})
    return settings


def _configure_logging(level: str, output_dir: Path) -> Path | None:
    """On a terminal the progress bar keeps its one line: the whole log goes to a file in
    the output folder and only warnings are shown, printed above the bar. Elsewhere (a
    pipe, a file, a container's log) there is no bar and the log goes to stderr.

    Returns the log file, if there is one.
    """
    route_python_warnings_to_log()  # printed, library warnings would tear the bar too
    if not sys.stderr.isatty():
        configure_logging(level)
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    log_file = output_dir / LOG_FILE_NAME
    configure_logging(level, str(log_file))
    logger.add(
        lambda message: tqdm.write(message, end="", file=sys.stderr),
        level="WARNING",
        format="{level}: {message}",
        diagnose=False,
        backtrace=False,
    )
    return log_file


def summary_line(
    reports: Sequence[StudyReport], n_inputs: int, output_dir: Path, seconds: float
) -> str:
    statuses = Counter(report.processing_status.value for report in reports)
    demo = (
        " (DEMO weights: probabilities mean nothing)"
        if any(r.demo_weights for r in reports)
        else ""
    )
    return (
        f"{len(reports)} studies from {n_inputs} inputs in {seconds:.1f} s: "
        f"{statuses.get('Success', 0)} Success, {statuses.get('Failure', 0)} Failure; "
        f"report {output_dir / 'output.xlsx'}{demo}"
    )


def _events(
    save_model_input: Path | None, input_path: Path, previews: PreviewWriter
) -> PipelineEvents:
    if save_model_input is None:
        return previews
    return EventFanOut(previews, ModelInputSaver(save_model_input, input_path))


class UsageError(Exception):
    """What stops a run before any study: printed as ``error: ...``, exit status 2."""


def _open_backend(settings: Settings) -> InferenceBackend:
    try:
        backend = create_backend(settings)
    except ConfigurationError as error:
        raise UsageError(str(error)) from error
    try:
        resolve_thresholds(backend.metadata, settings.inference)
    except ConfigurationError as error:
        backend.close()
        raise UsageError(str(error)) from error
    return backend


def _open_recorder(url: str | None) -> BatchRecorder | None:
    if not url:
        return None
    # Here, not at the top: the registry's code (SQLAlchemy, argon2) is 0.4 s of a batch's
    # cold start, and most runs do not record to a registry.
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from services.batch.registry_records import BatchRecorder

    try:
        return BatchRecorder(url)
    except (ConfigurationError, SQLAlchemyError, ArgumentError) as error:
        raise UsageError(f"the registry cannot be used: {error}") from error


def _checked_inputs(arguments: argparse.Namespace) -> list[Path]:
    if not arguments.input.exists():
        raise UsageError(f"input not found: {arguments.input}")
    if arguments.output_dir.exists() and not arguments.output_dir.is_dir():
        raise UsageError(f"output is not a folder: {arguments.output_dir}")
    inputs = list_inputs(arguments.input)
    if not inputs:
        raise UsageError(f"no inputs in {arguments.input}")
    return inputs


def _screen(
    inputs: list[Path],
    arguments: argparse.Namespace,
    settings: Settings,
    backend: InferenceBackend,
    recorder: BatchRecorder | None,
    structured_reports: StructuredReportFiles,
) -> list[StudyReport]:
    reports: list[StudyReport] = []
    previews = PreviewWriter(
        arguments.output_dir / PREVIEWS_DIR_NAME, spacing_mm=backend.metadata.target_spacing_mm
    )
    # disable=None: no bar unless stderr is a terminal (a bar in a file is one line per update).
    with tqdm(inputs, desc="studies", unit="input", file=sys.stderr, disable=None) as bar:
        for input_path in bar:
            task = recorder.begin(input_path) if recorder is not None else None
            found = process_input(
                input_path,
                backend=backend,
                settings=settings,
                display_name=str(input_path),
                events=EventFanOut(
                    _events(arguments.save_model_input, input_path, previews), structured_reports
                ),
            )
            if recorder is not None and task is not None:
                recorder.finish(task[0], input_path, found, task[1])
            reports.extend(found)
            failed = sum(not report.succeeded for report in reports)
            bar.set_postfix(success=len(reports) - failed, failure=failed)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    try:
        settings = _settings(arguments)
    except Exception as error:  # noqa: BLE001 - a bad config is a usage error with its reason
        print(f"error: invalid configuration: {error}", file=sys.stderr)
        return USAGE_ERROR
    try:
        inputs = _checked_inputs(arguments)
        log_file = _configure_logging(settings.logging.level, arguments.output_dir)
        apply_memory_settings(settings.memory)
        backend = _open_backend(settings)
        try:
            recorder = _open_recorder(arguments.registry_url)
        except UsageError:
            backend.close()
            raise
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR

    started = time.perf_counter()
    structured_reports = StructuredReportFiles(
        document_context(uuid.uuid4().hex, backend.metadata, settings.inference)
    )
    try:
        reports = _screen(inputs, arguments, settings, backend, recorder, structured_reports)
    except BaseException:
        structured_reports.close()
        raise
    finally:
        backend.close()
        if recorder is not None:
            recorder.close()
    write_reports(reports, arguments.output_dir)
    structured_reports.write(arguments.output_dir / SR_DIR_NAME)
    print(summary_line(reports, len(inputs), arguments.output_dir, time.perf_counter() - started))
    if log_file is not None:
        print(f"log: {log_file}")
    return 0


if __name__ == "__main__":
    # Every file is written and closed when main returns: skip the interpreter's teardown
    # (0.6-0.8 s of a one-study run, services/core/process_exit.py).
    exit_without_teardown(main())
