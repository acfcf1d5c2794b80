"""DICOM headers grouped into studies and series (headers only; pixel data is read later).

These are DICOM domain objects, kept apart from any model code: a Series knows its tags
and files, nothing about tensors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
from loguru import logger
from pydicom.dataset import Dataset

from services.core.schemas import IntakeSummary

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and the multi-frame SC classes
MAX_UNREADABLE_LISTED = 5
UNCOMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
}
# Every top-level tag the pipeline reads from a header. read_studies parses only these:
# a scanner's header holds hundreds of elements (private vendor blocks, dose and
# reference sequences) whose parsing cost more than the rest of the header stage.
# Sequence items are read in full. A tag read anywhere through ``tag_value`` or
# ``Instance.header`` must be listed here (tests/test_header_tags.py checks it).
HEADER_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",  # needed to decode every text value
    "ImageType",
    "SOPClassUID",
    "StudyDate",
    "SeriesDate",
    "StudyTime",
    "SeriesTime",
    "AccessionNumber",
    "Modality",
    "Manufacturer",
    "StationName",
    "StudyDescription",
    "ProcedureCodeSequence",
    "SeriesDescription",
    "BodyPartExamined",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ProtocolName",
    "GantryDetectorTilt",
    "ConvolutionKernel",
    "PatientPosition",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "FrameOfReferenceUID",
    "SamplesPerPixel",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "PixelSpacing",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)


@dataclass
class Instance:
    """One DICOM file: its path and its header (the HEADER_KEYWORDS tags, no pixel data).

    The parsed values are cached: sorting, selection and geometry ask for them many times
    per file, and pydicom converts a value again on every access. The header is not
    changed after reading, so the cache cannot go stale.
    """

    path: Path
    header: Dataset

    @cached_property
    def instance_number(self) -> int | None:
        return _int_or_none(tag_value(self.header, "InstanceNumber"))

    @cached_property
    def position(self) -> np.ndarray | None:
        return _vector(tag_value(self.header, "ImagePositionPatient"), 3)

    @cached_property
    def orientation(self) -> np.ndarray | None:
        return _vector(tag_value(self.header, "ImageOrientationPatient"), 6)

    @cached_property
    def n_frames(self) -> int:
        return _int_or_none(tag_value(self.header, "NumberOfFrames")) or 1


@dataclass
class Series:
    """One series of a study, described by the tags that decide whether it can be used."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    instances: list[Instance]
    image_type: tuple[str, ...]
    sop_class_uid: str
    body_part_examined: str
    convolution_kernel: str
    slice_thickness: float | None
    protocol_name: str = ""
    patient_position: str = ""
    manufacturer: str = ""
    series_uid_missing: bool = False  # the files had no SeriesInstanceUID: a key was derived

    @property
    def n_images(self) -> int:
        return len(self.instances)

    @property
    def first_header(self) -> Dataset:
        return self.instances[0].header

    def orientation(self) -> np.ndarray | None:
        """The most common ImageOrientationPatient of the series (None if no instance has one)."""
        values = [inst.orientation for inst in self.instances if inst.orientation is not None]
        if not values:
            return None
        rounded = [tuple(np.round(v, 4)) for v in values]
        most_common = max(set(rounded), key=rounded.count)
        return np.asarray(most_common, dtype=np.float64)

    def header_slice_spacing(self) -> float | None:
        """Median distance between neighbouring positions along the slice normal, from headers."""
        orientation = self.orientation()
        if orientation is None:
            return None
        normal = np.cross(orientation[:3], orientation[3:])
        positions = sorted(
            float(np.dot(inst.position, normal))
            for inst in self.instances
            if inst.position is not None
        )
        gaps = np.diff(positions)
        gaps = gaps[gaps > 1e-3]
        return float(np.median(gaps)) if gaps.size else None

    def effective_thickness(self) -> float | None:
        """SliceThickness, or the spacing of the positions when the tag is absent."""
        return self.slice_thickness if self.slice_thickness else self.header_slice_spacing()


@dataclass
class Study:
    study_uid: str
    series: list[Series]
    study_description: str = ""
    study_uid_missing: bool = False  # the files had no StudyInstanceUID: a key was derived

    @property
    def n_images(self) -> int:
        return sum(series.n_images for series in self.series)


def read_studies(files: Iterable[Path], summary: IntakeSummary) -> list[Study]:
    """Read every file's header and group them into studies and series.

    Files that cannot be parsed, or that parse but are not images (no Rows/Columns, e.g.
    structured reports), are counted in ``summary`` and left out. Files without
    StudyInstanceUID or SeriesInstanceUID (over-zealous anonymisers blank them) still group:
    a deterministic key is derived from the tags that do identify them.
    """
    instances: list[Instance] = []
    unreadable: list[str] = []
    for path in files:
        header = _read_header(path)
        if header is None or not (sop_class_uid(header) or _text(tag_value(header, "Modality"))):
            # Nothing parsed, or so little that it cannot be an image (a cut-off file).
            summary.unreadable_dicom += 1
            unreadable.append(Path(path).name)
            continue
        if "Rows" not in header or "Columns" not in header:
            if _is_image_sop_class(sop_class_uid(header)):
                # An image object without its image attributes: the file is cut off or broken.
                summary.unreadable_dicom += 1
                unreadable.append(Path(path).name)
                continue
            summary.skipped_non_dicom += 1
            _note(summary, f"non-image DICOM object ignored: {_sop_class_name(header)}")
            continue
        instances.append(Instance(path=Path(path), header=header))
    if unreadable:
        listed = ", ".join(unreadable[:MAX_UNREADABLE_LISTED])
        more = len(unreadable) - MAX_UNREADABLE_LISTED
        _note(
            summary,
            f"{len(unreadable)} unreadable DICOM files ({listed}{f', +{more} more' if more > 0 else ''})",
        )
    studies = _group(instances)
    for study in studies:
        if study.study_uid_missing:
            _note(summary, f"files without StudyInstanceUID grouped as study {study.study_uid}")
        for series in study.series:
            if series.series_uid_missing:
                _note(
                    summary,
                    f"files without SeriesInstanceUID grouped as series {series.series_uid}",
                )
    logger.info(
        "read {} image headers into {} studies and {} series",
        len(instances),
        len(studies),
        sum(len(study.series) for study in studies),
    )
    return studies


def _read_header(path: Path) -> Dataset | None:
    """The header of one file, or None when it cannot be parsed or its pixel data is cut off.

    The debug lines do not name the file: names inside an input may hold patient names, and
    the report lists the unreadable files anyway.
    """
    try:
        with open(path, "rb") as handle:
            header = pydicom.dcmread(
                handle, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS
            )
            pixel_data_at = handle.tell()
            file_size = os.fstat(handle.fileno()).st_size
    except Exception as error:  # noqa: BLE001 - a broken file is counted, never fatal
        logger.debug("unreadable DICOM file: {}", type(error).__name__)
        return None
    if not isinstance(header, Dataset) or len(header) == 0:
        return None
    if _image_size_unreadable(header):
        # pydicom parses values lazily: a damaged Rows/Columns (unknown VR, odd length) only
        # raises when read, and would otherwise stop the whole input far from this file.
        logger.debug("DICOM file with damaged Rows/Columns")
        return None
    if _pixel_data_cut_off(header, file_size - pixel_data_at):
        logger.debug("DICOM file cut off before the end of its pixel data")
        return None
    return header


_HEADER_TAGS = [pydicom.datadict.tag_for_keyword(keyword) for keyword in HEADER_KEYWORDS]


def _image_size_unreadable(header: Dataset) -> bool:
    """True when Rows or Columns is present but its value cannot be read as a number."""
    return any(
        keyword in header and _int_or_none(tag_value(header, keyword)) is None
        for keyword in ("Rows", "Columns")
    )


def _pixel_data_cut_off(header: Dataset, bytes_left: int) -> bool:
    """True when an uncompressed image file ends before its pixel data could be complete.

    pydicom stops silently at the end of a cut-off file, so the header of a truncated file
    looks fine; the sizes tell. Compressed pixel data has no fixed size and is checked when
    it is decoded.
    """
    if "Rows" not in header or "Columns" not in header:
        return False
    meta = getattr(header, "file_meta", None)
    syntax = str(tag_value(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if syntax and syntax not in UNCOMPRESSED_SYNTAXES:
        return False
    try:
        expected = (
            int(tag_value(header, "Rows"))
            * int(tag_value(header, "Columns"))
            * int(tag_value(header, "SamplesPerPixel", 1) or 1)
            * int(tag_value(header, "BitsAllocated", 16) or 16)
            // 8
            * (_int_or_none(tag_value(header, "NumberOfFrames")) or 1)
        )
    except (TypeError, ValueError):
        return False
    return bytes_left < expected + 8  # +8: the pixel data element's own tag and length


def _group(instances: list[Instance]) -> list[Study]:
    by_study: dict[str, dict[str, list[Instance]]] = {}
    study_missing: dict[str, bool] = {}
    series_missing: dict[tuple[str, str], bool] = {}
    for instance in instances:
        study_uid, study_derived = _study_key(instance.header)
        series_uid, series_derived = _series_key(instance.header, study_uid)
        by_study.setdefault(study_uid, {}).setdefault(series_uid, []).append(instance)
        study_missing[study_uid] = study_derived
        series_missing[(study_uid, series_uid)] = series_derived
    studies = []
    for study_uid, series_map in by_study.items():
        series_list = [
            _make_series(uid, study_uid, members, series_missing[(study_uid, uid)])
            for uid, members in series_map.items()
        ]
        series_list.sort(
            key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid)
        )
        first = series_list[0].first_header
        studies.append(
            Study(
                study_uid=study_uid,
                series=series_list,
                study_description=_text(tag_value(first, "StudyDescription")),
                study_uid_missing=study_missing[study_uid],
            )
        )
    studies.sort(key=lambda study: study.study_uid)
    return studies


def _make_series(uid: str, study_uid: str, members: list[Instance], derived: bool) -> Series:
    members.sort(
        key=lambda inst: (inst.instance_number is None, inst.instance_number or 0, str(inst.path))
    )
    header = members[0].header
    return Series(
        series_uid=uid,
        study_uid=study_uid,
        modality=_text(tag_value(header, "Modality")).upper(),
        description=_text(tag_value(header, "SeriesDescription")),
        series_number=_int_or_none(tag_value(header, "SeriesNumber")),
        instances=members,
        image_type=tuple(_multi_text(tag_value(header, "ImageType"))),
        sop_class_uid=sop_class_uid(header),
        body_part_examined=_text(tag_value(header, "BodyPartExamined")).upper(),
        convolution_kernel="\\".join(
            _multi_text(tag_value(header, "ConvolutionKernel"), upper=False)
        ),
        slice_thickness=_float_or_none(tag_value(header, "SliceThickness")),
        protocol_name=_text(tag_value(header, "ProtocolName")),
        patient_position=_text(tag_value(header, "PatientPosition")).upper(),
        manufacturer=_text(tag_value(header, "Manufacturer")),
        series_uid_missing=derived,
    )


def tag_value(dataset: Dataset, keyword: str, default: object = None) -> object:
    """``dataset.get(keyword)``, or ``default`` when the stored value cannot be parsed.

    pydicom converts values lazily, so a malformed number (a DS of "abc") raises only when it
    is read; a broken tag must make its file or series fail with a reason, never crash.
    """
    try:
        return dataset.get(keyword, default)
    except Exception:  # noqa: BLE001 - any conversion failure means "no usable value"
        return default


def sop_class_uid(header: Dataset) -> str:
    """SOPClassUID, falling back to the file meta's MediaStorageSOPClassUID."""
    value = _text(tag_value(header, "SOPClassUID"))
    if not value:
        meta = getattr(header, "file_meta", None)
        value = _text(tag_value(meta, "MediaStorageSOPClassUID")) if meta is not None else ""
    return value


def _study_key(header: Dataset) -> tuple[str, bool]:
    uid = _text(tag_value(header, "StudyInstanceUID"))
    if uid:
        return uid, False
    # Same study date/time, station and accession: the same study. The key is a UID-shaped
    # string (2.25.<decimal>) so that it can stand wherever a UID is expected.
    parts = [
        _text(tag_value(header, k))
        for k in ("StudyDate", "StudyTime", "StationName", "AccessionNumber", "StudyID")
    ]
    return _derived_uid("study", parts), True


def _series_key(header: Dataset, study_uid: str) -> tuple[str, bool]:
    uid = _text(tag_value(header, "SeriesInstanceUID"))
    if uid:
        return uid, False
    parts = [study_uid] + [
        _text(tag_value(header, k))
        for k in (
            "Modality",
            "SeriesNumber",
            "SeriesDescription",
            "SeriesDate",
            "SeriesTime",
            "FrameOfReferenceUID",
        )
    ]
    parts.append("\\".join(_multi_text(tag_value(header, "ConvolutionKernel"))))
    parts.append("\\".join(_multi_text(tag_value(header, "ImageType"))))
    return _derived_uid("series", parts), True


def _derived_uid(kind: str, parts: list[str]) -> str:
    digest = hashlib.sha256("|".join([kind, *parts]).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _note(summary: IntakeSummary, problem: str) -> None:
    if problem not in summary.problems and len(summary.problems) < 50:
        summary.problems.append(problem)


def _is_image_sop_class(uid: str) -> bool:
    return bool(uid) and "Image Storage" in str(pydicom.uid.UID(uid).name)


def _sop_class_name(header: Dataset) -> str:
    uid = sop_class_uid(header)
    if not uid:
        return "unknown SOP class"
    return str(pydicom.uid.UID(uid).name)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, pydicom.dataelem.DataElement):
        value = value.value
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _multi_text(value: object, upper: bool = True) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        parts = [str(v).strip() for v in value]
    else:
        parts = [part.strip() for part in str(value).split("\\")]
    return [part.upper() if upper else part for part in parts if part]


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _float_or_none(value: object) -> float | None:
    try:
        return float(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _vector(value: object, length: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        vector = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        return None
    return vector
