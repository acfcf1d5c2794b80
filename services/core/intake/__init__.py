"""Intake of one input (zip, folder, file) into candidate files; see collect.py."""

from services.core.errors import IntakeError
from services.core.intake.collect import FileKind, IntakeResult, classify_file, collect_dicom_files

__all__ = ["FileKind", "IntakeError", "IntakeResult", "classify_file", "collect_dicom_files"]
