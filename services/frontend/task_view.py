"""A study as the web UI follows it: its state, progress, place in the queue, and the
outcome of an upload (plain data; service.py fills it, views.py shows it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from services.broker.schemas import StudyResult
from services.frontend.queue_status import QueueStatus, expected_wait_s, tasks_ahead
from services.frontend.sessions import SessionTask


class TaskState(str, Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class TaskView:
    """One uploaded study as the UI shows it."""

    task: SessionTask
    state: TaskState
    fraction: float  # 0..1
    message: str
    result: StudyResult | None = None
    stage: str = ""  # the pipeline stage while processing
    ahead: int | None = None  # queued: at most this many tasks before it
    workers: int | None = None  # queued: adapters consuming the queue
    expected_wait_s: float | None = None  # queued: until its result, roughly
    duplicate_of: SessionTask | None = None  # the earlier upload whose result this shows


@dataclass
class SubmitOutcome:
    submitted: list[SessionTask] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one line per refused file, with the reason
    duplicates: list[SessionTask] = field(default_factory=list)  # not queued: shown as such

    @property
    def message(self) -> str:
        lines = []
        if self.submitted:
            names = ", ".join(task.original_filename for task in self.submitted)
            lines.append(
                f"Queued {len(self.submitted)} stud{'y' if len(self.submitted) == 1 else 'ies'}: {names}"
            )
        lines.extend(
            f"{task.original_filename}: already screened in this session (same file): "
            "its result is shown again, not recomputed"
            for task in self.duplicates
        )
        lines.extend(self.refused)
        return (
            "\n\n".join(lines) or "Nothing to submit: choose .zip, .tar, .nii or .dcm files first."
        )


def session_summary(views: list[TaskView]) -> str:
    counts = {state: sum(view.state is state for view in views) for state in TaskState}
    parts = [f"{counts[state]} {state.value}" for state in TaskState if counts[state]]
    return ", ".join(parts) if parts else "no studies yet"


def with_queue_places(
    task_views: list[TaskView], status: QueueStatus | None, typical_s: float | None
) -> list[TaskView]:
    """Queued tasks (not duplicates) with their place in the queue and an expected wait,
    in submission order (services/frontend/queue_status.py)."""
    if status is None:
        return task_views
    queued = [
        view
        for view in task_views
        if view.state is TaskState.QUEUED and view.task.duplicate_of is None
    ]
    placed: dict[str, TaskView] = {}
    for number, view in enumerate(queued):
        ahead = tasks_ahead(
            queued_behind=view.task.queued_behind,
            waiting_now=status.waiting,
            known_later_waiting=len(queued) - number - 1,
        )
        placed[view.task.task_id] = dataclasses.replace(
            view,
            ahead=ahead,
            workers=status.workers,
            expected_wait_s=expected_wait_s(ahead, status.workers, typical_s),
        )
    return [placed.get(view.task.task_id, view) for view in task_views]
