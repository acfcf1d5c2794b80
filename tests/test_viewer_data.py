"""Slice-viewer data: display orientation, crop, block means, the HU code table, size and time
on a study of the size scanners write (services/adapter/viewer_data.py)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.adapter.viewer_data import (
    CODE_KNOTS_HU,
    MAX_IN_PLANE,
    MAX_SLICES,
    block_mean,
    codes_hu,
    display_frame,
    encode_hu,
    read_viewer_codes,
    viewer_stack,
    write_viewer,
)
from services.core.config import load_settings
from services.core.dicom.headers import read_studies
from services.core.dicom.volume_builder import load_volume
from services.core.schemas import IntakeSummary
from services.core.volume import Volume

# A 300x512x512 study must give a small file, fast (the budget: a few MB, well under
# a second). Measured here: 3.4 MB, 0.15 s to build + 0.12 s to compress and write.
LARGE_STUDY_MAX_BYTES = 5_000_000
LARGE_STUDY_MAX_SECONDS = 2.0  # generous: the CI machine is shared
# Steps of the code table (HU per code) inside the ranges the windows look at.
STEP_LIMITS = ((-900.0, -200.0, 8.0), (-200.0, 300.0, 4.0), (300.0, 1500.0, 40.0))


def axial_volume(hu: np.ndarray, *, feet_first_prone: bool = False) -> Volume:
    """A standard axial series (head first supine), or feet first prone: every axis reversed."""
    sign = -1.0 if feet_first_prone else 1.0
    return Volume(
        hu=hu,
        row_cosine=np.array([sign, 0.0, 0.0]),
        column_cosine=np.array([0.0, sign, 0.0]),
        slice_normal=np.array([0.0, 0.0, sign]),
        spacing_mm=(2.0, 1.0, 1.0),
        origin_mm=np.zeros(3),
    )


def test_display_frame_puts_superior_anterior_and_patient_right_first() -> None:
    hu = np.full((8, 12, 16), -1000.0, dtype=np.float32)
    # Head first supine: slices grow toward superior, rows toward posterior, columns toward
    # the patient's left. A marker at the top slice, most anterior row, rightmost column.
    hu[7, 0, 0] = 500.0
    stack = viewer_stack(axial_volume(hu))
    assert display_frame(axial_volume(hu)).source_axis == (0, 1, 2)
    assert np.unravel_index(np.argmax(stack.codes), stack.codes.shape) == (0, 0, 0)
    # Feet first prone stores every axis the other way round: the same anatomy, same display.
    flipped = axial_volume(np.ascontiguousarray(hu[::-1, ::-1, ::-1]), feet_first_prone=True)
    np.testing.assert_array_equal(viewer_stack(flipped).codes, stack.codes)


def test_a_coronal_series_is_shown_in_the_same_frame() -> None:
    # Stored as coronal slices: axis 0 runs anterior -> posterior, axis 1 superior -> inferior
    # (column cosine -z), axis 2 right -> left.
    hu = np.full((6, 10, 12), 40.0, dtype=np.float32)  # all body: nothing to crop
    hu[0, 0, 11] = 500.0  # most anterior slice, top row, patient's far left
    volume = Volume(
        hu=hu,
        row_cosine=np.array([1.0, 0.0, 0.0]),
        column_cosine=np.array([0.0, 0.0, -1.0]),
        slice_normal=np.array([0.0, 1.0, 0.0]),
        spacing_mm=(2.0, 2.0, 2.0),
        origin_mm=np.zeros(3),
    )
    assert display_frame(volume).source_axis == (1, 0, 2)
    codes = viewer_stack(volume).codes
    assert codes.shape == (10, 6, 12)
    assert np.unravel_index(np.argmax(codes), codes.shape) == (0, 0, 11)


def test_block_mean_matches_the_mean_of_each_block() -> None:
    rng = np.random.default_rng(3)
    array = rng.normal(size=(9, 10, 7)).astype(np.float32)
    view = array[:, 1:, :]  # non-contiguous, as after a crop
    result = block_mean(view, (3, 2, 2))
    expected = view[:9, :8, :6].reshape(3, 3, 4, 2, 3, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    assert block_mean(view, (1, 1, 1)).dtype == np.float32


def test_the_code_table_keeps_hu_within_its_steps() -> None:
    table = codes_hu()
    assert table.shape == (256,)
    assert table[0] == CODE_KNOTS_HU[0]
    assert table[-1] == CODE_KNOTS_HU[-1]
    assert np.all(np.diff(table) > 0)
    for low, high, step in STEP_LIMITS:
        hu = np.linspace(low, high, 2001, dtype=np.float32)
        decoded = table[encode_hu(hu)]
        assert np.max(np.abs(decoded - hu)) <= step / 2 + 0.5, (low, high)
    # Beyond the table: clipped, never wrapped around.
    assert encode_hu(np.array([-3000.0, 9000.0], dtype=np.float32)).tolist() == [0, 255]


def test_crop_keeps_the_body_and_drops_the_air_around_it() -> None:
    hu = np.full((20, 200, 200), -1000.0, dtype=np.float32)
    hu[:, 60:140, 50:150] = 40.0  # the body
    stack = viewer_stack(axial_volume(hu))
    rows, columns = stack.codes.shape[1:]
    assert rows < 200
    assert columns < 200
    body = codes_hu()[stack.codes] > -500
    assert body.sum() == 80 * 100 * 20  # every body voxel kept
    # Blocks would be coarser than MIN_SPACING_MM: 1 and 2 mm voxels are kept as they are.
    assert stack.spacing_mm == (2.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def chest_volume(fixtures_dir: Path) -> Volume:
    files = sorted((fixtures_dir / "chest_ct_lung_dx_a0002").glob("*.dcm"))
    study = read_studies(files, IntakeSummary())[0]
    volume, _quality, _warnings = load_volume(study.series[0], load_settings(environ={}).quality)
    return volume


def large_study(volume: Volume, n_slices: int = 300) -> Volume:
    """The real chest resampled along the body axis to 300 slices (a 1 mm scan's size)."""
    position = np.linspace(0, volume.hu.shape[0] - 1, n_slices)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, volume.hu.shape[0] - 1)
    weight = (position - below)[:, None, None].astype(np.float32)
    hu = volume.hu[below] * (1 - weight) + volume.hu[above] * weight
    spacing = volume.spacing_mm[0] * (volume.hu.shape[0] - 1) / (n_slices - 1)
    return replace(
        volume,
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        spacing_mm=(spacing, *volume.spacing_mm[1:]),
    )


def test_a_large_study_gives_a_few_megabytes_in_well_under_a_second(
    chest_volume: Volume, tmp_path: Path
) -> None:
    volume = large_study(chest_volume)
    assert volume.shape == (300, 512, 512)
    started = time.perf_counter()
    stack = viewer_stack(volume)
    built = time.perf_counter() - started
    paths = write_viewer(stack, tmp_path, "study1")
    total = time.perf_counter() - started
    size = sum(path.stat().st_size for path in paths)
    print(
        f"viewer data of 300x512x512: {stack.codes.shape}, {size} bytes, "
        f"{built:.3f} s to build, {total:.3f} s with writing"
    )
    assert size <= LARGE_STUDY_MAX_BYTES
    assert total <= LARGE_STUDY_MAX_SECONDS
    assert stack.codes.shape[0] <= MAX_SLICES
    assert max(stack.codes.shape[1:]) <= MAX_IN_PLANE

    metadata, codes = read_viewer_codes(paths[0])
    np.testing.assert_array_equal(codes, stack.codes)
    assert metadata["shape"] == list(stack.codes.shape)
    assert len(metadata["codes_hu"]) == 256
    # The middle slab holds lungs and soft tissue: the data is HU, not one window's greys.
    middle = np.asarray(metadata["codes_hu"])[codes[codes.shape[0] // 2]]
    assert np.mean(middle < -700) > 0.05
    assert np.mean(np.abs(middle - 40) < 100) > 0.05
