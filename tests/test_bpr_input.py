"""Body-part regression input (DESIGN.md section 9): the reference fixture, the blur and resize
semantics, orientation invariance, crop / pad, and the choice of slices to score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# scipy is not a runtime dependency (a dev one): the test compares against its gaussian_filter.
from scipy import ndimage
from volume_support import load_fixture_volume

from services.core.body_part.bpr_input import (
    OUTPUT_SIZE,
    bpr_input,
    bpr_layout,
    gaussian_blur_matrix,
    linear_resize_matrix,
    select_slices,
    slice_positions_mm,
)
from services.core.volume import Volume

CHEST = "chest_ct_lung_dx_a0002"
REFERENCE_TOLERANCE = 1e-3
EXACT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def chest(fixtures_dir, tmp_path_factory) -> Volume:
    return load_fixture_volume(fixtures_dir / CHEST, tmp_path_factory.mktemp("work"))


def _volume(hu: np.ndarray, spacing: tuple[float, float, float], directions=None) -> Volume:
    """An axial volume: rows run posterior, columns left, slices superior (unless given)."""
    normal, column, row = np.eye(3)[[2, 1, 0]] if directions is None else directions
    return Volume(
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        row_cosine=row,
        column_cosine=column,
        slice_normal=normal,
        spacing_mm=spacing,
        origin_mm=np.zeros(3),
    )


def _slow_reference(x: np.ndarray, spacing_xy: tuple[float, float]) -> np.ndarray:
    """The contract on ``x[i, j, k]`` written plainly: scipy blur, torch bilinear, crop/pad."""
    clipped = (np.clip(x.astype(np.float64), -1000, 1500) + 1000) * (2 / 2500) - 1
    sizes = [int(n * s / 3.5 + 0.5) for n, s in zip(x.shape[:2], spacing_xy, strict=True)]
    sigma = [0.8 * 0.25 / (new / old) for new, old in zip(sizes, x.shape[:2], strict=True)]
    blurred = ndimage.gaussian_filter(clipped, sigma=(*sigma, 0), truncate=3, mode="reflect")
    planes = torch.from_numpy(np.moveaxis(blurred, 2, 0)[:, None])
    resized = torch.nn.functional.interpolate(
        planes, size=tuple(sizes), mode="bilinear", align_corners=False
    ).numpy()
    out = np.full((x.shape[2], 1, OUTPUT_SIZE, OUTPUT_SIZE), -1.0)
    src, dst = [], []
    for n in sizes:
        if n > OUTPUT_SIZE:
            start = (n - OUTPUT_SIZE) // 2
            src.append(slice(start, start + OUTPUT_SIZE))
            dst.append(slice(0, OUTPUT_SIZE))
        else:
            before = (OUTPUT_SIZE - n) // 2
            src.append(slice(0, n))
            dst.append(slice(before, before + n))
    out[:, :, dst[0], dst[1]] = resized[:, :, src[0], src[1]]
    return out


# ----------------------------------------------------------------------------- the fixture


def test_chest_fixture_matches_the_reference_on_every_slice(chest, reference_dir):
    reference = np.load(reference_dir / "bpr_preprocess_chest_ct_lung_dx.npz")
    layout = bpr_layout(chest)
    assert layout.shape_xyz == tuple(reference["source_shape_xyz"])
    np.testing.assert_allclose(layout.spacing_xyz, reference["spacing_xyz"], rtol=1e-6)
    got = bpr_input(chest)
    expected = reference["bpr_input"]
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (30, 1, 128, 128)
    per_slice = np.abs(got - expected).max(axis=(1, 2, 3))
    assert per_slice.max() < REFERENCE_TOLERANCE, per_slice


def test_a_subset_equals_the_same_slices_of_the_full_input(chest):
    full = bpr_input(chest)
    indices = np.array([29, 0, 13])
    # Equal up to float32 rounding: BLAS picks its GEMM kernel by the matrices' size (on an
    # AVX-512 AMD EPYC 3 slices and 30 sum in another order, 1.8e-7 apart); a wrong slice
    # would differ by far more than this.
    np.testing.assert_allclose(bpr_input(chest, indices), full[indices], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the operators


@pytest.mark.parametrize(("n", "sigma"), [(512, 0.7), (37, 1.9), (5, 3.0), (3, 0.2)])
def test_blur_matrix_is_scipys_gaussian_filter(n, sigma):
    signal = np.random.default_rng(n).normal(size=n)
    expected = ndimage.gaussian_filter1d(signal, sigma, truncate=3, mode="reflect")
    np.testing.assert_allclose(gaussian_blur_matrix(n, sigma) @ signal, expected, atol=1e-12)


@pytest.mark.parametrize(("n_in", "n_out"), [(512, 95), (40, 40), (7, 3), (20, 57), (2, 5)])
def test_resize_matrix_is_bilinear_with_half_pixel_centres(n_in, n_out):
    signal = np.random.default_rng(n_in).normal(size=n_in)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(signal)[None, None], size=n_out, mode="linear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(linear_resize_matrix(n_in, n_out) @ signal, expected, atol=1e-12)


def test_shrinking_by_two_averages_neighbours():
    np.testing.assert_allclose(linear_resize_matrix(4, 2) @ [1.0, 3.0, 10.0, 20.0], [2.0, 15.0])


@pytest.mark.parametrize(
    ("shape_xyz", "spacing_xy"),
    [
        ((150, 90, 3), (2.9, 4.1)),  # both axes padded
        ((600, 700, 2), (0.9, 0.7)),  # both cropped (FOV over 448 mm)
        ((512, 100, 2), (0.98, 2.0)),  # i cropped, j padded
    ],
)
def test_random_volume_matches_the_plain_implementation(shape_xyz, spacing_xy):
    rng = np.random.default_rng(sum(shape_xyz))
    x = rng.uniform(-1500, 2500, size=shape_xyz)
    hu = np.transpose(x, (2, 1, 0))  # hu[k, row = j, column = i]
    volume = _volume(hu, (5.0, spacing_xy[1], spacing_xy[0]))
    got = bpr_input(volume)
    expected = _slow_reference(x, spacing_xy)
    assert np.abs(got - expected).max() < EXACT_TOLERANCE
    # Padding fills whole rows / columns with -1; a crop leaves none.
    for axis, (n, spacing) in enumerate(zip(shape_xyz[:2], spacing_xy, strict=True)):
        resized = int(n * spacing / 3.5 + 0.5)
        padded_lines = np.all(got[0, 0] == -1.0, axis=1 - axis).sum()
        assert padded_lines == max(OUTPUT_SIZE - resized, 0)


def test_too_small_an_image_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        bpr_input(_volume(np.zeros((2, 4, 4)), (1.0, 0.5, 0.5)))


# ----------------------------------------------------------------------------- orientation


def test_orientation_of_the_arrays_does_not_change_the_input(chest):
    expected = bpr_input(chest)
    normal, column, row = chest.slice_normal, chest.column_cosine, chest.row_cosine
    spacing = chest.spacing_mm
    variants = {
        # slices stored head to feet
        "reversed slices": Volume(
            hu=chest.hu[::-1].copy(), row_cosine=row, column_cosine=column,
            slice_normal=-normal, spacing_mm=spacing, origin_mm=chest.origin_mm,
        ),
        # rows and columns swapped and both mirrored
        "transposed, mirrored": Volume(
            hu=chest.hu.transpose(0, 2, 1)[:, ::-1, ::-1].copy(), row_cosine=-column,
            column_cosine=-row, slice_normal=normal,
            spacing_mm=(spacing[0], spacing[2], spacing[1]), origin_mm=chest.origin_mm,
        ),
        # the body axis stored as rows (a coronal-like layout)
        "body axis as rows": Volume(
            hu=chest.hu.transpose(1, 0, 2).copy(), row_cosine=row, column_cosine=normal,
            slice_normal=column, spacing_mm=(spacing[1], spacing[0], spacing[2]),
            origin_mm=chest.origin_mm,
        ),
    }  # fmt: skip
    for name, volume in variants.items():
        assert np.abs(bpr_input(volume) - expected).max() < EXACT_TOLERANCE, name


# ----------------------------------------------------------------------------- slice choice


def test_selection_keeps_both_ends_and_the_spacing():
    volume = _volume(np.zeros((300, 8, 8)), (0.8, 30.0, 30.0))  # 239.2 mm
    selection = select_slices(volume, spacing_mm=50.0, max_slices=None)
    indices = selection.indices
    assert indices[0] == 0
    assert indices[-1] == 299
    assert np.all(np.diff(indices) > 0)
    assert np.diff(selection.positions_mm).max() <= 50.0 + 0.8
    assert indices.size == 6  # ceil(239.2 / 50) + 1
    np.testing.assert_allclose(selection.positions_mm, indices * 0.8)
    np.testing.assert_allclose(slice_positions_mm(volume)[indices], selection.positions_mm)


def test_selection_is_capped_and_covers_short_series():
    long_volume = _volume(np.zeros((1000, 8, 8)), (1.5, 30.0, 30.0))
    capped = select_slices(long_volume, spacing_mm=20.0, max_slices=4)
    assert list(capped.indices) == [0, 333, 666, 999]
    short = _volume(np.zeros((3, 8, 8)), (2.0, 30.0, 30.0))
    assert list(select_slices(short, spacing_mm=1.0, max_slices=None).indices) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 2"):
        select_slices(short, max_slices=1)
