"""Patient privacy: the batch CLI at DEBUG level never writes a patient's name, ID or birth date.

A folder of corpus inputs (successes, failures, broken files, several studies in one zip,
files with damaged headers) whose every DICOM file carries distinctive patient values is
screened by ``python -m services.batch`` as a subprocess with ``CTS__LOGGING__LEVEL=DEBUG``.
Everything the run produced is searched for those values: stdout, stderr (the log), every
file in the output folder (the xlsx unpacked), the working directory, the temporary folder
and the home directory the process was given, and all their file names. The reports may
carry study UIDs, and do: that is checked too, so the search is known to look at content
that comes from the DICOM headers.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pydicom
import pytest
from batch_support import screen_with
from corpus import builders
from corpus.builders import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME
from corpus.kinds import KINDS, SENTINEL, Source
from openpyxl import load_workbook

# The batch runs once at DEBUG level in a subprocess (about 10 s).
pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Stands for a patient's name in file names (exports are often named after the patient):
# reports may show the path of an input, logs name inputs and files by hash or not at all.
FILE_NAME_TOKEN = "Qwyx-Filename-Token"

# The patient values and the ways a formatter could spell them.
FORBIDDEN = (
    PATIENT_NAME,
    PATIENT_NAME.replace("^", " "),
    "Zzyzx",
    PATIENT_ID,
    "98765-XYZ",
    PATIENT_BIRTH_DATE,
    "1901-02-03",
    "03.02.1901",
)
# Successes and failures, with the paths that log the most: unreadable and damaged files,
# decoder errors, non-image objects, derived identifiers, several studies per input.
PRIVACY_KINDS = (
    "nested_zip",
    "duplicate_positions",
    "truncated_slices",
    "damaged_rows_element",
    "damaged_file_meta",
    "missing_rescale",
    "missing_uids",
    "corrupt_jpeg2000",
    "mr",
    "sr_only",
    "seg_only",
    "dicom_without_pixel_data",
    "three_studies_in_one_zip",
    "mixed_good_and_broken_folder",
    "dicomdir_with_images",
    "bare_dataset",
    "garbage_orientation",
    "zip_path_escape",
    "zip_damaged_deflate_stream",
)


def _build_inputs(source: Source, root: Path) -> tuple[Path, int]:
    """Each chosen kind's input copied into one folder; returns it and the number of studies."""
    inputs = root / "inputs"
    inputs.mkdir()
    kinds = kinds_by_id()
    studies = 0
    for index, kind_id in enumerate(PRIVACY_KINDS):
        kind = kinds[kind_id]
        workspace = root / "build" / kind_id
        (workspace / SENTINEL).mkdir(parents=True)
        built = kind.build(source, workspace)
        target = inputs / f"{index:02d}_{kind_id}{built.suffix if built.is_file() else ''}"
        if built.is_dir():
            shutil.copytree(built, target, symlinks=True)
        else:
            shutil.copy2(built, target)
        studies += len(kind.outcomes)
    return inputs, studies + _add_named_inputs(source, root, inputs)


def _add_named_inputs(source: Source, root: Path, inputs: Path) -> int:
    """Two inputs whose names carry the token: a broken zip and a folder of named files."""
    broken = kinds_by_id()["truncated_zip"].build(source, root / "build" / "named_zip")
    shutil.copy2(broken, inputs / f"{FILE_NAME_TOKEN} export.zip")
    folder = inputs / f"{FILE_NAME_TOKEN} study"
    paths = builders.write_datasets(
        source.chest(), folder, name=FILE_NAME_TOKEN + "_{index:04d}.dcm"
    )
    for path in paths[10:12]:  # unreadable files are listed by name in the report
        builders.truncate_file(path, 0.5)
    return 2


def kinds_by_id() -> dict:
    return {kind.id: kind for kind in KINDS}


def _texts_under(folder: Path) -> dict[str, str]:
    """Every file's path and content as text; the members of xlsx (zip) files unpacked.

    The DICOM SRs (``sr/``) are searched by name only: they are written for the PACS, which
    files them with the study by its patient and study identification (the SR module's
    contract); ``test_only_the_srs_carry_the_patient`` checks that this is all they are.
    """
    texts = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        texts[f"{path} (name)"] = str(path.relative_to(folder))
        if path.parent.name == "sr" and path.suffix == ".dcm":
            continue
        data = path.read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    texts[f"{path}!{member}"] = archive.read(member).decode("utf-8", "replace")
        else:
            texts[str(path)] = data.decode("utf-8", "replace")
    return texts


@pytest.fixture(scope="module")
def debug_run(fixtures_dir: Path, tiny_model_repository: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("privacy")
    inputs, studies = _build_inputs(Source(fixtures_dir), root)
    output, cwd, temp, home = root / "output", root / "cwd", root / "tmp", root / "home"
    for folder in (cwd, temp, home):
        folder.mkdir()
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CTS__", "XDG_", "LOGURU_"))
    }
    environment.update(
        CTS__LOGGING__LEVEL="DEBUG",
        TMPDIR=str(temp),
        HOME=str(home),  # anything written to ~/.cache or ~/.config is searched too
    )
    completed = screen_with(tiny_model_repository, inputs, output, cwd=cwd, environment=environment)
    return {
        "completed": completed,
        "studies": studies,
        "inputs": inputs,
        "output": output,
        "searched": {"stdout": completed.stdout, "stderr": completed.stderr}
        | _texts_under(output)
        | _texts_under(cwd)
        | _texts_under(temp)
        | _texts_under(home),
    }


def test_the_run_worked_at_debug_level(debug_run: dict) -> None:
    completed = debug_run["completed"]
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Positive controls: DEBUG lines were written, and every study has its row and JSON.
    assert "| DEBUG    |" in completed.stderr
    rows = list(load_workbook(debug_run["output"] / "output.xlsx")["report"].iter_rows())
    assert len(rows) - 1 == debug_run["studies"]
    assert len(list((debug_run["output"] / "json").glob("*.json"))) == debug_run["studies"]


def test_no_patient_value_anywhere(debug_run: dict) -> None:
    searched = debug_run["searched"]
    assert len(searched) > 2 + debug_run["studies"]  # logs, xlsx members, JSON, warnings
    leaks = [
        f"{value!r} in {where}"
        for where, text in searched.items()
        for value in FORBIDDEN
        if value.lower() in text.lower()
    ]
    assert not leaks, "patient values were written:\n" + "\n".join(leaks)


def test_only_the_srs_carry_the_patient(debug_run: dict) -> None:
    """The SRs left out of the search above are DICOM SRs that identify the patient, as a
    PACS needs, and nothing else in the output folder is skipped."""
    output = debug_run["output"]
    srs = sorted((output / "sr").glob("*.dcm"))
    assert srs
    searched = {where.split("!")[0] for where in debug_run["searched"]}
    skipped = sorted(
        path for path in output.rglob("*") if path.is_file() and str(path) not in searched
    )
    assert skipped == srs
    for path in srs:
        sr = pydicom.dcmread(path)
        assert sr.Modality == "SR"
        assert sr.PatientID == PATIENT_ID
        assert str(sr.PatientName) == PATIENT_NAME
        assert sr.PatientBirthDate == PATIENT_BIRTH_DATE


def test_reports_carry_study_uids_but_no_patient_values(debug_run: dict) -> None:
    output = debug_run["output"]
    documents = [json.loads(path.read_text()) for path in sorted((output / "json").glob("*.json"))]
    with_uid = [document for document in documents if document["study_uid"]]
    assert len(with_uid) >= 10  # the search above did see content taken from the headers
    study_uids = {document["study_uid"] for document in with_uid}
    assert len(study_uids) >= 4  # the chest and its copy, the MR, the JPEG 2000 abdomen...
    sheet = load_workbook(output / "output.xlsx")["report"]
    cells = [str(cell) for row in sheet.iter_rows(values_only=True) for cell in row if cell]
    assert study_uids <= set(cells)
    warnings_text = (output / "warnings_and_errors.txt").read_text()
    assert all(uid in warnings_text for uid in study_uids)
    for text in [*cells, warnings_text, *(json.dumps(document) for document in documents)]:
        for value in FORBIDDEN:
            assert value.lower() not in text.lower()


def test_input_and_file_names_stay_out_of_the_logs(debug_run: dict) -> None:
    completed = debug_run["completed"]
    logs = (completed.stdout + completed.stderr).lower()
    assert FILE_NAME_TOKEN.lower() not in logs
    # Positive control: the names did reach the product, whose reports may show them.
    warnings_text = (debug_run["output"] / "warnings_and_errors.txt").read_text()
    assert f"{FILE_NAME_TOKEN} export.zip" in warnings_text
    assert f"{FILE_NAME_TOKEN}_0010.dcm" in warnings_text  # listed as unreadable
