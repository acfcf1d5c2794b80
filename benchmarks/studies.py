"""Realistic large studies for the benchmarks, built from the real chest CT fixture.

    .venv/bin/python -m benchmarks.studies            # builds (or finds) every study, prints paths

The fixture ``chest_ct_lung_dx_a0002`` (TCIA Lung-PET-CT-Dx A0002: 30 axial slices 8 mm
apart, 512x512, 232 mm of chest) is resampled along the body axis to the thin-slice series
a modern scanner writes: 300 slices at 1 mm and 600 slices at 0.5 mm, both covering
300 mm. Inside the fixture's 232 mm the slices are linear interpolations of their two
neighbours; the 34 mm beyond each end mirror the anatomy at that end (real-looking content
instead of a constant slab).

Every slice keeps the header of its nearest original slice (Siemens tags, the original
ImageOrientationPatient, x/y of ImagePositionPatient, pixel spacing, 12-bit unsigned
storage with intercept -1024) with new UIDs, InstanceNumber, ImagePositionPatient z,
SliceLocation and SliceThickness, so the pipeline reads them exactly as a scanner's series.
Each study is one deflated zip (as customers send them) under ``benchmarks/.data/``, which
git ignores; a study is built once and reused while its name (which carries the builder
version) matches.
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

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / ".data"
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
    z_mm: np.ndarray  # ImagePositionPatient z, ascending
    stored: np.ndarray  # (slices, rows, columns) stored values (uint16)


def read_source(folder: Path = CHEST_FIXTURE) -> SourceSeries:
    datasets = [pydicom.dcmread(path) for path in sorted(Path(folder).glob("*.dcm"))]
    if len(datasets) < 2:
        raise FileNotFoundError(f"expected the chest CT fixture in {folder}")
    normal = np.cross(
        np.asarray(datasets[0].ImageOrientationPatient[:3], dtype=float),
        np.asarray(datasets[0].ImageOrientationPatient[3:], dtype=float),
    )
    if not np.allclose(np.abs(normal), (0, 0, 1)):
        raise ValueError("the builder expects axial slices (normal along z)")
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    z_mm = np.asarray([float(ds.ImagePositionPatient[2]) for ds in datasets])
    stored = np.stack([ds.pixel_array for ds in datasets])
    return SourceSeries(datasets=datasets, z_mm=z_mm, stored=stored)


def target_positions(source_z: np.ndarray, n_slices: int, spacing_mm: float) -> np.ndarray:
    """z of the new slices, centred on the source's coverage, from the top down (HFS order)."""
    centre = (float(source_z.min()) + float(source_z.max())) / 2.0
    offsets = ((n_slices - 1) / 2.0 - np.arange(n_slices)) * spacing_mm
    return centre + offsets


def mirrored_source_index(source_z: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
    """Fractional source index of each z; beyond either end the anatomy is mirrored."""
    low, high = float(source_z.min()), float(source_z.max())
    z = np.where(z_mm < low, 2 * low - z_mm, z_mm)
    z = np.where(z > high, 2 * high - z, z)
    return np.interp(z, source_z, np.arange(len(source_z), dtype=np.float64))


def resampled_slice(stored: np.ndarray, index: float) -> np.ndarray:
    lower = min(int(np.floor(index)), len(stored) - 1)
    upper = min(lower + 1, len(stored) - 1)
    weight = index - lower
    mixed = (1.0 - weight) * stored[lower].astype(np.float32) + weight * stored[upper]
    return np.rint(mixed).astype(stored.dtype)


def slice_dataset(
    template: Dataset,
    pixels: np.ndarray,
    *,
    z_mm: float,
    instance_number: int,
    spec: StudySpec,
    study_uid: str,
    series_uid: str,
) -> Dataset:
    dataset = copy.deepcopy(template)
    for keyword in DROPPED_REFERENCES:
        if keyword in dataset:
            delattr(dataset, keyword)
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(instance_number)])
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.InstanceNumber = instance_number
    x, y = (float(v) for v in template.ImagePositionPatient[:2])
    dataset.ImagePositionPatient = [_ds(x), _ds(y), _ds(z_mm)]
    dataset.SliceLocation = _ds(z_mm)
    dataset.SliceThickness = _ds(spec.spacing_mm)
    dataset.SeriesDescription = f"ThoraxRoutine {spec.spacing_mm:g} B40f (benchmark resample)"
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    return dataset


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
            template = source.datasets[int(round(index))]
            dataset = slice_dataset(
                template,
                resampled_slice(source.stored, float(index)),
                z_mm=float(z_mm),
                instance_number=number,
                spec=spec,
                study_uid=study_uid,
                series_uid=series_uid,
            )
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
