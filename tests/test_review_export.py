"""``python -m services.registry export-reviews OUT_DIR`` on a real registry (SQLite) and real
stored results: labels from the latest review by the documented rule, the embeddings in
``training embed``'s layout, and ``python -m training train`` run on the export as it is."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_registry import report, result, submission

from services.broker.storage import store_result
from services.core.config import PROJECT_ROOT, Settings, load_settings
from services.core.labels import FINDING_LABELS
from services.core.model_metadata import ENCODER_NAME
from services.core.schemas import ModelInfo, StudyReport
from services.registry import Registry, Review, upgrade_registry
from services.registry.__main__ import main as registry_main
from services.registry.review_export import label_row
from training.embed import EMBEDDING_SCHEMA

ENCODER_SHA = "ab12cd34ef56" + "0" * 52


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = load_settings(environ={})
    settings.storage.root = tmp_path / "storage"
    upgrade_registry(settings)
    return settings


def embedded(pathology: int, seed: int) -> StudyReport:
    """A Success report with its encoder's embedding (the two classes point apart, as a
    trained encoder's would, so that a head can learn something from a few studies)."""
    generator = np.random.default_rng(seed)
    vector = generator.normal(size=512) + (3.0 if pathology else -3.0) * np.eye(512)[0]
    study = report(pathology=pathology)
    findings = [
        finding.model_copy(update={"positive": bool(pathology) and finding.positive})
        for finding in study.findings
    ]
    return study.model_copy(
        update={
            "findings": findings,
            "embedding": (vector / np.linalg.norm(vector)).astype(np.float32).tolist(),
            "model": ModelInfo(
                version="demo",
                demo=True,
                backend="onnxruntime",
                flavour="python",
                weights=[{"model": ENCODER_NAME, "sha256": ENCODER_SHA}],
            ),
        }
    )


def screened(registry: Registry, settings: Settings, task_id: str, study: StudyReport) -> None:
    registry.record_submission(submission(task_id))
    finished = result(task_id, study)
    store_result(settings.storage.root, finished)
    registry.record_result(finished)


def test_labels_follow_the_latest_review_by_the_documented_rule() -> None:
    study = report(pathology=1)  # the model: PATHOLOGY, "Lung nodule" above its threshold

    def labels(**review: object) -> dict[str, int] | None:
        return label_row(study, Review(task_id="t", reviewer="dr", **review))  # type: ignore[arg-type]

    agreed = labels(agrees=True)
    assert agreed is not None
    assert {name for name, value in agreed.items() if value} == {"Lung nodule"}
    assert list(agreed) == list(FINDING_LABELS)
    corrected = labels(agrees=True, findings={"Lung nodule": False, "Emphysema": True})
    assert corrected is not None
    assert {name for name, value in corrected.items() if value} == {"Emphysema"}
    normal = labels(agrees=False, pathology=False)
    assert normal is not None
    assert not any(normal.values())  # unmarked findings of a NORMAL study count as absent
    assert labels(agrees=True, findings={"Lung nodule": False}) is None  # PATHOLOGY, nothing
    assert labels(agrees=False, pathology=False, findings={"Cancer": True}) is None
    healthy = embedded(0, 1)  # NORMAL, no finding above its threshold
    flipped = label_row(
        healthy,
        Review(task_id="t", reviewer="dr", agrees=False, pathology=True, findings={"Cancer": True}),
    )
    assert flipped is not None
    assert {name for name, value in flipped.items() if value} == {"Cancer"}


def test_the_export_trains_heads_as_it_is(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry.open(settings)
    try:
        for number in range(24):
            task_id = f"study{number:02d}"
            model_call = number % 2
            screened(registry, settings, task_id, embedded(model_call, number))
            if number % 6 == 5:  # the reader corrects a PATHOLOGY call to NORMAL
                review = Review(task_id=task_id, reviewer="dr.a", agrees=False, pathology=False)
            elif number % 4 == 1:  # ... or adds a finding to it
                marked = {"Emphysema": True}
                review = Review(task_id=task_id, reviewer="dr.a", agrees=True, findings=marked)
            else:
                review = Review(task_id=task_id, reviewer="dr.a", agrees=True)
            registry.record_review(review)
        # A NORMAL call turned PATHOLOGY without a finding: labels cannot say it.
        screened(registry, settings, "vague", embedded(0, 99))
        registry.record_review(Review(task_id="vague", reviewer="dr.b", agrees=False))
        screened(registry, settings, "broken", report(failure="unreadable"))
        registry.record_review(Review(task_id="broken", reviewer="dr.b", agrees=True))
        screened(registry, settings, "unreviewed", embedded(1, 100))
    finally:
        registry.close()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"storage": {"root": str(settings.storage.root)}}))
    out = tmp_path / "export"
    assert registry_main(["--config", str(config), "export-reviews", str(out)]) == 0
    said = capsys.readouterr().out
    assert "24 reviewed studies exported of 26" in said
    assert "1 without an embedding, 1 whose findings contradict" in said

    with (out / "labels.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    # Findings no study has are left out (the trainer cannot learn them).
    assert list(rows[0]) == ["VolumeName", "Emphysema", "Lung nodule"]
    assert "18 finding column(s) without a positive study left out" in said
    by_key = {row["VolumeName"]: row for row in rows}
    assert set(by_key) == {f"study{number:02d}-0" for number in range(24)}
    assert by_key["study01-0"]["Lung nodule"] == "1"  # agreed PATHOLOGY: the model's finding
    assert by_key["study01-0"]["Emphysema"] == "1"  # and the one the reader added
    assert by_key["study03-0"]["Emphysema"] == "0"
    assert by_key["study05-0"]["Lung nodule"] == "0"  # corrected to NORMAL
    assert by_key["study00-0"]["Lung nodule"] == "0"  # agreed NORMAL
    table = pq.read_table(out / "embeddings.parquet")
    assert table.schema.equals(EMBEDDING_SCHEMA)
    assert table.num_rows == 24
    assert set(table["encoder_version"].to_pylist()) == {ENCODER_SHA[:12]}
    assert all(len(vector) == 512 for vector in table["embedding"].to_pylist())

    for task in ("binary", "multilabel"):
        completed = subprocess.run(
            [
                sys.executable, "-m", "training", "train", "--task", task,
                "--embeddings", str(out / "embeddings.parquet"),
                "--labels", str(out / "labels.csv"), "--output", str(tmp_path / task),
                "--max-epochs", "5", "--patience", "2", "--val-fraction", "0.25",
            ],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-2000:]
        assert (tmp_path / task / "split.json").is_file(), sorted((tmp_path / task).iterdir())
