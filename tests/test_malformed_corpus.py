"""The malformed-input corpus through the real pipeline, in one long-lived worker.

Every kind in ``corpus.kinds`` (hostile and broken archives, objects that are not CT, odd
geometry and pixel encodings, odd names and layouts) is built from the real fixtures and
processed by ``process_input`` with the tiny demo repository's onnxruntime backend. The
backend and settings live for the whole module, as in a worker that stays up: after every
bad input the next one must still be processed, and a good chest study still succeeds at
the end.

For every input the test checks:

* one report per study (at least one per input), each with the named outcome: Success with
  the named warnings, or Failure with the key words of the reason;
* nothing changed next to the input (the workspace with its sentinel folder, which hostile
  archives aim at), and no work directory is left in the temporary folder;
* no log line (DEBUG included) carries the patient's name, ID or birth date;
* where the oddity is fully undone by the pipeline (an unsigned encoding, a nested zip...),
  the model input equals the unmodified chest's.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from corpus.builders import PATIENT_VALUES
from corpus.kinds import (
    CHEST,
    KINDS,
    SENTINEL,
    SENTINEL_MARKER,
    SUCCESS,
    Kind,
    Outcome,
    Source,
    kind_ids,
)
from loguru import logger

from services.batch.model_input_files import ModelInputSaver
from services.core.config import Settings, load_settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.pipeline import WORK_DIR_PREFIX, PipelineEvents, process_input
from services.core.schemas import StudyReport

KINDS_BY_ID = {kind.id: kind for kind in KINDS}


def model_inputs(folder: Path) -> list[Path]:
    """The saved model inputs (``--save-model-input`` may store other arrays beside them)."""
    return [path for path in folder.glob("*.npy") if not path.name.endswith(".bpr.npy")]


@dataclass
class Worker:
    """What a long-lived worker holds: one backend, the settings, its temporary folder."""

    backend: OnnxRuntimeBackend
    settings: Settings
    temp_dir: Path
    log_lines: list[str] = field(default_factory=list)
    inputs_processed: int = 0

    def process(self, input_path: Path, model_input_dir: Path | None = None) -> list[StudyReport]:
        self.log_lines.clear()
        reports = process_input(
            input_path,
            backend=self.backend,
            settings=self.settings,
            events=PipelineEvents()
            if model_input_dir is None
            else ModelInputSaver(model_input_dir, input_path),
        )
        self.inputs_processed += 1
        return reports


@pytest.fixture(scope="module")
def worker(tiny_model_repository: Path, tmp_path_factory) -> Iterator[Worker]:
    temp_dir = tmp_path_factory.mktemp("worker_tmp")
    previous_temp = tempfile.tempdir
    tempfile.tempdir = str(temp_dir)  # the pipeline's work directories must appear (and go) here
    settings = load_settings(environ={})  # the shipped config, untouched by CTS__ variables
    backend = OnnxRuntimeBackend(tiny_model_repository, settings.inference)
    state = Worker(backend=backend, settings=settings, temp_dir=temp_dir)
    sink = logger.add(lambda message: state.log_lines.append(str(message)), level="DEBUG")
    try:
        yield state
    finally:
        logger.remove(sink)
        backend.close()
        tempfile.tempdir = previous_temp


@pytest.fixture(scope="module")
def source(fixtures_dir: Path) -> Source:
    return Source(fixtures_dir)


@pytest.fixture(scope="module")
def chest_model_input(worker: Worker, fixtures_dir: Path, tmp_path_factory) -> np.ndarray:
    """The model input of the unmodified chest fixture: the reference for lossless oddities."""
    saved = tmp_path_factory.mktemp("chest_model_input")
    (report,) = worker.process(fixtures_dir / CHEST, saved)
    assert report.succeeded, report.failure_reason
    (path,) = model_inputs(saved)
    return np.load(path)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed) with its type, size and mtime."""
    entries = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            entries[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries


def _matches(report: StudyReport, outcome: Outcome) -> bool:
    if report.processing_status.value != outcome.status:
        return False
    reason = (report.failure_reason or "").lower()
    if not all(word.lower() in reason for word in outcome.reason):
        return False
    warnings = [warning.lower() for warning in report.warnings]
    return all(any(word.lower() in warning for warning in warnings) for word in outcome.warnings)


def _assert_outcomes(kind: Kind, reports: list[StudyReport]) -> None:
    """Each expected outcome matched by a different report (studies come in UID order)."""
    described = "\n".join(
        f"  {r.processing_status.value}: reason={r.failure_reason!r} warnings={r.warnings}"
        for r in reports
    )
    assert len(reports) == len(kind.outcomes), (
        f"{kind.id}: expected {len(kind.outcomes)} report(s), got {len(reports)}:\n{described}"
    )
    assert any(
        all(_matches(r, o) for r, o in zip(order, kind.outcomes, strict=True))
        for order in itertools.permutations(reports)
    ), f"{kind.id}: expected {[o.describe() for o in kind.outcomes]}, got:\n{described}"


def _assert_row_is_complete(report: StudyReport, input_path: Path) -> None:
    """The customer's row: filled for Success, empty model fields and a reason for Failure."""
    assert report.path_to_study == str(input_path)
    assert report.time_of_processing >= 0
    if report.processing_status.value == SUCCESS:
        assert report.study_uid
        assert report.series_uid
        assert 0.0 <= report.probability_of_pathology <= 1.0
        assert report.pathology in (0, 1)
        assert report.failure_reason is None
        assert report.demo_weights  # the tiny repository has demo weights, and says so
    else:
        assert report.failure_reason
        assert report.failure_reason.strip()
        assert report.probability_of_pathology is None
        assert report.pathology is None


def test_the_corpus_is_large_and_named_uniquely() -> None:
    assert len(KINDS) >= 30
    assert len(set(kind_ids())) == len(KINDS)
    assert all(kind.outcomes for kind in KINDS)


def test_the_encrypted_zip_is_a_real_pkware_archive(source: Source, tmp_path: Path) -> None:
    """The corpus' encrypted zip decrypts with its password: the cipher, not just the flag."""
    archive = KINDS_BY_ID["encrypted_zip"].build(source, tmp_path)
    name, data = source.files(CHEST)[0]
    with zipfile.ZipFile(archive) as handle:
        assert handle.read(f"study/{name}", pwd=b"hospital-password") == data
        with pytest.raises(RuntimeError, match="Bad password"):
            handle.read(f"study/{name}", pwd=b"guess")


@pytest.mark.parametrize("kind", KINDS, ids=kind_ids())
def test_malformed_input(
    kind: Kind,
    source: Source,
    worker: Worker,
    chest_model_input: np.ndarray,
    tmp_path: Path,
) -> None:
    workspace = tmp_path / "workspace"
    sentinel = workspace / SENTINEL
    sentinel.mkdir(parents=True)
    (sentinel / SENTINEL_MARKER).write_text("nothing may be written next to the input\n")
    input_path = kind.build(source, workspace)
    before = _snapshot(workspace)
    temp_before = set(worker.temp_dir.iterdir())  # builders may stage there (pydicom's FileSet)
    model_input_dir = tmp_path / "model_input" if kind.same_model_input_as_chest else None

    reports = worker.process(input_path, model_input_dir)

    _assert_outcomes(kind, reports)
    for report in reports:
        _assert_row_is_complete(report, input_path)
    study_uids = [report.study_uid for report in reports]
    if len(reports) > 1:
        assert None not in study_uids
        assert len(set(study_uids)) == len(study_uids)
    if kind.check is not None:
        kind.check(reports)

    assert _snapshot(workspace) == before, "something was written or changed next to the input"
    left_in_temp = set(worker.temp_dir.iterdir()) - temp_before
    assert not left_in_temp, f"the pipeline left {sorted(left_in_temp)} in the temp folder"
    logged = "".join(worker.log_lines).lower()
    assert logged, "no log line was captured: the privacy check below would be empty"
    for value in PATIENT_VALUES:
        assert value.lower() not in logged, f"the log carries the patient value {value!r}"

    if kind.same_model_input_as_chest:
        (saved,) = model_inputs(model_input_dir)
        model_input = np.load(saved)
        assert model_input.shape == chest_model_input.shape
        assert float(np.abs(model_input - chest_model_input).max()) <= 1e-6


WORST_INPUTS = ("zip_bomb", "corrupt_jpeg2000", "zip_damaged_deflate_stream", "truncated_zip")


def test_the_worker_stays_up_and_a_good_chest_still_succeeds(
    source: Source,
    worker: Worker,
    chest_model_input: np.ndarray,
    fixtures_dir: Path,
    tmp_path: Path,
) -> None:
    """Run last: after the whole corpus (and a few of its worst inputs again, so that this test
    proves the point on its own), the same worker screens the chest as on the first day."""
    for kind_id in WORST_INPUTS:
        kind = KINDS_BY_ID[kind_id]
        workspace = tmp_path / kind_id
        (workspace / SENTINEL).mkdir(parents=True)
        reports = worker.process(kind.build(source, workspace))
        _assert_outcomes(kind, reports)
    saved = tmp_path / "model_input"
    (report,) = worker.process(fixtures_dir / CHEST, saved)
    assert report.succeeded, report.failure_reason
    (path,) = model_inputs(saved)
    assert np.array_equal(np.load(path), chest_model_input)
    assert worker.inputs_processed >= len(WORST_INPUTS) + 2
    assert not [p for p in worker.temp_dir.iterdir() if p.name.startswith(WORK_DIR_PREFIX)]
