"""Reading a screening SR back as plain values, and the Debian tools that check one (the SR
and DICOM-listener tests). Not a test module."""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from preconditions import missing_precondition
from pydicom.dataset import Dataset


def require_tool(name: str, package: str) -> str:
    """The path of a Debian tool (see preconditions.missing_precondition when it is not there)."""
    path = shutil.which(name)
    if path is None:
        missing_precondition(
            f"{name} is not installed (Debian package {package}; scripts/ensure_services.sh)"
        )
    return path


def require_file(path: Path, package: str) -> Path:
    """A file a Debian package installs, e.g. a plugin (see preconditions.missing_precondition)."""
    if not path.is_file():
        missing_precondition(
            f"{path} is not installed (Debian package {package}; scripts/ensure_services.sh)"
        )
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dicom3tools' IOD validator reports as errors (warnings are allowed)."""
    tool = require_tool("dciodvfy", "dicom3tools")
    completed = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (completed.stdout + completed.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def _meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def _value(item: Dataset) -> object:
    kind = item.ValueType
    if kind == "NUM":
        return float(item.MeasuredValueSequence[0].NumericValue)
    if kind == "CODE":
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if kind == "TEXT":
        return str(item.TextValue)
    if kind == "IMAGE":
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


@dataclass
class ScreeningSr:
    """The values of one screening SR, by concept name."""

    screening: dict[str, object] = field(default_factory=dict)
    source_images: list[str] = field(default_factory=list)
    algorithm: dict[str, list[str]] = field(default_factory=dict)
    findings: dict[str, dict[str, object]] = field(default_factory=dict)
    evidence_series: dict[str, list[str]] = field(default_factory=dict)
    procedure: tuple[str, str] | None = None  # Procedure Reported: (code value, scheme)


def read_screening_sr(document: Dataset) -> ScreeningSr:
    result = ScreeningSr()
    for item in document.ContentSequence:
        if _meaning(item) == "Procedure reported":
            code = item.ConceptCodeSequence[0]
            result.procedure = (str(code.CodeValue), str(code.CodingSchemeDesignator))
    for study in document.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            result.evidence_series[str(series.SeriesInstanceUID)] = [
                str(item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence
            ]
    measurements = next(
        item for item in document.ContentSequence if _meaning(item) == "Imaging Measurements"
    )
    for group in measurements.ContentSequence:
        values: dict[str, object] = {}
        algorithm: dict[str, list[str]] = {}
        images: list[str] = []
        for item in group.ContentSequence:
            name = _meaning(item)
            if item.ValueType == "IMAGE":
                images.append(str(_value(item)))
            elif name.startswith("Algorithm"):
                algorithm.setdefault(name, []).append(str(item.TextValue))
            else:
                values[name] = _value(item)
        if values.get("Finding") == "Chest CT screening":
            result.screening = values
            result.source_images = images
            result.algorithm = algorithm
        else:
            result.findings[str(values["Finding"])] = values
    return result


CREATION_TIMES = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")


def without_creation_times(path: Path) -> bytes:
    """The file's bytes with the moments it was made blanked (two builds differ only there)."""
    document = pydicom.dcmread(path)
    for keyword in CREATION_TIMES:
        setattr(document, keyword, "")
    for item in document.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = ""
    written = io.BytesIO()
    document.save_as(written, enforce_file_format=True)
    return written.getvalue()
