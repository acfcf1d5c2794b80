"""Screening reports for the tests: a successful one of the demo model with a probability for
every finding. Not a test module."""

from __future__ import annotations

from typing import Any

from services.core.labels import FINDING_LABELS
from services.core.schemas import FindingResult, ModelInfo, ProcessingStatus, StudyReport


def screened_report(*, finding_scale: int = 40, demo: bool = True, **fields: Any) -> StudyReport:
    """A successful report (P 0.8125, pathology, 12.5 s, a warning): finding ``i`` of
    FINDING_LABELS has probability ``i / finding_scale``, positive from 0.5; the model is the
    demo one when ``demo``. ``fields`` replace any of these."""
    findings = [
        FindingResult(
            label=label,
            probability=i / finding_scale,
            threshold=0.5,
            positive=i / finding_scale >= 0.5,
        )
        for i, label in enumerate(FINDING_LABELS)
    ]
    model = ModelInfo(
        version="demo-abcdef012345", demo=demo, backend="onnxruntime", flavour="python"
    )
    values: dict[str, Any] = {
        "path_to_study": "incoming/study.zip",
        "study_uid": "1.2.3.4",
        "series_uid": "1.2.3.4.5",
        "probability_of_pathology": 0.8125,
        "pathology": 1,
        "processing_status": ProcessingStatus.SUCCESS,
        "time_of_processing": 12.5,
        "most_dangerous_pathology_type": "Lymphadenopathy",
        "warnings": ["uneven slice spacing"],
        "findings": findings,
        "model": model,
        "demo_weights": demo,
    }
    return StudyReport(**(values | fields))
