"""Writing an HU volume as a valid CT Image Storage series (sample studies, tests, benchmarks).

Any standard patient position (HFS, FFS, HFP, FFP) or an explicit orientation; the files
carry no patient data (PatientName "Anonymous", no PatientID).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from services.core.arrays import Float64Array, FloatArray, LpsVector

# Row and column directions (DICOM LPS) of axial images for each patient position, as
# scanners write them: supine images are viewed from the feet with anterior up.
PATIENT_POSITION_ORIENTATION: dict[str, tuple[float, ...]] = {
    "HFS": (1, 0, 0, 0, 1, 0),
    "FFS": (-1, 0, 0, 0, 1, 0),
    "HFP": (-1, 0, 0, 0, -1, 0),
    "FFP": (1, 0, 0, 0, -1, 0),
}
RESCALE_INTERCEPT = -1024.0
OUTSIDE_FOV_HU = -3024.0  # what scanners store outside the reconstruction circle
STUDY_DATE = "20240101"


def write_ct_series(
    hu: FloatArray,
    out_dir: Path,
    *,
    spacing: Sequence[float],
    patient_position: str = "HFS",
    orientation: Sequence[float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    body_part: str = "CHEST",
    study_description: str = "CT CHEST (synthetic phantom)",
    series_description: str = "Chest 2.0 B40f",
    protocol_name: str = "PHANTOM CHEST",
    kernel: str = "B40f",
    slice_thickness: float | None = None,
    series_number: int = 2,
    origin: Sequence[float] | None = None,
    seed_text: str = "phantom",
) -> list[Path]:
    """Write ``hu`` as a valid CT Image Storage series, one file per slice; return the paths.

    ``hu`` is in a fixed anatomical frame: ``hu[k, i, j]`` with k toward patient superior,
    i toward posterior and j toward patient left (the frame that load_volume returns for a
    head-first supine axial series). ``spacing`` is (k, i, j) in mm. The stored images are
    this anatomy as the scanner would store it for ``patient_position`` (or for an explicit
    ``orientation``, which must use the patient axes), so every position describes the
    same body in patient coordinates. ``origin`` is the LPS position of ``hu[0, 0, 0]``
    (default: centred left-right and front-back).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D (slices, rows, columns), got shape {hu.shape}")
    position = patient_position.upper()
    if orientation is None:
        if position not in PATIENT_POSITION_ORIENTATION:
            raise ValueError(f"unknown patient position {patient_position!r}")
        orientation = PATIENT_POSITION_ORIENTATION[position]
    stored_axes, flips, normal = _stored_layout(orientation)
    spacing_c = np.asarray(spacing, dtype=np.float64)  # canonical (z, y, x) spacing
    shape_c = np.asarray(hu.shape)
    if origin is None:
        origin_lps = np.array(
            [-(shape_c[2] - 1) / 2 * spacing_c[2], -(shape_c[1] - 1) / 2 * spacing_c[1], -400.0]
        )
    else:
        origin_lps = np.asarray(origin, dtype=np.float64)

    def lps_of_canonical(index_c: Float64Array) -> LpsVector:
        # index_c = (k, i, j) -> x from j, y from i, z from k
        return origin_lps + np.array(
            [index_c[2] * spacing_c[2], index_c[1] * spacing_c[1], index_c[0] * spacing_c[0]]
        )

    stored = np.transpose(hu, stored_axes)
    for axis, flip in enumerate(flips):
        if flip:
            stored = np.flip(stored, axis=axis)
    start_c = np.zeros(3)
    for axis_c, flip in zip(stored_axes, flips, strict=True):
        start_c[axis_c] = shape_c[axis_c] - 1 if flip else 0
    origin_stored = lps_of_canonical(start_c)
    slice_step = spacing_c[stored_axes[0]]
    pixel_spacing = (float(spacing_c[stored_axes[1]]), float(spacing_c[stored_axes[2]]))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(entropy_srcs=[seed_text, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[seed_text, "series", position])
    frame_uid = generate_uid(entropy_srcs=[seed_text, "frame", position])
    positions = [origin_stored + k * slice_step * normal for k in range(stored.shape[0])]
    # Scanners number images in acquisition order: head first starts at the top.
    head_first = position.startswith("HF")
    acquisition_order = sorted(
        range(len(positions)), key=lambda k: -positions[k][2] if head_first else positions[k][2]
    )
    instance_numbers = {k: n + 1 for n, k in enumerate(acquisition_order)}

    paths = []
    for k in range(stored.shape[0]):
        dataset = _ct_dataset(
            pixels=stored[k],
            instance_number=instance_numbers[k],
            position=positions[k],
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            sop_uid=generate_uid(entropy_srcs=[seed_text, series_uid, str(k)]),
            patient_position=position if position in PATIENT_POSITION_ORIENTATION else "HFS",
            body_part=body_part,
            study_description=study_description,
            series_description=series_description,
            protocol_name=protocol_name,
            kernel=kernel,
            slice_thickness=slice_thickness if slice_thickness is not None else float(slice_step),
            series_number=series_number,
        )
        path = out_dir / f"CT{instance_numbers[k]:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


def _stored_layout(orientation: Sequence[float]) -> tuple[list[int], list[bool], LpsVector]:
    """For an orientation along the patient axes: which canonical array axis becomes each
    stored axis (slice, row, column), whether it is flipped, and the slice normal."""
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    column_dir = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row_dir, column_dir)
    # Canonical array axis for each LPS axis: x (left) -> 2, y (posterior) -> 1, z (superior) -> 0.
    canonical_axis = {0: 2, 1: 1, 2: 0}
    stored_axes = []
    flips = []
    for direction in (normal, column_dir, row_dir):
        lps_axis = int(np.argmax(np.abs(direction)))
        if (
            not np.isclose(abs(direction[lps_axis]), 1.0)
            or np.count_nonzero(np.round(direction, 6)) != 1
        ):
            raise ValueError("orientation must be along the patient axes (e.g. 1,0,0,0,1,0)")
        stored_axes.append(canonical_axis[lps_axis])
        flips.append(bool(direction[lps_axis] < 0))
    if sorted(stored_axes) != [0, 1, 2]:
        raise ValueError("row and column directions must be perpendicular")
    return stored_axes, flips, normal


def _ct_dataset(
    *,
    pixels: FloatArray,
    instance_number: int,
    position: LpsVector,
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    patient_position: str,
    body_part: str,
    study_description: str,
    series_description: str,
    protocol_name: str,
    kernel: str,
    slice_thickness: float,
    series_number: int,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = "090000"
    ds.SeriesTime = ds.ContentTime = "090500"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic phantom (chest-ct-screening)"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = "Anonymous"
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom, no patient data"
    ds.BodyPartExamined = body_part
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.KVP = "120"
    ds.ProtocolName = protocol_name
    ds.GantryDetectorTilt = "0"
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = patient_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = str(series_number)
    ds.InstanceNumber = str(instance_number)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(position[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.BurnedInAnnotation = "NO"
    stored = np.clip(
        np.rint(np.asarray(pixels, dtype=np.float64) - RESCALE_INTERCEPT), -32768, 32767
    )
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) for a coordinate in mm."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


# --- phantoms ---------------------------------------------------------------------------
