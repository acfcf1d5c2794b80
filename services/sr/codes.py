"""The coded concepts of the screening SR: standard codes where DICOM has them, and a private
coding scheme (``99CTS``, declared in the document's Coding Scheme Identification) for what
no standard names: the screening call, its probability and threshold, and the 20 findings.

Code values are part of the SR contract: a PACS rule or a reading script keys on them, so a
code never changes meaning. Findings are coded by their index in FINDING_LABELS (a contract
of its own, docs/ARCHITECTURE.md), e.g. ``CTSF10`` for "Lung nodule".
"""

from __future__ import annotations

import hashlib
from typing import Final

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from services.core.labels import FINDING_LABELS

SCHEME: Final = "99CTS"
SCHEME_NAME: Final = "Chest-CT screening result codes"
SCHEME_ORGANIZATION: Final = "chest-ct-screening project"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


# -- the screening of one study -----------------------------------------------------------
SCREENING: Final = _private("CTS001", "Chest CT screening")
PROBABILITY_OF_PATHOLOGY: Final = _private("CTS002", "Probability of pathology")
PATHOLOGY_THRESHOLD: Final = _private("CTS003", "Pathology threshold")
PATHOLOGY_CALL: Final = _private("CTS004", "Pathology")
MOST_DANGEROUS_FINDING: Final = _private("CTS005", "Most dangerous finding")
DEMO_WEIGHTS: Final = _private("CTS006", "Demo weights")
PROCESSING_STATUS: Final = _private("CTS007", "Processing status")
FAILURE_REASON: Final = _private("CTS008", "Failure reason")
SUCCESS: Final = _private("CTS009", "Success")
FAILURE: Final = _private("CTS010", "Failure")
NOTICE: Final = _private("CTS011", "Notice")
# -- one finding ----------------------------------------------------------------------------
FINDING_PROBABILITY: Final = _private("CTS020", "Probability of finding")
FINDING_THRESHOLD: Final = _private("CTS021", "Finding threshold")
FINDING_CALL: Final = _private("CTS022", "Finding present")

# -- standard codes -------------------------------------------------------------------------
CT_CHEST: Final = CodedConcept("24627-2", "LN", "CT Chest")
# What was received when it was not a chest CT: its modality (DICOM CID 29).
MODALITY_PROCEDURES: Final = {
    "CT": CodedConcept("CT", "DCM", "Computed Tomography"),
    "MR": CodedConcept("MR", "DCM", "Magnetic Resonance"),
    "CR": CodedConcept("CR", "DCM", "Computed Radiography"),
    "DX": CodedConcept("DX", "DCM", "Digital Radiography"),
    "PT": CodedConcept("PT", "DCM", "Positron emission tomography"),
    "US": CodedConcept("US", "DCM", "Ultrasound"),
    "XA": CodedConcept("XA", "DCM", "X-Ray Angiography"),
    "NM": CodedConcept("NM", "DCM", "Nuclear Medicine"),
}
OTHER_PROCEDURE: Final = CodedConcept("OT", "DCM", "Other")
PROBABILITY_UNIT: Final = CodedConcept("{probability}", "UCUM", "probability")
PRESENT: Final = CodedConcept("52101004", "SCT", "Present")
ABSENT: Final = CodedConcept("2667000", "SCT", "Absent")
YES: Final = CodedConcept("373066001", "SCT", "Yes")
NO: Final = CodedConcept("373067005", "SCT", "No")
NONE: Final = CodedConcept("260413007", "SCT", "None")


def finding_code(label: str) -> CodedConcept:
    """``CTSF01``..``CTSF20`` by the label's place in FINDING_LABELS; a label outside them
    (a repository with other findings) gets a code from its name's hash."""
    if label in FINDING_LABELS:
        value = f"CTSF{FINDING_LABELS.index(label) + 1:02d}"
    else:
        value = "CTSX" + hashlib.sha256(label.encode()).hexdigest()[:8].upper()
    return _private(value, label[:64])


def coding_scheme_identification() -> Dataset:
    """The item of CodingSchemeIdentificationSequence that declares the private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = SCHEME_ORGANIZATION
    return item
