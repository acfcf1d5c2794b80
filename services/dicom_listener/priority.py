"""How urgent a study received over DICOM is: pure rules.

Two sources, the more urgent wins: the site's map of calling AE titles to priorities
(``dicom.calling_ae_priorities``: the emergency department's CT sends STAT studies) and the
study's own RequestedProcedurePriority (0040,1003), whose defined terms are STAT, HIGH,
ROUTINE, MEDIUM and LOW. A tag never lowers what the sender's AE title grants.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.broker.schemas import PRIORITY_ORDER, Priority

# RequestedProcedurePriority's defined terms; MEDIUM and LOW are routine here.
REQUESTED_PRIORITIES: dict[str, Priority] = {
    "STAT": Priority.STAT,
    "HIGH": Priority.URGENT,
    "ROUTINE": Priority.ROUTINE,
    "MEDIUM": Priority.ROUTINE,
    "LOW": Priority.ROUTINE,
}


def more_urgent(first: Priority, second: Priority) -> Priority:
    return first if PRIORITY_ORDER.index(first) <= PRIORITY_ORDER.index(second) else second


def requested_priority(dataset: Any) -> Priority | None:
    """The instance's RequestedProcedurePriority (top level or in its Request Attributes
    Sequence), or None when it has none the rules know."""
    try:
        values = [dataset.get("RequestedProcedurePriority")]
        for item in dataset.get("RequestAttributesSequence") or []:
            values.append(item.get("RequestedProcedurePriority"))
    except Exception:  # noqa: BLE001 - a broken tag never refuses an instance: routine
        return None
    found = [
        REQUESTED_PRIORITIES[text]
        for value in values
        if value is not None
        and (text := str(getattr(value, "value", value)).strip().upper()) in REQUESTED_PRIORITIES
    ]
    if not found:
        return None
    result = found[0]
    for priority in found[1:]:
        result = more_urgent(result, priority)
    return result


def study_priority(
    calling_ae: str, requested: Priority | None, by_calling_ae: Mapping[str, str]
) -> Priority:
    """The priority of a study's task: the more urgent of its sender's and its tag's."""
    configured = Priority(by_calling_ae.get(calling_ae.strip(), Priority.ROUTINE.value))
    return configured if requested is None else more_urgent(configured, requested)
