"""Realistic large studies for the benchmarks, built from the real chest CT fixture.

    .venv/bin/python -m benchmarks.studies            # builds (or finds) every study

The fixture (30 axial slices 8 mm apart) resampled along the body axis, beyond each end the
anatomy mirrored; every slice keeps its nearest original header with new UIDs and
positions. One deflated zip per study under ``benchmarks/.data/`` (git-ignored), reused
while its name (with the builder version) matches; README: "Studies".
"""

from __future__ import annotations

import copy
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from benchmarks import PROJECT_ROOT
from services.core.arrays import Float64Array, IntegerArray

DATA_DIR = PROJECT_ROOT / "benchmarks" / ".data"
CHEST_FIXTURE = PROJECT_ROOT.parent / "shared" / "fixtures" / "dicom" / "chest_ct_lung_dx_a0002"
BUILDER_VERSION = 1  # bump when the output changes, so cached studies are rebuilt
# Tags that point at the original images; a resampled slice is not derived from one image.
DROPPED_REFERENCES = ("ReferencedImageSequence", "SourceImageSequence")


@dataclass(frozen=True)
class StudySpec:
    name: str
    n_slices: int
    spacing_mm: float

    @property
    def file_name(self) -> str:
        return f"{self.name}.v{BUILDER_VERSION}.zip"


STUDY_300 = StudySpec("chest_300x1mm", 300, 1.0)
STUDY_600 = StudySpec("chest_600x0.5mm", 600, 0.5)
STUDIES = (STUDY_300, STUDY_600)


@dataclass(frozen=True)
class SourceSeries:
    """The fixture's slices sorted from inferior to superior."""

    datasets: list[Dataset]
    z_mm: Float64Array  # ImagePositionPatient z, ascending
    stored: IntegerArray  # (slices, rows, columns) stored values (uint16)


def read_source(folder: Path = CHEST_FIXTURE) -> SourceSeries:
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))]
    if len(datasets) < 2:
        raise FileNotFoundError(f"expected the chest CT fixture in {folder}")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    if not np.allclose(np.abs(np.cross(orientation[:3], orientation[3:])), (0, 0, 1)):
        raise ValueError("the builder expects axial slices (normal along z)")
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    z_mm = np.asarray([float(ds.ImagePositionPatient[2]) for ds in datasets])
    return SourceSeries(datasets, z_mm, np.stack([ds.pixel_array for ds in datasets]))


def target_positions(source_z: Float64Array, n_slices: int, spacing_mm: float) -> Float64Array:
    """z of the new slices, centred on the source's coverage, from the top down (HFS order)."""
    centre = (float(source_z.min()) + float(source_z.max())) / 2.0
    return centre + ((n_slices - 1) / 2.0 - np.arange(n_slices)) * spacing_mm


def mirrored_source_index(source_z: Float64Array, z_mm: Float64Array) -> Float64Array:
    """Fractional source index of each z; beyond either end the anatomy is mirrored."""
    low, high = float(source_z.min()), float(source_z.max())
    z = np.where(z_mm < low, 2 * low - z_mm, z_mm)
    z = np.where(z > high, 2 * high - z, z)
    return np.interp(z, source_z, np.arange(len(source_z), dtype=np.float64))


def resampled_slice(stored: IntegerArray, index: float) -> IntegerArray:
    lower = min(int(np.floor(index)), len(stored) - 1)
    upper = min(lower + 1, len(stored) - 1)
    weight = index - lower
    mixed = (1.0 - weight) * stored[lower].astype(np.float32) + weight * stored[upper]
    return np.rint(mixed).astype(stored.dtype)


def _ds(value: float) -> str:
    """A DS string within the 16-character limit."""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def build_study(spec: StudySpec, source: SourceSeries, output: Path) -> Path:
    """Write ``spec`` as a deflated zip of one DICOM file per slice (atomically)."""
    study_uid = generate_uid(entropy_srcs=["benchmark", spec.name, "study"])
    series_uid = generate_uid(entropy_srcs=["benchmark", spec.name, "series"])
    z_new = target_positions(source.z_mm, spec.n_slices, spec.spacing_mm)
    indices = mirrored_source_index(source.z_mm, z_new)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for number, (z_mm, index) in enumerate(zip(z_new, indices, strict=True), start=1):
            template = source.datasets[round(index)]
            dataset = copy.deepcopy(template)
            for keyword in DROPPED_REFERENCES:
                if keyword in dataset:
                    delattr(dataset, keyword)
            sop_uid = generate_uid(entropy_srcs=[series_uid, str(number)])
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
            dataset.InstanceNumber = number
            x, y = (float(v) for v in template.ImagePositionPatient[:2])
            dataset.ImagePositionPatient = [_ds(x), _ds(y), _ds(float(z_mm))]
            dataset.SliceLocation = _ds(float(z_mm))
            dataset.SliceThickness = _ds(spec.spacing_mm)
            dataset.SeriesDescription = (
                f"ThoraxRoutine {spec.spacing_mm:g} B40f (benchmark resample)"
            )
            pixels = resampled_slice(source.stored, float(index))
            dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            archive.writestr(f"{spec.name}/1-{number:03d}.dcm", buffer.getvalue())
    os.replace(partial, output)
    return output


def ensure_studies(
    specs: tuple[StudySpec, ...] = STUDIES, data_dir: Path = DATA_DIR
) -> dict[str, Path]:
    """The zip of every spec, built on first use."""
    paths = {spec.name: data_dir / spec.file_name for spec in specs}
    missing = [spec for spec in specs if not paths[spec.name].is_file()]
    if missing:
        source = read_source()
        for spec in missing:
            print(f"building {spec.file_name} ({spec.n_slices} slices x {spec.spacing_mm} mm)")
            build_study(spec, source, paths[spec.name])
    return paths


def main() -> None:
    for name, path in ensure_studies().items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
