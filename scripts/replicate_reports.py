"""Copies of a batch output's Success reports under new UIDs: a results folder of N studies, to
measure ``python -m visualisation`` at scale without screening N studies first.

    .venv/bin/python scripts/replicate_reports.py SOURCE_OUTPUT_DIR COPY_OUTPUT_DIR --studies 100

Each copy gets a new study and series UID and input name, the source's previews under its own
key, and the source's embedding moved by gaussian noise (sigma ``--noise``, then L2-normalised
again) so that the copies are distinct points of the map. The copies say in their warnings
that they are copies.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere

from services.core.previews import STUDY_PREVIEW_VIEWS, study_preview_path
from services.core.reports import JSON_DIR_NAME, json_file_name, study_file_key
from services.core.schemas import StudyReport

PREVIEWS_DIR_NAME = "previews"
COPY_WARNING = "copy of a screened study for a measurement (scripts/replicate_reports.py)"


def replicate(source: Path, destination: Path, studies: int, noise: float, seed: int) -> int:
    reports = [
        StudyReport.model_validate_json(path.read_bytes())
        for path in sorted((source / JSON_DIR_NAME).glob("*.json"))
    ]
    originals = [report for report in reports if report.succeeded and report.embedding]
    if not originals:
        raise SystemExit(f"no Success report with an embedding in {source / JSON_DIR_NAME}")
    random = np.random.default_rng(seed)
    (destination / JSON_DIR_NAME).mkdir(parents=True, exist_ok=True)
    (destination / PREVIEWS_DIR_NAME).mkdir(exist_ok=True)
    for index in range(1, studies + 1):
        original = originals[(index - 1) % len(originals)]
        assert original.embedding is not None
        vector = np.asarray(original.embedding, dtype=np.float64)
        vector = vector + random.normal(0.0, noise, vector.shape)
        folder = Path(original.path_to_study).parent
        copy = original.model_copy(
            update={
                "path_to_study": str(folder / f"copy_{index:04d}.zip"),
                "study_uid": generate_uid(entropy_srcs=[str(seed), str(index), "study"]),
                "series_uid": generate_uid(entropy_srcs=[str(seed), str(index), "series"]),
                "embedding": [float(value) for value in vector / np.linalg.norm(vector)],
                "warnings": [*original.warnings, COPY_WARNING],
            }
        )
        name = json_file_name(index, copy)
        (destination / JSON_DIR_NAME / name).write_text(copy.model_dump_json(indent=2) + "\n")
        for view in STUDY_PREVIEW_VIEWS:
            preview = study_preview_path(source / PREVIEWS_DIR_NAME, study_file_key(original), view)
            if preview.is_file():
                shutil.copyfile(
                    preview,
                    study_preview_path(destination / PREVIEWS_DIR_NAME, study_file_key(copy), view),
                )
    return studies


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a batch output folder")
    parser.add_argument("destination", type=Path, help="the folder of the copies")
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    count = replicate(
        arguments.source, arguments.destination, arguments.studies, arguments.noise, arguments.seed
    )
    print(f"{count} copies in {arguments.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
