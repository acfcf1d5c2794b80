"""Which lane a study travels in: the DICOM rules (calling AE map, RequestedProcedurePriority)
and the task message's field. Pure logic, no broker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset

from services.adapter.stage_loop import StageLoop, StageSpec
from services.broker.schemas import (
    PRIORITY_ORDER,
    Priority,
    QueueTopology,
    StudyTask,
    task_routing_key,
)
from services.dicom_listener.priority import requested_priority, study_priority

AE_MAP = {"ER_CT": "stat", "WARD_CT": "urgent"}


@pytest.mark.parametrize(
    ("calling_ae", "requested", "expected"),
    [
        ("ER_CT", None, Priority.STAT),
        ("WARD_CT", None, Priority.URGENT),
        ("OTHER", None, Priority.ROUTINE),
        ("OTHER", Priority.URGENT, Priority.URGENT),
        ("WARD_CT", Priority.STAT, Priority.STAT),
        ("ER_CT", Priority.ROUTINE, Priority.STAT),  # a tag never lowers the sender's grant
    ],
)
def test_the_more_urgent_of_sender_and_tag_wins(
    calling_ae: str, requested: Priority | None, expected: Priority
) -> None:
    assert study_priority(calling_ae, requested, AE_MAP) is expected


def test_requested_procedure_priority_is_read_at_top_level_and_in_the_request() -> None:
    top = Dataset()
    top.RequestedProcedurePriority = "HIGH"
    assert requested_priority(top) is Priority.URGENT
    nested = Dataset()
    item = Dataset()
    item.RequestedProcedurePriority = "STAT"
    nested.RequestAttributesSequence = [item]
    assert requested_priority(nested) is Priority.STAT
    low = Dataset()
    low.RequestedProcedurePriority = "LOW"
    assert requested_priority(low) is Priority.ROUTINE
    assert requested_priority(Dataset()) is None


def test_each_priority_has_its_own_lane_in_each_stage() -> None:
    topology = QueueTopology(prefix="site")
    assert topology.task_lanes() == ["site.tasks.stat", "site.tasks.urgent", "site.tasks"]
    assert topology.model_lanes() == ["site.model.stat", "site.model.urgent", "site.model"]
    # Per priority, new tasks (their cheap checks) before checked ones (their preparation).
    assert topology.preparation_stage_lanes() == [
        "site.tasks.stat",
        "site.prepare.stat",
        "site.tasks.urgent",
        "site.prepare.urgent",
        "site.tasks",
        "site.prepare",
    ]
    assert task_routing_key(Priority.ROUTINE) == "study"  # earlier publishers keep working
    assert task_routing_key(Priority.STAT) == "study.stat"
    task = StudyTask(study_path="uploads/a/b.zip", original_filename="b.zip")
    assert task.priority is Priority.ROUTINE
    with pytest.raises(ValueError, match="priority"):
        StudyTask(study_path="uploads/a/b.zip", original_filename="b.zip", priority="soon")


class _Counts:
    """A channel that answers queue_declare(passive=True) with given message counts."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def queue_declare(self, queue: str, passive: bool = False) -> SimpleNamespace:
        assert passive
        return SimpleNamespace(method=SimpleNamespace(message_count=self.counts.get(queue, 0)))


def test_a_flood_of_new_tasks_lets_the_checked_ones_through() -> None:
    topology = QueueTopology(prefix="site")
    spec = StageSpec(
        "prepare",
        topology.preparation_stage_lanes(),
        StudyTask,
        lambda *_: None,  # type: ignore[arg-type, return-value]
        check_first_lanes={
            topology.task_lane(priority): topology.preparation_lane(priority)
            for priority in PRIORITY_ORDER
        },
        checked_first_at=3,
    )
    loop = StageLoop(owner=None, spec=spec)
    calm = loop._lanes_in_turn(_Counts({"site.prepare": 2}))  # type: ignore[arg-type]
    assert calm == topology.preparation_stage_lanes()
    flooded = loop._lanes_in_turn(_Counts({"site.prepare": 3}))  # type: ignore[arg-type]
    assert flooded[-2:] == ["site.prepare", "site.tasks"]  # routine: checked ones first
    assert flooded[:4] == topology.preparation_stage_lanes()[:4]  # the others as they were
