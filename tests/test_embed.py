"""``python -m training embed`` over the real fixtures and NIfTI volumes with the tiny repository:
one row per study, failures as rows, the CT-RATE convention, resuming, mixed encoders refused."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

import training.embed as embed_module
from training.cli import main
from training.data import read_embeddings
from training.embed import EmbedOptions, embed

# Every test runs the pipeline and the encoder over several inputs.
pytestmark = pytest.mark.slow

CHEST = "chest_ct_lung_dx_a0002"
MR = "mr_brain_t1"
# One volume through the same model input: the same embedding up to float32 reduction order.
SAME_EMBEDDING_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data_set(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chest and an MR as DICOM folders, the chest as a NIfTI (nested like CT-RATE) and as
    a CT-RATE-style file (raw values, meaningless affine) named in a metadata CSV."""
    root = tmp_path_factory.mktemp("data_set")
    inputs = root / "inputs"
    shutil.copytree(fixtures_dir / CHEST, inputs / "chest_dicom")
    shutil.copytree(fixtures_dir / MR, inputs / "mr_dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(fixtures_dir / CHEST)))
    nifti = inputs / "ct_rate" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz"
    nifti.parent.mkdir(parents=True)
    sitk.WriteImage(reader.Execute(), str(nifti))
    raw = np.round(np.asarray(nib.load(nifti).dataobj, dtype=np.float64) + 1024).astype(np.uint16)
    ct_rate = inputs / "ct_rate" / "train_2" / "train_2_a" / "train_2_a_1.nii.gz"
    ct_rate.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(raw, np.diag([2.0, 2.0, 0.5, 1.0])), ct_rate)
    (root / "metadata.csv").write_text(
        "VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\n"
        'train_2_a_1.nii.gz,1,-1024,"[0.646484375, 0.646484375]",8\n'
    )
    return root


def _options(data_set: Path, output: Path, repository: Path) -> EmbedOptions:
    return EmbedOptions(
        input=data_set / "inputs",
        output=output,
        model_repository=repository,
        ct_rate_metadata=data_set / "metadata.csv",
    )


def test_embed_writes_one_row_per_study_and_resumes(
    data_set: Path, tiny_model_repository: Path, tmp_path: Path
) -> None:
    output = tmp_path / "embeddings.parquet"
    code = main(
        [
            "embed", str(data_set / "inputs"), str(output),
            "--model-repository", str(tiny_model_repository),
            "--ct-rate-metadata", str(data_set / "metadata.csv"),
        ]
    )  # fmt: skip
    assert code == 0
    rows = {row["name"]: row for row in pq.read_table(output).to_pylist()}
    assert set(rows) == {"chest_dicom", "mr_dicom", "train_1_a_1.nii.gz", "train_2_a_1.nii.gz"}
    assert rows["mr_dicom"]["status"] == "Failure"
    assert "MR" in rows["mr_dicom"]["failure_reason"]
    assert rows["mr_dicom"]["embedding"] is None
    embeddings = {}
    for name in ("chest_dicom", "train_1_a_1.nii.gz", "train_2_a_1.nii.gz"):
        row = rows[name]
        assert row["status"] == "Success", row["failure_reason"]
        assert row["study_uid"]
        assert row["demo_weights"] is True
        assert len(row["encoder_version"]) == 12
        vector = np.asarray(row["embedding"], dtype=np.float64)
        assert vector.shape == (16,)  # the tiny encoder's dim_latent
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
        embeddings[name] = vector
    # The NIfTI (affine) and the CT-RATE file (CSV convention) give the chest series' input.
    for name in ("train_1_a_1.nii.gz", "train_2_a_1.nii.gz"):
        difference = np.abs(embeddings[name] - embeddings["chest_dicom"]).max()
        assert difference <= SAME_EMBEDDING_TOLERANCE, (name, difference)
    # The trainer reads the file: the three successful rows, keyed without .nii.gz.
    table = read_embeddings(output)
    assert sorted(table.keys) == ["chest_dicom", "train_1_a_1", "train_2_a_1"]
    assert table.not_successful == 1

    again = embed(_options(data_set, output, tiny_model_repository))
    assert (again.inputs_total, again.inputs_skipped, again.inputs_embedded) == (4, 4, 0)
    assert pq.read_table(output).num_rows == 4

    retried = embed(replace(_options(data_set, output, tiny_model_repository), retry_failures=True))
    assert (retried.inputs_embedded, retried.studies_failure) == (1, 1)
    assert pq.read_table(output).num_rows == 4  # the MR's old row was replaced, not doubled


def test_an_interrupted_run_keeps_its_rows_and_resumes(
    data_set: Path, tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "embeddings.parquet"
    real = embed_module.process_input
    calls = []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_module, "process_input", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        embed(_options(data_set, output, tiny_model_repository))
    assert not output.exists()
    parts = list((tmp_path / "embeddings.parquet.parts").glob("part-*.parquet"))
    assert len(parts) == 1
    assert pq.read_table(parts[0]).num_rows == 2

    monkeypatch.setattr(embed_module, "process_input", real)
    resumed = embed(_options(data_set, output, tiny_model_repository))
    assert (resumed.inputs_skipped, resumed.inputs_embedded) == (2, 2)
    assert pq.read_table(output).num_rows == 4
    assert not (tmp_path / "embeddings.parquet.parts").exists()


def test_embeddings_of_another_encoder_are_refused(
    data_set: Path,
    tiny_model_repository: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "other.parquet"
    row = {
        "name": "old.zip", "study_uid": "1.2.3", "embedding": [0.0] * 16, "status": "Success",
        "failure_reason": None, "input_path": "old.zip", "encoder_version": "another-encoder",
        "demo_weights": False,
    }  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row], schema=embed_module.EMBEDDING_SCHEMA), output)
    code = main(
        ["embed", str(data_set / "inputs" / "mr_dicom"), str(output),
         "--model-repository", str(tiny_model_repository)]
    )  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ")
    assert "another-encoder" in error
    assert pq.read_table(output).num_rows == 1  # untouched
