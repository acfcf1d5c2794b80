"""Train -> build repository -> screen: the deployed heads give the trainer's probabilities.

Heads are trained (``python -m training train``) on synthetic 16-d embeddings with 18
CT-RATE findings, deployed with the tiny demo encoder by ``convertation.build_repository
--binary-head RUN --multilabel-head RUN --missing-findings fill``, and the chest fixture is
screened by the batch (ONNX Runtime) and through Triton. The binary run keeps its linear probe
(``--head linear``: one Linear whose logits are [0, w.x + b]) and the multilabel run its MLP
(``--head mlp``), so both kinds of head go through the deployment. Each report keeps its embedding, so
the trainer's own head (loaded from the run folder, in torch) can be applied to it: the
deployed probabilities must match within 1e-5, the evaluated thresholds must be the ones in
use, and the two findings the head never saw must be "not assessed".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from batch_support import run_batch
from openpyxl import load_workbook

from convertation.build_repository import main as build_main
from convertation.head.configurable import HeadProbabilities, load_trained_head
from services.core.labels import FINDING_LABELS
from services.core.model_metadata import read_metadata
from services.core.reports import finding_column
from services.core.schemas import StudyReport
from training.cli import main as training_main

# Trains two heads, builds a repository (ONNX export) and runs the batch in a process.
pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"
CHEST = "chest_ct_lung_dx_a0002"
CT_RATE_LABELS = list(FINDING_LABELS[:18])
NOT_ASSESSED = list(FINDING_LABELS[18:])  # COVID-19, Cancer
EMBEDDING_DIM = 16  # the tiny encoder's dim_latent
STUDIES = 400
PARITY_TOLERANCE = 1e-5
FAST_SCHEDULE = ("--max-epochs", "40", "--patience", "8")
HEAD_RULE = {"binary": "linear", "multilabel": "mlp"}


def synthetic_embeddings(root: Path) -> tuple[Path, Path]:
    """Unit-norm 16-d embeddings whose first coordinates decide 18 findings (CT-RATE layout)."""
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(STUDIES, EMBEDDING_DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    weights = rng.normal(size=(EMBEDDING_DIM, len(CT_RATE_LABELS)))
    labels = (vectors @ weights + 0.3 * rng.normal(size=(STUDIES, 18)) > 1.2).astype(np.int8)
    names = [f"train_{index}_a_1.nii.gz" for index in range(STUDIES)]
    embeddings = root / "embeddings.parquet"
    pq.write_table(
        pa.table(
            {
                "name": names,
                "study_uid": [f"2.25.{index}" for index in range(STUDIES)],
                "embedding": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32())),
                "status": ["Success"] * STUDIES,
                "failure_reason": [None] * STUDIES,
            }
        ),
        embeddings,
    )
    frame = pd.DataFrame(labels, columns=CT_RATE_LABELS)
    frame.insert(0, "VolumeName", [name.removesuffix(".nii.gz") for name in names])
    csv_path = root / "labels.csv"
    frame.to_csv(csv_path, index=False)
    return embeddings, csv_path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained_heads")
    embeddings, labels = synthetic_embeddings(root)
    result = {}
    for task in ("binary", "multilabel"):
        run = root / task
        code = training_main(
            ["train", "--task", task, "--embeddings", str(embeddings), "--labels", str(labels),
             "--output", str(run), "--head", HEAD_RULE[task], *FAST_SCHEDULE]
        )  # fmt: skip
        assert code == 0
        result[task] = run
    return result


def _build(repository: Path, runs: dict[str, Path], *extra: str) -> int:
    return build_main(
        ["--output", str(repository), "--flavour", "python", "--demo", "--no-bpr",
         "--ctvit-config", str(TINY_CONFIG), "--binary-head", str(runs["binary"]),
         "--multilabel-head", str(runs["multilabel"]), *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def repository(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trained_repository")
    assert _build(path, runs, "--missing-findings", "fill") == 0
    return path


def trainer_probabilities(run: Path, embedding: list[float]) -> np.ndarray:
    """The run's own head (torch, as the trainer evaluates it) on one embedding."""
    head, _info = load_trained_head(run)
    with torch.no_grad():
        values = HeadProbabilities(head)(torch.tensor([embedding], dtype=torch.float32))
    return values.numpy()[0].astype(np.float64)


def test_thresholds_and_not_assessed_findings_reach_the_metadata(
    repository: Path, runs: dict[str, Path]
) -> None:
    metadata = read_metadata(repository)
    binary = json.loads((runs["binary"] / "head.json").read_text())
    multilabel = json.loads((runs["multilabel"] / "head.json").read_text())
    assert metadata.pathology_threshold == pytest.approx(binary["thresholds"]["pathology"])
    assert metadata.not_assessed == NOT_ASSESSED
    assert set(metadata.finding_thresholds) == set(CT_RATE_LABELS)
    for label in CT_RATE_LABELS:
        assert metadata.finding_thresholds[label] == pytest.approx(multilabel["thresholds"][label])
    sources = {weight.model: weight for weight in metadata.weights}
    assert sources["binary_head"].source_sha256 == binary["weights_sha256"]
    assert binary["selection"]["chosen"] == "linear_probe"
    assert binary["architecture"]["hidden_sizes"] == []
    assert multilabel["selection"]["chosen"] == "mlp"
    assert metadata.demo  # the encoder is the demo one: the repository stays a demo


def test_a_head_without_every_deployed_finding_is_refused_by_default(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build(tmp_path / "refused", runs) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "COVID-19" in error
    assert "Cancer" in error
    assert "--missing-findings fill" in error


def _check_report(report: StudyReport, runs: dict[str, Path], repository: Path) -> None:
    assert report.succeeded, report.failure_reason
    assert report.embedding is not None
    assert len(report.embedding) == EMBEDDING_DIM
    (pathology,) = trainer_probabilities(runs["binary"], report.embedding)  # P(pathology)
    assert abs(report.probability_of_pathology - pathology) <= PARITY_TOLERANCE
    findings = trainer_probabilities(runs["multilabel"], report.embedding)
    metadata = read_metadata(repository)
    by_label = {finding.label: finding for finding in report.findings}
    assert sorted(by_label) == sorted(CT_RATE_LABELS)  # no result for COVID-19 and Cancer
    for index, label in enumerate(CT_RATE_LABELS):
        assert abs(by_label[label].probability - findings[index]) <= PARITY_TOLERANCE, label
        assert by_label[label].threshold == pytest.approx(metadata.finding_thresholds[label])
    assert report.most_dangerous_pathology_type not in NOT_ASSESSED


def test_the_batch_gives_the_trainers_probabilities(
    repository: Path, runs: dict[str, Path], fixtures_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "output"
    # A process of its own: the batch configures the global logger for its console.
    completed = run_batch(fixtures_dir / CHEST, output, "--model-repository", repository)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (report_file,) = (output / "json").glob("*.json")
    report = StudyReport.model_validate_json(report_file.read_text())
    _check_report(report, runs, repository)
    sheet = load_workbook(output / "output.xlsx")["report"]
    header = [cell.value for cell in sheet[1]]
    row = dict(zip(header, [cell.value for cell in sheet[2]], strict=True))
    for label in NOT_ASSESSED:  # not assessed: no probability in the customer's table
        assert row.get(finding_column(label)) is None
    assert row[finding_column(CT_RATE_LABELS[0])] is not None


@pytest.mark.triton
def test_triton_gives_the_trainers_probabilities(
    repository: Path, runs: dict[str, Path], fixtures_dir: Path, tmp_path: Path
) -> None:
    from services.core.config import Settings
    from services.core.inference.triton_backend import TritonBackend
    from services.core.pipeline import process_input
    from services.triton.local_server import LocalTritonServer, free_local_ports

    http, grpc, metrics = free_local_ports(3)
    with LocalTritonServer(
        repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        log_file=tmp_path / "tritonserver.log",
        ready_timeout_s=120.0,
    ):
        settings = Settings()
        inference = settings.inference.model_copy(
            update={
                "backend": "triton",
                "model_repository": repository,
                "triton_url": f"127.0.0.1:{grpc}",
            }
        )
        settings = settings.model_copy(update={"inference": inference})
        backend = TritonBackend(inference, ready_timeout_s=120.0)
        try:
            (report,) = process_input(fixtures_dir / CHEST, backend=backend, settings=settings)
        finally:
            backend.close()
    assert report.model is not None
    assert report.model.backend == "triton"
    _check_report(report, runs, repository)
