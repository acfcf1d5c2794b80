"""Reading DICOM headers (only the tags the pipeline uses) and grouping them into studies.

``read_studies`` is the step between intake (a list of candidate files) and series
selection: every file's header is parsed once, broken and non-image files are counted,
and the images are grouped by StudyInstanceUID and SeriesInstanceUID (derived
deterministically when an anonymiser blanked them).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import pydicom
from loguru import logger
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from services.core.dicom.objects import Instance, Series, Study
from services.core.dicom.values import (
    float_or_none,
    int_or_none,
    sop_class_uid,
    tag_value,
    text,
    text_values,
    transfer_syntax_uid,
    uid_name,
)
from services.core.schemas import IntakeSummary

MAX_UNREADABLE_LISTED = 5
UNCOMPRESSED_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
)
# Every top-level tag the pipeline reads from a header. read_studies parses only these:
# a scanner's header holds hundreds of elements (private vendor blocks, dose and
# reference sequences) whose parsing cost more than the rest of the header stage.
# Sequence items are read in full. A tag read anywhere through ``tag_value`` or
# ``Instance.header`` must be listed here (tests/test_header_tags.py checks it).
HEADER_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",  # needed to decode every text value
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",  # what an SR references (services/sr/evidence.py)
    "StudyDate",
    "SeriesDate",
    "StudyTime",
    "SeriesTime",
    "AccessionNumber",
    "PatientName",  # the patient's identity: registry and signed-in views only, never logged
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientAge",
    "PatientSex",
    "ReferringPhysicianName",
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
        if header is None or not (sop_class_uid(header) or text(tag_value(header, "Modality"))):
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


# HEADER_KEYWORDS are all dictionary keywords (tests/test_header_tags.py checks it).
_HEADER_TAGS = [
    tag for keyword in HEADER_KEYWORDS if (tag := pydicom.datadict.tag_for_keyword(keyword))
]


def _image_size_unreadable(header: Dataset) -> bool:
    """True when Rows or Columns is present but its value cannot be read as a number."""
    return any(
        keyword in header and int_or_none(tag_value(header, keyword)) is None
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
    syntax = transfer_syntax_uid(header)
    if syntax and syntax not in UNCOMPRESSED_SYNTAXES:
        return False
    rows = int_or_none(tag_value(header, "Rows"))
    columns = int_or_none(tag_value(header, "Columns"))
    if rows is None or columns is None:
        return False
    expected = (
        rows
        * columns
        * (int_or_none(tag_value(header, "SamplesPerPixel")) or 1)
        * (int_or_none(tag_value(header, "BitsAllocated")) or 16)
        // 8
        * (int_or_none(tag_value(header, "NumberOfFrames")) or 1)
    )
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
                study_description=text(tag_value(first, "StudyDescription")),
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
        modality=text(tag_value(header, "Modality")).upper(),
        description=text(tag_value(header, "SeriesDescription")),
        series_number=int_or_none(tag_value(header, "SeriesNumber")),
        instances=members,
        image_type=tuple(text_values(tag_value(header, "ImageType"))),
        sop_class_uid=sop_class_uid(header),
        body_part_examined=text(tag_value(header, "BodyPartExamined")).upper(),
        convolution_kernel="\\".join(
            text_values(tag_value(header, "ConvolutionKernel"), upper=False)
        ),
        slice_thickness=float_or_none(tag_value(header, "SliceThickness")),
        protocol_name=text(tag_value(header, "ProtocolName")),
        patient_position=text(tag_value(header, "PatientPosition")).upper(),
        manufacturer=text(tag_value(header, "Manufacturer")),
        series_uid_missing=derived,
    )


def _study_key(header: Dataset) -> tuple[str, bool]:
    uid = text(tag_value(header, "StudyInstanceUID"))
    if uid:
        return uid, False
    # Same study date/time, station and accession: the same study. The key is a UID-shaped
    # string (2.25.<decimal>) so that it can stand wherever a UID is expected.
    parts = [
        text(tag_value(header, k))
        for k in ("StudyDate", "StudyTime", "StationName", "AccessionNumber", "StudyID")
    ]
    return _derived_uid("study", parts), True


def _series_key(header: Dataset, study_uid: str) -> tuple[str, bool]:
    uid = text(tag_value(header, "SeriesInstanceUID"))
    if uid:
        return uid, False
    parts = [study_uid] + [
        text(tag_value(header, k))
        for k in (
            "Modality",
            "SeriesNumber",
            "SeriesDescription",
            "SeriesDate",
            "SeriesTime",
            "FrameOfReferenceUID",
        )
    ]
    parts.append("\\".join(text_values(tag_value(header, "ConvolutionKernel"))))
    parts.append("\\".join(text_values(tag_value(header, "ImageType"))))
    return _derived_uid("series", parts), True


def _derived_uid(kind: str, parts: list[str]) -> str:
    digest = hashlib.sha256("|".join([kind, *parts]).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _note(summary: IntakeSummary, problem: str) -> None:
    if problem not in summary.problems and len(summary.problems) < 50:
        summary.problems.append(problem)


def _is_image_sop_class(uid: str) -> bool:
    return "Image Storage" in uid_name(uid)


def _sop_class_name(header: Dataset) -> str:
    return uid_name(sop_class_uid(header)) or "unknown SOP class"
