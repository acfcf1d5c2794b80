"""The visualisation tool's pure parts: records from reports and parquet rows, labels, where
previews are found, the sample images, the choice of map, and the batch's preview files.
Nothing here needs FiftyOne's database (tests/test_visualisation.py does)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from report_support import screened_report

from services.batch.preview_files import PreviewWriter
from services.core.labels import FINDING_LABELS
from services.core.pipeline import PreparedStudy
from services.core.previews import study_previews, write_study_previews
from services.core.reports import json_file_name, study_file_key
from services.core.schemas import (
    ChestCheckEvidence,
    ProcessingStatus,
    StudyReport,
)
from visualisation.cli import parse_arguments
from visualisation.embedding_map import UMAP_MIN_POINTS, choose_map
from visualisation.errors import VisualisationInputError, VisualisationSetupError
from visualisation.media import CARD_SIZE, GAP, card_lines, media_file_name, sample_media
from visualisation.records import (
    NORMAL_CALL,
    PATHOLOGY_CALL,
    record_from_embedding_row,
    record_from_report,
    source_of,
    with_labels,
)
from visualisation.sources import (
    preview_files,
    read_embedding_rows,
    read_label_rows,
    read_results,
)

PATIENT_NAME = "DOE^JANE"
EMBEDDING = [0.6, 0.8, 0.0]


def _success(pathology: int = 1) -> StudyReport:
    return screened_report(
        finding_scale=20,
        path_to_study=f"/data/hospital_a/{PATIENT_NAME}.zip",
        pathology=pathology,
        chest_check=ChestCheckEvidence(
            is_chest=True,
            reason="chest CT: the tags say chest and the images show lungs",
            image_verdict=True,
            image_detector="lung_air",
            coverage_mm=240.0,
        ),
        study_date="2007-04-25",
        embedding=EMBEDDING,
    )


def _failure(study_uid: str | None = None) -> StudyReport:
    return StudyReport(
        path_to_study="/data/hospital_a/broken.zip",
        study_uid=study_uid,
        processing_status=ProcessingStatus.FAILURE,
        failure_reason="the archive is truncated",
        demo_weights=True,
    )


def test_a_success_report_becomes_a_flat_record() -> None:
    record = record_from_report(_success(), source="/data/hospital_a")
    assert record.key == "study:1.2.3.4"
    assert record.origin == "report"
    assert record.name == f"{PATIENT_NAME}.zip"
    assert record.call == PATHOLOGY_CALL
    assert record.probability_of_pathology == 0.8125
    assert record.finding_probabilities["Cancer"] == pytest.approx(19 / 20)
    assert record.positive_findings == list(FINDING_LABELS[10:])
    assert record.most_dangerous_finding == "Lymphadenopathy"
    assert record.is_chest_ct is True
    assert record.chest_check is not None
    assert record.chest_check.startswith("chest CT")
    assert record.model_version == "demo-abcdef012345"
    assert record.demo_weights is True
    assert record.embedding == EMBEDDING
    assert record_from_report(_success(pathology=0), source="s").call == NORMAL_CALL


def test_a_failure_without_uid_is_keyed_by_its_input() -> None:
    record = record_from_report(_failure(), source="/data/hospital_a")
    assert record.key == "input:/data/hospital_a/broken.zip"
    assert record.call is None
    assert record.embedding is None
    assert record.is_chest_ct is None
    assert record.failure_reason == "the archive is truncated"
    assert record_from_report(_failure("7.7"), source="x").key == "study:7.7"


def test_source_is_the_input_folder_or_the_results_folder(tmp_path) -> None:
    assert source_of("/data/hospital_a/x.zip", tmp_path / "out") == "hospital_a"
    assert source_of("upload.zip", tmp_path / "task-1") == "task-1"  # the stack's reports


def test_embedding_rows_read_like_the_training_parquet(tmp_path) -> None:
    path = tmp_path / "train.parquet"
    table = pa.table(
        {
            "name": ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"],
            "study_uid": ["2.25.1", None],
            "embedding": [EMBEDDING, None],
            "status": ["Success", "Failure"],
            "failure_reason": [None, "not a chest CT"],
            "input_path": ["train_1/train_1_a/train_1_a_1.nii.gz", "train_2/train_2_a_1.nii.gz"],
            "encoder_version": ["abcdef012345", "abcdef012345"],
            "demo_weights": [True, True],
        }
    )
    pq.write_table(table, path)
    success, failure = read_embedding_rows(path)
    assert success.key == "study:2.25.1"
    assert success.origin == "embeddings"
    assert success.source == "train.parquet"
    assert success.embedding == pytest.approx(EMBEDDING)
    assert success.model_version == "demo-abcdef012345"  # the form of a report's version
    assert failure.key == "input:train.parquet/train_2/train_2_a_1.nii.gz"
    assert failure.embedding is None
    assert failure.failure_reason == "not a chest CT"
    pq.write_table(pa.table({"name": ["a"], "status": ["Success"]}), tmp_path / "bad.parquet")
    with pytest.raises(VisualisationInputError, match="embedding"):
        read_embedding_rows(tmp_path / "bad.parquet")


def test_labels_match_by_volume_name_without_nifti_suffix(tmp_path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("VolumeName,Emphysema,Lung nodule\ntrain_1_a_1,1,0\nclean.nii.gz,0,0\n")
    labels = read_label_rows(path)
    row = record_from_embedding_row(
        {"name": "train_1_a_1.nii.gz", "embedding": EMBEDDING, "status": "Success"},
        source="train.parquet",
    )
    labelled = with_labels(row, labels)
    assert labelled.ground_truth == ["Emphysema"]
    assert labelled.ground_truth_pathology is True
    assert labelled.label_source == "labels.csv"
    clean = with_labels(row.model_copy(update={"name": "clean"}), labels)
    assert clean.ground_truth == []
    assert clean.ground_truth_pathology is False
    unknown = with_labels(row.model_copy(update={"name": "other.nii"}), labels)
    assert unknown.ground_truth is None
    assert unknown.label_source is None
    path.write_text("VolumeName,Emphysema\nx,2\n")
    with pytest.raises(VisualisationInputError, match="other than 0/1"):
        read_label_rows(path)


def test_previews_are_found_by_the_batch_key_or_the_stack_index(tmp_path) -> None:
    report = _success()
    batch = tmp_path / "batch"
    (batch / "json").mkdir(parents=True)
    json_path = batch / "json" / json_file_name(1, report)
    json_path.write_text(report.model_dump_json())
    assert preview_files(json_path, report) == (None, None)
    model_input = np.linspace(-1, 1, 6 * 8 * 8, dtype=np.float32).reshape(1, 1, 6, 8, 8)
    axial, coronal = write_study_previews(
        model_input, (3.0, 1.5, 1.5), batch / "previews", study_file_key(report)
    )
    assert preview_files(json_path, report) == (axial, coronal)
    assert json_path.name.endswith(f"_{study_file_key(report)}.json")

    stack = tmp_path / "results" / "task-1"
    (stack / "json").mkdir(parents=True)
    (stack / "previews").mkdir()
    stack_json = stack / "json" / json_file_name(2, report)
    stack_json.write_text(report.model_dump_json())
    for view in ("axial_50", "coronal_50"):
        Image.new("L", (8, 8)).save(stack / "previews" / f"study2_{view}.png")
    found = preview_files(stack_json, report)
    assert found == (
        stack / "previews" / "study2_axial_50.png",
        stack / "previews" / "study2_coronal_50.png",
    )
    (tmp_path / "results" / "task-1.json").write_text("{}")  # the stack's message: not a report
    (stack / "json" / "study_0003_000000000000.json").write_text('{"not": "a report"}')
    read = read_results(tmp_path / "results")
    assert len(read.records) == 1
    assert read.unreadable == 1
    assert read.records[0].axial_preview == found[0]


def test_the_coronal_preview_keeps_true_proportions() -> None:
    volume = np.zeros((1, 1, 6, 8, 10), dtype=np.float32)  # S x L x P, 3 mm slices, 1.5 mm pixels
    images = study_previews(volume, (3.0, 1.5, 1.5))
    assert images["axial"].shape == (10, 8)  # rows posterior axis, columns left axis
    assert images["coronal"].shape == (12, 8)  # 6 slices x 3 mm = 12 rows of 1.5 mm


def test_sample_media_puts_the_views_side_by_side_or_says_why_there_is_none(tmp_path) -> None:
    axial, coronal = tmp_path / "a.png", tmp_path / "c.png"
    Image.new("L", (100, 100), 200).save(axial)
    Image.new("L", (100, 50), 100).save(coronal)
    record = record_from_report(
        _success(), source="s", axial_preview=axial, coronal_preview=coronal
    )
    image = sample_media(record)
    assert image.height == 256
    assert image.width == 256 + GAP + 512
    assert image.getpixel((10, 10)) == 200
    assert image.getpixel((image.width - 10, 10)) == 100
    failure = record_from_report(_failure(), source="s")
    assert sample_media(failure).size == CARD_SIZE
    lines = card_lines(failure)
    assert lines[0] == "Failure"
    assert "the archive is truncated" in lines
    assert not any("broken" in line for line in lines)  # never the input's name
    assert PATIENT_NAME not in media_file_name(record.key)


@pytest.mark.parametrize(
    ("requested", "points", "umap", "method"),
    [
        (None, UMAP_MIN_POINTS, True, "umap"),
        (None, UMAP_MIN_POINTS, False, "pca"),
        (None, UMAP_MIN_POINTS - 1, True, "pca"),
        ("pca", 100, True, "pca"),
        ("umap", 100, True, "umap"),
        (None, 1, True, None),
    ],
)
def test_the_map_method(requested, points, umap, method) -> None:
    choice = choose_map(requested, points, umap_available=umap)
    assert choice.method == method
    if method == "umap":
        assert choice.parameters["num_neighbors"] == min(15, points - 1)
    assert choice.brain_key == (None if method is None else f"embeddings_{method}")


def test_umap_asked_for_without_umap_learn_stops_with_a_reason() -> None:
    with pytest.raises(VisualisationSetupError, match="umap-learn"):
        choose_map("umap", 50, umap_available=False)


def test_the_cli_needs_results_or_embeddings() -> None:
    with pytest.raises(SystemExit):
        parse_arguments(["--dataset", "x"])
    arguments = parse_arguments(["--results", "a", "b", "--dataset", "x", "--no-launch"])
    assert [str(path) for path in arguments.results] == ["a", "b"]
    assert arguments.port == 5151


def test_the_batch_preview_writer_names_files_by_the_report_key(tmp_path) -> None:
    report = _success()
    model_input = np.zeros((1, 1, 6, 8, 8), dtype=np.float32)
    prepared = PreparedStudy(
        report=report, model_input=model_input, index=0, n_studies=1, shared_seconds=0.0
    )
    PreviewWriter(tmp_path, spacing_mm=(3.0, 1.5, 1.5)).model_input_ready(prepared)
    key = study_file_key(report)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"{key}_axial.png",
        f"{key}_coronal.png",
    ]
    refused = PreparedStudy(
        report=_failure(), model_input=None, index=1, n_studies=2, shared_seconds=0.0
    )
    PreviewWriter(tmp_path / "none", spacing_mm=(3.0, 1.5, 1.5)).model_input_ready(refused)
    assert not (tmp_path / "none").exists()
