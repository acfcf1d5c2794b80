"""Preprocessing to the CT-CLIP contract: reference voxels, torch parity, orientation invariance."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from volume_support import load_fixture_volume

from services.core.preprocessing import (
    PreprocessingTarget,
    crop_pad_plan,
    linear_sample_weights,
    preprocess_array,
    preprocess_volume,
    resample_crop_pad,
    resize_trilinear,
    resized_shape,
    slp_reorientation,
    to_model_input,
)
from services.core.volume import Volume

CHEST = "chest_ct_lung_dx_a0002"
FULL_TARGET = PreprocessingTarget()


def _torch_resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(
        tensor, size=tuple(shape), mode="trilinear", align_corners=False
    )
    return resized[0, 0].numpy()


def _reference_crop_pad(array: np.ndarray, target: tuple[int, int, int]) -> np.ndarray:
    """The contract's crop/pad written the slow, obvious way."""
    for axis, t in enumerate(target):
        n = array.shape[axis]
        if n > t:
            start = max((n - t) // 2, 0)
            array = np.take(array, np.arange(start, start + t), axis=axis)
        elif n < t:
            before = (t - n) // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, t - n - before)
            array = np.pad(array, pad, constant_values=-1.0)
    return array


# --------------------------------------------------------------------------- pure numerics


@pytest.mark.parametrize(
    ("shape", "new_shape"),
    [
        ((13, 17, 11), (5, 30, 11)),  # shrink, grow, keep
        ((9, 8, 7), (26, 3, 4)),
        ((6, 6, 6), (1, 2, 40)),  # down to a single sample, strong upsampling
        ((1, 5, 3), (4, 5, 9)),  # from a single sample
        ((31, 29, 23), (29, 31, 23)),  # near-identity ratios
    ],
)
def test_resize_matches_torch_interpolate(shape, new_shape):
    rng = np.random.default_rng(sum(shape) * 7 + sum(new_shape))
    array = rng.normal(size=shape).astype(np.float32)
    ours = resize_trilinear(array, new_shape)
    assert ours.shape == tuple(new_shape)
    assert ours.dtype == np.float32
    # float32 arithmetic in a different order: differences of a few ulps, no more.
    np.testing.assert_allclose(ours, _torch_resize(array, new_shape), atol=1e-5, rtol=0)


def test_resize_of_strided_views_matches_torch():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(12, 20, 16)).astype(np.float32)
    view = np.flip(base.transpose(2, 0, 1), axis=(0, 2))
    np.testing.assert_allclose(
        resize_trilinear(view, (7, 25, 10)), _torch_resize(view, (7, 25, 10)), atol=1e-5
    )


def test_fused_resize_crop_pad_equals_resize_then_crop_pad():
    rng = np.random.default_rng(5)
    hu = rng.uniform(-2500, 2500, size=(40, 37, 23)).astype(np.float32)
    spacing = (2.5, 0.7, 1.9)
    target = PreprocessingTarget(shape=(30, 20, 33), spacing_mm=(1.5, 0.75, 0.75))
    new_shape = resized_shape(hu.shape, spacing, target.spacing_mm)
    assert new_shape == (66, 34, 58)  # every axis is resized, some cropped, some padded
    expected = _reference_crop_pad(
        _torch_resize(np.clip(hu, -1000, 1000), new_shape) / 1000.0, target.shape
    )
    got = preprocess_array(hu, spacing, target)
    assert got.shape == target.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert got.min() >= -1.0
    assert got.max() <= 1.0


def test_clipping_happens_before_interpolation():
    # Interpolating first would let the 3000 HU sample pull its neighbour above 1.
    hu = np.full((2, 2, 4), -1000.0, dtype=np.float32)
    hu[..., 1] = 3000.0
    plans = [crop_pad_plan(2, 2, 2), crop_pad_plan(2, 2, 2), crop_pad_plan(4, 7, 7)]
    out = resample_crop_pad(hu, plans, clip=(-1000.0, 1000.0), scale=1e-3)
    expected = _torch_resize(np.clip(hu, -1000, 1000), (2, 2, 7)) / 1000
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.max() <= 1.0


@pytest.mark.parametrize(
    ("n", "t", "keep_start", "out_start", "count"),
    [(10, 6, 2, 0, 6), (11, 6, 2, 0, 6), (6, 10, 0, 2, 6), (5, 10, 0, 2, 5), (7, 7, 0, 0, 7)],
)
def test_crop_pad_plan_follows_the_contract(n, t, keep_start, out_start, count):
    plan = crop_pad_plan(n_in=3, n_resized=n, n_out=t)
    assert (plan.keep_start, plan.out_start, plan.keep_count) == (keep_start, out_start, count)


def test_linear_weights_clamp_at_both_ends():
    lower, upper, weight = linear_sample_weights(4, 8)
    assert lower[0] == 0
    assert weight[0] == 0.0
    assert lower[-1] == 3
    assert upper[-1] == 3
    np.testing.assert_allclose(lower + weight, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25])


def test_resized_shape_truncates():
    assert resized_shape((30, 512, 512), (8.0, 0.646484375, 0.646484375), (1.5, 0.75, 0.75)) == (
        160,
        441,
        441,
    )


def test_volume_too_small_to_resample_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        preprocess_array(np.zeros((1, 4, 4), np.float32), (1.0, 1.0, 1.0), FULL_TARGET)


# --------------------------------------------------------------------------- orientation


def _volume(hu: np.ndarray, row: tuple, column: tuple, normal: tuple) -> Volume:
    return Volume(
        hu=hu,
        row_cosine=np.asarray(row, float),
        column_cosine=np.asarray(column, float),
        slice_normal=np.asarray(normal, float),
        spacing_mm=(2.0, 1.0, 1.0),
        origin_mm=np.zeros(3),
    )


def test_standard_axial_series_is_transposed_in_plane():
    plan = slp_reorientation(np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float))
    assert plan.permutation == (0, 2, 1)
    assert plan.flips == (False, False, False)


def test_oblique_directions_pick_the_nearest_axes():
    tilt = np.deg2rad(20)
    normal = [0, -np.sin(tilt), np.cos(tilt)]
    column = [0, np.cos(tilt), np.sin(tilt)]
    plan = slp_reorientation(np.array([normal, column, [-1, 0, 0]], float))
    assert plan.permutation == (0, 2, 1)
    assert plan.flips == (False, True, False)


def test_reorientation_is_a_view_and_undoes_flips():
    rng = np.random.default_rng(0)
    slp = rng.normal(size=(6, 7, 8)).astype(np.float32)  # [superior, left, posterior]
    # Prone, feet first: array axes run inferior, posterior->anterior rows, right columns.
    hu = np.ascontiguousarray(np.flip(slp.transpose(0, 2, 1), axis=(0, 1, 2)))
    volume = _volume(hu, row=(-1, 0, 0), column=(0, -1, 0), normal=(0, 0, -1))
    target = PreprocessingTarget(shape=(12, 7, 8), spacing_mm=(1.0, 1.0, 1.0))
    straight = _volume(slp.transpose(0, 2, 1).copy(), (1, 0, 0), (0, 1, 0), (0, 0, 1))
    np.testing.assert_array_equal(
        preprocess_volume(volume, target), preprocess_volume(straight, target)
    )


def test_model_input_is_batched_float32():
    batch = to_model_input(np.zeros((4, 5, 6), np.float32))
    assert batch.shape == (1, 1, 4, 5, 6)
    assert batch.dtype == np.float32
    assert to_model_input([np.zeros((2, 2, 2))] * 3).shape == (3, 1, 2, 2, 2)


# --------------------------------------------------------------------------- real DICOM


@pytest.fixture(scope="module")
def chest_model_input(fixtures_dir, tmp_path_factory) -> np.ndarray:
    volume = load_fixture_volume(fixtures_dir / CHEST, tmp_path_factory.mktemp("work"))
    return preprocess_volume(volume, FULL_TARGET)


def test_chest_fixture_matches_the_reference(chest_model_input, reference_dir):
    reference = np.load(reference_dir / "preprocess_chest_ct_lung_dx.npz")
    got = chest_model_input
    assert (1, *got.shape) == tuple(reference["shape"])  # [channel, D, H, W]
    assert got.dtype == np.float32
    d, h, w = reference["index_dhw"].T
    np.testing.assert_allclose(got[d, h, w], reference["value"], atol=1e-4, rtol=0)
    assert abs(float(got.mean(dtype=np.float64)) - float(reference["mean"])) < 1e-4
    assert abs(float(got.std(dtype=np.float64)) - float(reference["std"])) < 1e-4
    np.testing.assert_allclose(got.mean(axis=(1, 2)), reference["mean_over_hw_per_d"], atol=1e-4)
    np.testing.assert_allclose(got.mean(axis=(0, 2)), reference["mean_over_dw_per_h"], atol=1e-4)
    np.testing.assert_allclose(got.mean(axis=(0, 1)), reference["mean_over_dh_per_w"], atol=1e-4)


def _write_variant(
    source: Path,
    destination: Path,
    *,
    flip_columns: bool = False,
    flip_rows: bool = False,
    transpose: bool = False,
    reverse_order: bool = False,
    shuffle_numbers: bool = False,
    patient_position: str | None = None,
) -> Path:
    """Rewrite the fixture as real DICOM files showing the same anatomy another way.

    Every operation moves pixels and changes ImagePositionPatient / ImageOrientationPatient
    together, so each voxel keeps its place in the patient.
    """
    destination.mkdir(parents=True)
    datasets = [pydicom.dcmread(path) for path in sorted(source.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    if reverse_order:
        datasets.reverse()
    numbers = list(range(1, len(datasets) + 1))
    if shuffle_numbers:
        random.Random(11).shuffle(numbers)
    for dataset, number in zip(datasets, numbers, strict=True):
        pixels = dataset.pixel_array
        position = np.array(dataset.ImagePositionPatient, float)
        row_cosine = np.array(dataset.ImageOrientationPatient[:3], float)
        column_cosine = np.array(dataset.ImageOrientationPatient[3:], float)
        row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
        if flip_columns:
            position = position + (pixels.shape[1] - 1) * column_spacing * row_cosine
            row_cosine = -row_cosine
            pixels = pixels[:, ::-1]
        if flip_rows:
            position = position + (pixels.shape[0] - 1) * row_spacing * column_cosine
            column_cosine = -column_cosine
            pixels = pixels[::-1, :]
        if transpose:
            row_cosine, column_cosine = column_cosine, row_cosine
            row_spacing, column_spacing = column_spacing, row_spacing
            pixels = pixels.T
        pixels = np.ascontiguousarray(pixels)
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.PixelSpacing = [row_spacing, column_spacing]
        dataset.PixelData = pixels.tobytes()
        dataset.ImagePositionPatient = [float(v) for v in position]
        dataset.ImageOrientationPatient = [float(v) for v in (*row_cosine, *column_cosine)]
        dataset.InstanceNumber = number
        if patient_position:
            dataset.PatientPosition = patient_position
        dataset.save_as(destination / f"IM{number:04d}.dcm", enforce_file_format=True)
    return destination


VARIANTS = {
    "feet_first": dict(flip_columns=True, reverse_order=True, patient_position="FFS"),
    "prone": dict(flip_columns=True, flip_rows=True, patient_position="HFP"),
    "shuffled_instance_numbers": dict(shuffle_numbers=True),
    "columns_run_posterior": dict(transpose=True, reverse_order=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_anatomy_in_any_orientation_gives_the_same_tensor(
    variant, chest_model_input, fixtures_dir, tmp_path
):
    folder = _write_variant(fixtures_dir / CHEST, tmp_path / variant, **VARIANTS[variant])
    volume = load_fixture_volume(folder, tmp_path / "work")
    if variant != "shuffled_instance_numbers":  # the variant really is stored differently
        assert not np.allclose(volume.axis_directions()[1:], [[0, 1, 0], [1, 0, 0]])
    got = preprocess_volume(volume, FULL_TARGET)
    np.testing.assert_allclose(got, chest_model_input, atol=1e-5, rtol=0)
