"""``python -m visualisation`` with FiftyOne's real database and App: batch runs over the real
fixtures and `python -m training embed` with the tiny model, a dataset built from them (one
sample per study, every field, the brain's map), re-runs that add only new studies, and the
App on a free port whose Embeddings panel shows the points in headless Chromium.

FiftyOne keeps its database under a temporary folder (FIFTYONE_DATABASE_DIR) and is told not
to report usage; its mongod stops once the last process using it has exited.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from services.core.reports import finding_column
from services.triton.local_server import free_local_ports
from visualisation.media import CARD_SIZE, MEDIA_HEIGHT

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHEST = "chest_ct_lung_dx_a0002"
MR = "mr_brain_t1"
DATASET = "screening"
HOSPITAL_B_VARIANTS = 5  # chests screened by the batch in a second folder
HOSPITAL_C_VARIANTS = 4  # chests only embedded (`training embed`), no report, no preview
LABELS = {CHEST: ["Emphysema"], "chest_c0": [], "chest_c1": ["Lung nodule", "Emphysema"]}
LABEL_COLUMNS = ("Emphysema", "Lung nodule")
APP_START_TIMEOUT_S = 240  # UMAP's first run compiles its numba code (about 30 s here)
APP_STOP_TIMEOUT_S = 60
# The App's first page load compiles megabytes of script and draws with WebGL in software, on
# two cores shared with other work.
PAGE_TIMEOUT_MS = 120_000
MIN_POINT_PIXELS = 4  # a point of the map is a disc of about 4 pixels across
COMMAND_TIMEOUT_S = 300


def _run(module: str, *arguments: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, "-m", module, *map(str, arguments)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def _chest_variant(source: Path, destination: Path, seed: str, first: int, count: int) -> None:
    """The chest's slices ``first .. first + count`` under new UIDs: another study, whose model
    input (and so embedding) differs from the chest's."""
    destination.mkdir(parents=True)
    slices = sorted(
        (pydicom.dcmread(path) for path in source.glob("*.dcm")),
        key=lambda dataset: float(dataset.ImagePositionPatient[2]),
    )
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    for index, dataset in enumerate(slices[first : first + count]):
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(index)])
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(destination / f"{index:03d}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """FiftyOne's database and datasets in a temporary folder, for this process (the tests
    read the dataset back) and for every command the tests run."""
    home = tmp_path_factory.mktemp("fiftyone")
    settings = {
        "FIFTYONE_DATABASE_DIR": str(home / "database"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(home / "datasets"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "ORT_DISABLE_TELEMETRY": "1",
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def screened(
    fixtures_dir: Path,
    tiny_model_repository: Path,
    environment: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """Batch results of the fixtures (hospital A: one chest, five refused) and of chest
    variants (hospital B), an embeddings parquet of other variants (hospital C), labels."""
    root = tmp_path_factory.mktemp("screened")
    for folder, count in (("hospital_b", HOSPITAL_B_VARIANTS), ("hospital_c", HOSPITAL_C_VARIANTS)):
        for index in range(count):
            _chest_variant(
                fixtures_dir / CHEST,
                root / folder / f"chest_{folder[-1]}{index}",
                seed=f"{folder}-{index}",
                first=index,
                count=24 + index % 3,
            )
    repository = ("--model-repository", tiny_model_repository)
    _run("services.batch", fixtures_dir, root / "out_a", *repository, env=environment)
    _run("services.batch", root / "hospital_b", root / "out_b", *repository, env=environment)
    parquet = root / "hospital_c.parquet"
    _run("training", "embed", root / "hospital_c", parquet, *repository, env=environment)
    labels = root / "labels.csv"
    lines = ["VolumeName," + ",".join(LABEL_COLUMNS)]
    for name, positives in LABELS.items():
        lines.append(",".join([name, *("1" if c in positives else "0" for c in LABEL_COLUMNS)]))
    labels.write_text("\n".join(lines) + "\n")
    return {
        "out_a": root / "out_a",
        "out_b": root / "out_b",
        "parquet": parquet,
        "labels": labels,
        "fixtures": fixtures_dir,
    }


def _reports(results: Path) -> dict[str, dict]:
    """The JSON reports of a batch output, by input name."""
    documents = [json.loads(path.read_text()) for path in sorted(results.glob("json/*.json"))]
    return {Path(document["path_to_study"]).name: document for document in documents}


@pytest.fixture(scope="module")
def built(screened: dict[str, Path], environment: dict[str, str]) -> dict[str, str]:
    """The dataset built in two runs: hospital A with the parquet and labels, then A again
    with B (A's studies must not come twice)."""
    first = _run(
        "visualisation",
        "--results", screened["out_a"],
        "--embeddings", screened["parquet"],
        "--labels", screened["labels"],
        "--dataset", DATASET,
        "--method", "pca",
        "--no-launch",
        env=environment,
    )  # fmt: skip
    second = _run(
        "visualisation",
        "--results", screened["out_a"], screened["out_b"],
        "--dataset", DATASET,
        "--method", "pca",
        "--no-launch",
        env=environment,
    )  # fmt: skip
    return {"first": first.stdout, "second": second.stdout}


def test_the_dataset_holds_one_sample_per_study_with_its_fields(
    built: dict[str, str], screened: dict[str, Path]
) -> None:
    import fiftyone as fo

    n_a = len(_reports(screened["out_a"]))
    n_c = pq.read_table(screened["parquet"]).num_rows
    assert f"{n_a + n_c} studies added, 0 already there" in built["first"]
    assert f"{HOSPITAL_B_VARIANTS} studies added, {n_a} already there" in built["second"]
    dataset = fo.load_dataset(DATASET)
    assert dataset.persistent
    assert len(dataset) == n_a + HOSPITAL_B_VARIANTS + n_c
    assert len(set(dataset.values("study_key"))) == len(dataset)

    schema = dataset.get_field_schema()
    expected = {
        "p_pathology", "call", "prediction", "positive_findings", "most_dangerous_finding",
        "status", "failure_reason", "warnings", "is_chest_ct", "chest_check", "source",
        "model_version", "demo_weights", "ground_truth", "ground_truth_pathology", "embedding",
    }  # fmt: skip
    assert expected <= set(schema)

    reports = _reports(screened["out_a"])
    chest_report = reports[CHEST]
    chest = dataset.match(fo.ViewField("name") == CHEST).first()
    assert chest.status == "Success"
    assert chest.origin == "report"
    assert chest.source == screened["fixtures"].name
    assert chest.p_pathology == pytest.approx(chest_report["probability_of_pathology"])
    assert chest.call == ("PATHOLOGY" if chest_report["pathology"] else "NORMAL")
    assert chest.prediction.label == chest.call
    for finding in chest_report["findings"]:
        assert chest[finding_column(finding["label"])] == pytest.approx(finding["probability"])
    assert chest.most_dangerous_finding == chest_report["most_dangerous_pathology_type"]
    assert chest.warnings == chest_report["warnings"]
    assert chest.is_chest_ct is True
    assert chest.model_version == chest_report["model"]["version"]
    assert chest.demo_weights is True
    np.testing.assert_allclose(chest.embedding, chest_report["embedding"], rtol=1e-6)
    assert [label.label for label in chest.ground_truth.classifications] == LABELS[CHEST]
    with Image.open(chest.filepath) as image:  # axial and coronal side by side
        assert image.height == MEDIA_HEIGHT
        assert image.width > 2 * MEDIA_HEIGHT

    mr = dataset.match(fo.ViewField("name") == MR).first()
    assert mr.status == "Failure"
    assert mr.failure_reason == reports[MR]["failure_reason"]
    assert mr.call is None
    assert mr.embedding is None
    assert mr.p_pathology is None
    with Image.open(mr.filepath) as image:  # a card saying why there is no image
        assert image.size == CARD_SIZE

    embedded = dataset.match(fo.ViewField("origin") == "embeddings")
    assert len(embedded) == n_c
    assert set(embedded.values("source")) == {"hospital_c.parquet"}
    c1 = embedded.match(fo.ViewField("name") == "chest_c1").first()
    assert sorted(label.label for label in c1.ground_truth.classifications) == sorted(
        LABELS["chest_c1"]
    )
    assert c1.ground_truth_pathology is True
    assert c1.label_source == "labels.csv"
    c0 = embedded.match(fo.ViewField("name") == "chest_c0").first()
    assert c0.ground_truth.classifications == []
    assert c0.ground_truth_pathology is False
    hospital_b = dataset.match(fo.ViewField("source") == "hospital_b")
    assert len(hospital_b) == HOSPITAL_B_VARIANTS
    assert hospital_b.count("ground_truth") == 0


def test_the_brain_map_covers_every_embedding(built: dict[str, str]) -> None:
    import fiftyone as fo

    dataset = fo.load_dataset(DATASET)
    with_embedding = dataset.exists("embedding")
    n_embeddings = 1 + HOSPITAL_B_VARIANTS + HOSPITAL_C_VARIANTS
    assert len(with_embedding) == n_embeddings
    assert "embeddings_pca" in dataset.list_brain_runs()
    results = dataset.load_brain_results("embeddings_pca")
    assert results.config.method == "pca"
    assert results.points.shape == (n_embeddings, 2)
    assert sorted(results.sample_ids) == sorted(with_embedding.values("id"))
    assert np.isfinite(results.points).all()
    # Different studies, different embeddings: no two studies on the same spot.
    distances = np.linalg.norm(results.points[:, None] - results.points[None], axis=-1)
    assert distances[~np.eye(n_embeddings, dtype=bool)].min() > 0
    assert f"{n_embeddings} with an embedding" in built["second"]


def _wait_for_page(url: str, process: subprocess.Popen, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the visualisation command exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the App did not answer at {url} within {timeout_s} s")


def _coloured_pixels(png: bytes) -> int:
    """Pixels of a saturated colour (the map's points; the panel itself is grey)."""
    import io

    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    return int(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 60).sum())


@pytest.mark.browser
def test_the_app_shows_the_embeddings_panel_with_points(
    screened: dict[str, Path], environment: dict[str, str], tmp_path: Path
) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    (port,) = free_local_ports(1)
    n_embeddings = 1 + HOSPITAL_B_VARIANTS + HOSPITAL_C_VARIANTS
    command = [
        sys.executable, "-m", "visualisation",
        "--results", str(screened["out_a"]), str(screened["out_b"]),
        "--embeddings", str(screened["parquet"]),
        "--dataset", DATASET, "--port", str(port),
    ]  # fmt: skip
    log = (tmp_path / "visualisation.log").open("w")
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}/datasets/{DATASET}"
        page_html = _wait_for_page(url, process, APP_START_TIMEOUT_S)
        assert b"<title>FiftyOne</title>" in page_html
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                ],
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url, timeout=PAGE_TIMEOUT_MS)
                visualisation = page.get_by_text("embeddings_umap").first
                try:
                    visualisation.wait_for(timeout=PAGE_TIMEOUT_MS)
                except PlaywrightTimeout:
                    page.screenshot(path=str(tmp_path / "no-visualisation.png"))
                    raise
                dismiss = page.get_by_role("button", name="Dismiss")  # FiftyOne's own advert
                with contextlib.suppress(PlaywrightTimeout):  # shown once per browser, if at all
                    dismiss.click(timeout=5_000)
                visualisation.click()
                page.get_by_text(f"{n_embeddings} points").wait_for(timeout=PAGE_TIMEOUT_MS)
                page.wait_for_timeout(2_000)  # the WebGL canvas draws after the count shows
                canvases = page.locator("canvas")
                sizes = [
                    (box["width"] * box["height"], index)
                    for index in range(canvases.count())
                    if (box := canvases.nth(index).bounding_box())
                ]
                plot = canvases.nth(max(sizes)[1])  # the map; the grid's tiles are small
                # The points, in one colour before a colour field is chosen; the panel's texts
                # drawn over the map are grey.
                assert _coloured_pixels(plot.screenshot()) >= n_embeddings * MIN_POINT_PIXELS
                page.get_by_text("Color by").click()
                page.get_by_role("combobox", name="Color by").fill("source")
                page.keyboard.press("Enter")
                # The legend: each source and its points (the fixtures' one chest, hospital B's
                # reports, the parquet's rows).
                legend = page.locator(".emb-legend-row")
                legend.first.wait_for(timeout=PAGE_TIMEOUT_MS)
                page.wait_for_timeout(1_000)
                assert sorted(legend.all_inner_texts()) == sorted(
                    [
                        f"{screened['fixtures'].name}\n1",
                        f"hospital_b\n{HOSPITAL_B_VARIANTS}",
                        f"hospital_c.parquet\n{HOSPITAL_C_VARIANTS}",
                    ]
                )
                page.screenshot(path=str(tmp_path / "fiftyone-app.png"))
            finally:
                browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=APP_STOP_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
        output = (tmp_path / "visualisation.log").read_text()
    assert returncode == 0, output[-4000:]
    assert f"UMAP of {n_embeddings} embeddings" in output  # the default map when installed
    with pytest.raises(urllib.error.URLError):  # the App's server stopped with the command
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
