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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger
from tqdm import tqdm

from services.batch.inputs import list_inputs
from services.core.config import Settings, load_settings
from services.core.errors import ConfigurationError
from services.core.findings import resolve_thresholds
from services.core.logging_setup import configure_logging, route_python_warnings_to_log
from services.core.process_exit import exit_without_teardown
from services.core.process_memory import apply_memory_settings

if TYPE_CHECKING:
    from services.batch.registry_records import BatchRecorder
    from services.core.inference.base import InferenceBackend

USAGE_ERROR = 2
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
    return settings


def _with_ct_rate_metadata(settings: Settings, arguments: argparse.Namespace) -> Settings:
    if arguments.ct_rate_metadata is not None:
        from services.core.nifti.ct_rate import read_ct_rate_metadata  # nibabel: only here

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


class UsageError(Exception):
    """What stops a run before any study: printed as ``error: ...``, exit status 2."""


def _open_backend(settings: Settings) -> InferenceBackend:
    # Imported here, after the memory policy: numpy's import starts threads
    # (services/core/process_memory.py).
    from services.core.inference import create_backend

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


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    try:
        settings = _settings(arguments)
    except Exception as error:  # noqa: BLE001 - a bad config is a usage error with its reason
        print(f"error: invalid configuration: {error}", file=sys.stderr)
        return USAGE_ERROR
    # Before anything imports numpy (nibabel for the CT-RATE table, the backend): the policy
    # must come before any thread allocates (services/core/process_memory.py).
    apply_memory_settings(settings.memory)
    try:
        settings = _with_ct_rate_metadata(settings, arguments)
    except Exception as error:  # noqa: BLE001 - an unusable table is a usage error with its reason
        print(f"error: invalid configuration: {error}", file=sys.stderr)
        return USAGE_ERROR
    try:
        inputs = _checked_inputs(arguments)
        log_file = _configure_logging(settings.logging.level, arguments.output_dir)
        backend = _open_backend(settings)
        try:
            recorder = _open_recorder(arguments.registry_url)
        except UsageError:
            backend.close()
            raise
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR

    try:
        # Imported now, with the model loading on its thread: the pipeline's imports
        # (pydicom, highdicom, openpyxl; about 0.6 s) run beside the load, not before it.
        from services.batch.screening import screen_and_write, summary_line

        started = time.perf_counter()
        reports = screen_and_write(
            inputs,
            output_dir=arguments.output_dir,
            save_model_input=arguments.save_model_input,
            settings=settings,
            backend=backend,
            recorder=recorder,
        )
    finally:
        backend.close()
        if recorder is not None:
            recorder.close()
    print(summary_line(reports, len(inputs), arguments.output_dir, time.perf_counter() - started))
    if log_file is not None:
        print(f"log: {log_file}")
    return 0


if __name__ == "__main__":
    # Every file is written and closed when main returns: skip the interpreter's teardown
    # (0.6-0.8 s of a one-study run, services/core/process_exit.py).
    exit_without_teardown(main())
