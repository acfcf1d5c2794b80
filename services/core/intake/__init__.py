"""Intake of one input (zip, tar, folder, file) into DICOM and NIfTI files; see collect.py."""

from services.core.errors import IntakeError
from services.core.intake.collect import (
    FileKind,
    IntakeResult,
    NiftiFile,
    classify_file,
    collect_dicom_files,
)

__all__ = [
    "FileKind",
    "IntakeError",
    "IntakeResult",
    "NiftiFile",
    "classify_file",
    "collect_dicom_files",
]
