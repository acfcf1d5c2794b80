"""``python -m visualisation``: the screened studies and their embeddings in FiftyOne.

    python -m visualisation --results DIR [DIR ...] [--embeddings E.parquet] [--labels L.csv]
        --dataset NAME [--method umap|pca] [--no-launch] [--port 5151] [--media-dir DIR]

Reads the JSON reports (and preview images) of batch output folders or the stack's
storage/results, and/or the embeddings parquet of `python -m training embed`; adds one sample
per study to the persistent FiftyOne dataset NAME (studies already in it are left alone);
computes a 2-D map of the embeddings with fiftyone.brain; serves the FiftyOne App on
127.0.0.1:PORT until Ctrl+C unless --no-launch. Exit code 0, or 2 for unusable inputs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from services.core.logging_setup import configure_logging
from visualisation.embedding_map import METHODS
from visualisation.errors import VisualisationError, VisualisationSetupError
from visualisation.records import StudyRecord, with_labels
from visualisation.sources import read_embedding_rows, read_label_rows, read_results

USAGE_ERROR = 2
# FiftyOne reports usage to its makers unless told not to; this project sends nothing anywhere.
FIFTYONE_ENVIRONMENT = {"FIFTYONE_DO_NOT_TRACK": "true"}
MEDIA_DIR_SUFFIX = "-media"


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m visualisation",
        description="Screened studies and their CT-CLIP embeddings in the FiftyOne App.",
    )
    # The two sources of studies, any number of each (at least one of them, checked below).
    for option, metavar, what in (
        (
            "--results",
            "DIR",
            "batch output folders or the stack's storage/results (every json/*.json below)",
        ),
        ("--embeddings", "E.parquet", "parquet files of `python -m training embed`"),
    ):
        parser.add_argument(option, type=Path, nargs="+", default=[], metavar=metavar, help=what)
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="L.csv",
        help="ground truth: VolumeName and one 0/1 column per finding (CT-RATE layout)",
    )
    parser.add_argument("--dataset", required=True, help="the persistent FiftyOne dataset")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help="2-D map of the embeddings (default: umap when umap-learn is installed, else pca)",
    )
    parser.add_argument("--no-launch", action="store_true", help="build the dataset only")
    parser.add_argument("--port", type=int, default=5151, help="the App's port on 127.0.0.1")
    parser.add_argument(
        "--media-dir",
        type=Path,
        help="where the samples' images go (default: FiftyOne's dataset folder/NAME-media)",
    )
    parser.add_argument("--log-level", default="INFO")
    arguments = parser.parse_args(argv)
    if not arguments.results and not arguments.embeddings:
        parser.error("give --results and/or --embeddings")
    return arguments


def collect_records(arguments: argparse.Namespace) -> list[StudyRecord]:
    labels = None if arguments.labels is None else read_label_rows(arguments.labels)
    records: list[StudyRecord] = []
    for results_dir in arguments.results:
        read = read_results(results_dir)
        logger.info(
            "{}: {} study reports{}",
            results_dir.name,
            len(read.records),
            f", {read.unreadable} unreadable JSON files skipped" if read.unreadable else "",
        )
        records.extend(read.records)
    for parquet in arguments.embeddings:
        rows = read_embedding_rows(parquet)
        logger.info("{}: {} rows", parquet.name, len(rows))
        records.extend(rows)
    labelled = [with_labels(record, labels) for record in records]
    if labels is not None:
        matched = sum(record.ground_truth is not None for record in labelled)
        logger.info("{}: labels for {} of {} studies", labels.source, matched, len(labelled))
    return labelled


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _import_fiftyone() -> None:
    """Sets FiftyOne's environment, then imports it (it reads its config on import)."""
    os.environ.update(FIFTYONE_ENVIRONMENT)
    try:
        import fiftyone  # noqa: F401 - imported here for its configuration
    except ImportError as error:
        raise VisualisationSetupError(
            "FiftyOne is not installed: pip install -e .[visualisation] "
            "(or bash scripts/setup.sh convert,dev,train,visualisation)"
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    configure_logging(arguments.log_level)
    if not arguments.no_launch and not port_is_free(arguments.port):
        print(f"error: port {arguments.port} on 127.0.0.1 is in use (--port)", file=sys.stderr)
        return USAGE_ERROR
    started = time.perf_counter()
    try:
        records = collect_records(arguments)
        read_seconds = time.perf_counter() - started
        clock = time.perf_counter()
        _import_fiftyone()
        import_seconds = time.perf_counter() - clock
        import fiftyone as fo

        from visualisation.dataset import build_dataset

        media_dir = arguments.media_dir or (
            Path(fo.config.default_dataset_dir) / f"{arguments.dataset}{MEDIA_DIR_SUFFIX}"
        )
        dataset, summary = build_dataset(
            arguments.dataset, records, media_dir=media_dir, method=arguments.method
        )
    except VisualisationError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(
        f"dataset {dataset.name}: {summary.added} studies added, {summary.already_present} "
        f"already there, {len(dataset)} in all, {summary.with_embedding} with an embedding; "
        f"{summary.map.note}; {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    stages = {
        "reading": round(read_seconds, 2),
        "fiftyone import": round(import_seconds, 2),
        **summary.seconds,
    }
    logger.info("seconds: {}", ", ".join(f"{name} {value}" for name, value in stages.items()))
    if arguments.no_launch:
        return 0
    from visualisation.app import serve_app

    serve_app(dataset, arguments.port)
    return 0
