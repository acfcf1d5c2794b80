"""A study registry that looks like a hospital's year, for benchmarks/registry.py.

Every study is drawn once (``SyntheticStudy``, seeded: the same size is the same registry in
every run) and becomes either the columns of its row for the bulk load, written by the
registry's own ``writes.apply_report`` so the summary is what the recorder would have stored,
or the messages a door and an adapter send (submission, progress, result) for the write
benchmark. ``tests/test_benchmarks.py`` checks that a bulk-loaded row equals the row the
registry writes from those messages.

What the registry holds (the constants below): received times over the last year, in working
hours; doors DICOM 40%, upload 25%, REST 20%, AMQP, batch and import 5% each; tasks done but
2% failed as a whole, 7% of the studies a Failure row (not a chest CT, too few slices), 35%
of the rest with a pathology; 3% of the tasks held two studies; the newest tasks still
queued or processing; 1-3 studies per patient (1.7 on average: ~5,900 patients at 10k
studies), two issuers of patient ids and some without; the worklist's viewer hid 30% of the
newest 2,000 rows (a radiologist clearing the list) and 2% of the older ones, two other
viewers 2% each.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeVar, cast

from services.broker.schemas import ResultFile, StudyProgress, StudyResult, TaskStatus
from services.core.labels import FINDING_LABELS, SEVERITY_ORDER
from services.core.schemas import (
    FindingResult,
    IntakeSummary,
    ModelInfo,
    PatientIdentity,
    ProcessingStatus,
    StudyReport,
)
from services.registry.models import Study
from services.registry.records import Door, Priority, StudyState, Submission
from services.registry.writes import apply_report

K = TypeVar("K")
SEED = 20261126
DAYS = 365
DOOR_WEIGHTS = {
    Door.DICOM: 40,
    Door.UPLOAD: 25,
    Door.REST: 20,
    Door.AMQP: 5,
    Door.BATCH: 5,
    Door.IMPORT: 5,
}
STUDIES_PER_PATIENT = {1: 50, 2: 30, 3: 20}  # share of patients with that many studies
ISSUERS = {"HOSPITAL-A": 85, "HOSPITAL-B": 10, None: 5}  # None: the headers had no issuer
TWO_STUDY_TASKS = 0.03
FAILED_TASKS = 0.02
FAILURE_ROWS = 0.07
PATHOLOGY = 0.35
QUEUED_TASKS, PROCESSING_TASKS = 12, 3  # the newest tasks: a small backlog
WORKLIST_VIEWER = "radiologist01"
OTHER_VIEWERS = ("radiologist02", "physicist01")
RECENT_ROWS = 2000
HIDDEN_RECENT, HIDDEN_OLDER, HIDDEN_BY_OTHERS = 0.30, 0.02, 0.02
PROGRESS_STAGES = (  # what an adapter reports of a one-study task, in order (adapter/progress.py)
    ("started", 0.0),
    ("intake", 0.0),
    ("headers", 0.05),
    ("selection", 0.1),
    ("volume", 0.18),
    ("chest_check", 0.34),
    ("preprocessing", 0.42),
    ("inference", 0.5),
    ("inference", 0.6),  # the model ticker: one message a second while the model runs
    ("inference", 0.7),
    ("inference", 0.8),
    ("findings", 0.86),
    ("study finished", 0.9),
)

# fmt: off
FAMILY_NAMES = (
    "Smith", "Mueller", "Garcia", "Rossi", "Novak", "Kowalski", "Ivanova", "Jensen",
    "Silva", "Dubois", "Tanaka", "Kim", "Nguyen", "Okafor", "Haddad", "Cohen", "Larsen",
    "Horvath", "Popescu", "Schmidt", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
    "Hoffmann", "Schulz", "Koch", "Richter", "Klein", "Wolf", "Neumann", "Schwarz",
    "Zimmermann", "Braun", "Krueger", "Hofmann", "Hartmann", "Lange", "Schmitt", "Werner",
    "Krause", "Meier", "Lehmann", "Schmid", "Schulze", "Maier", "Koehler", "Herrmann",
    "Walter", "Koenig", "Mayer", "Huber", "Kaiser", "Fuchs", "Peters", "Lang", "Scholz",
    "Moeller", "Weiss", "Jung", "Hahn", "Vogel",
)
GIVEN_NAMES = (
    "Anna", "Maria", "Elena", "Sofia", "Laura", "Julia", "Sara", "Emma", "Olga", "Ines",
    "Eva", "Clara", "Ida", "Lea", "Nora", "Paul", "Jan", "Lukas", "Felix", "Jonas", "David",
    "Peter", "Tomas", "Ivan", "Marco", "Luis", "Omar", "Ali", "Kenji", "Min", "Erik",
    "Hugo", "Noah",
)
# fmt: on
DESCRIPTIONS = (
    "CT CHEST W/O CONTRAST",
    "CT THORAX LOW DOSE",
    "CHEST CT LUNG SCREENING",
    "CT CHEST HIGH RESOLUTION",
    "CT THORAX WITH CONTRAST",
)
FAILURE_REASONS = (
    "not a chest CT (body part: ABDOMEN)",
    "too few slices (42) for the model's field of view",
    "no series with a usable geometry",
)
WARNINGS = ("slice thickness 2.5 mm above 1.5 mm", "gantry tilt 2.0 degrees", "gaps in z")
AE_TITLES = ("CT_SCANNER_1", "CT_SCANNER_2", "PACS_MAIN", "CT_ER")
API_CLIENTS = ("ris-bridge", "pacs-router", "research-export")
TECHNOLOGISTS = tuple(f"tech{number:02d}" for number in range(1, 16))
ADAPTERS = ("adapter-1", "adapter-2", "adapter-3", "adapter-4")
MODEL = ModelInfo(version="ct-clip-screening-1.4.0", demo=False, backend="triton", flavour="python")
UID_ROOT = "1.2.826.0.1.3680043.10.511"
ROW_COLUMNS = tuple(column.key for column in Study.__table__.columns if column.key != "id")


@dataclass(frozen=True)
class Patient:
    patient_id: str
    issuer: str | None
    name: str
    birth_date: date
    sex: str


@dataclass(frozen=True)
class SyntheticStudy:
    """One study of a task as a door recorded it and, once finished, its report."""

    task_id: str
    report_index: int
    door: Door
    sender: str | None
    original_filename: str
    study_path: str
    content_sha256: str | None
    received_at: datetime
    state: StudyState
    adapter_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    report: StudyReport | None  # None while queued or processing

    def submission(self) -> Submission:
        return Submission(
            task_id=self.task_id,
            door=self.door,
            sender=self.sender,
            original_filename=self.original_filename,
            study_path=self.study_path,
            content_sha256=self.content_sha256,
            priority=Priority.ROUTINE,
            received_at=self.received_at,
            queued_at=self.received_at,
        )


@dataclass(frozen=True)
class SyntheticRegistry:
    studies: list[SyntheticStudy]  # oldest first, a task's studies together
    patients: list[Patient]
    end: datetime  # the newest time in the registry ("now" of its year)

    def hidden_positions(self, seed: int = SEED) -> dict[str, list[int]]:
        """Which rows (positions in ``studies``) each viewer hid."""
        rng = random.Random(seed)
        count = len(self.studies)
        recent_from = max(0, count - RECENT_ROWS)
        mine = [
            position
            for position in range(count)
            if rng.random() < (HIDDEN_RECENT if position >= recent_from else HIDDEN_OLDER)
        ]
        hidden = {WORKLIST_VIEWER: mine}
        for viewer in OTHER_VIEWERS:
            hidden[viewer] = [p for p in range(count) if rng.random() < HIDDEN_BY_OTHERS]
        return hidden


def _weighted(rng: random.Random, weights: dict[K, int]) -> K:
    """One key, drawn in proportion to its weight."""
    point = rng.random() * sum(weights.values())
    for key, weight in weights.items():
        point -= weight
        if point < 0:
            return key
    return key  # rounding at the top end


def _patients(rng: random.Random, n_studies: int) -> list[Patient]:
    """Patients enough for ``n_studies`` studies at 1-3 studies each, each patient repeated
    once per study, in random order."""
    slots: list[Patient] = []
    number = 0
    while len(slots) < n_studies:
        number += 1
        born = date(1940, 1, 1) + timedelta(days=rng.randrange(60 * 365))
        name = f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}"
        patient = Patient(f"PID{number:08d}", _weighted(rng, ISSUERS), name, born, rng.choice("MF"))
        slots += [patient] * _weighted(rng, STUDIES_PER_PATIENT)
    rng.shuffle(slots)
    return slots[:n_studies]


def _received_times(rng: random.Random, n_tasks: int, end: datetime) -> list[datetime]:
    """Received times over the year before ``end``, mostly in working hours, oldest first."""
    times = []
    for _ in range(n_tasks):
        day = end - timedelta(days=rng.uniform(0, DAYS))
        hour = min(23, max(0, int(rng.gauss(12, 3.5))))
        times.append(day.replace(hour=hour, minute=rng.randrange(60), second=rng.randrange(60)))
    times.sort()
    return [min(when, end) for when in times]


def _sender(rng: random.Random, door: Door) -> str | None:
    senders = {
        Door.UPLOAD: TECHNOLOGISTS,
        Door.REST: API_CLIENTS,
        Door.DICOM: AE_TITLES,
        Door.BATCH: ("batch",),
    }
    choices = senders.get(door)
    return None if choices is None else rng.choice(choices)


def _identity(patient: Patient, when: datetime) -> PatientIdentity:
    age = (when.date() - patient.birth_date).days // 365
    return PatientIdentity(
        patient_name=patient.name,
        patient_id=patient.patient_id,
        issuer_of_patient_id=patient.issuer,
        patient_birth_date=patient.birth_date.isoformat(),
        patient_age=f"{age:03d}Y",
        patient_sex=patient.sex,
        study_time=when.strftime("%H:%M:%S"),
        modality="CT",
        referring_physician_name=f"Dr^{patient.name.split('^')[0][:3]}",
    )


def _findings(rng: random.Random, sick: bool, *, every_label: bool) -> list[FindingResult]:
    """The model's findings: every label, or (``every_label`` False, enough for a registry
    row, which keeps the positive ones) only those above their thresholds."""
    positive = set(rng.sample(FINDING_LABELS, rng.randint(1, 4))) if sick else set()
    labels = (
        FINDING_LABELS if every_label else [label for label in FINDING_LABELS if label in positive]
    )
    return [
        FindingResult(
            label=label,
            probability=round(
                rng.uniform(0.55, 0.99) if label in positive else rng.random() / 2, 3
            ),
            threshold=0.5,
            positive=label in positive,
        )
        for label in labels
    ]


def synthetic_report(
    rng: random.Random,
    patient: Patient,
    when: datetime,
    number: int,
    *,
    failure: str | None,
    every_label: bool = True,
) -> StudyReport:
    """A study's report as the pipeline writes it (the parts the registry and the reply carry)."""
    sick = failure is None and rng.random() < PATHOLOGY
    findings = [] if failure else _findings(rng, sick, every_label=every_label)
    positive = [finding.label for finding in findings if finding.positive]
    worst = next((label for label in SEVERITY_ORDER if label in positive), None)
    probability = (
        None if failure else round(rng.uniform(0.5, 0.99) if sick else rng.random() / 2, 4)
    )
    return StudyReport(
        path_to_study=f"study{number}",
        study_uid=f"{UID_ROOT}.{number}.1",
        series_uid=f"{UID_ROOT}.{number}.2",
        probability_of_pathology=probability,
        pathology=None if failure else int(sick),
        processing_status=ProcessingStatus.FAILURE if failure else ProcessingStatus.SUCCESS,
        time_of_processing=round(rng.uniform(15, 60), 2),
        most_dangerous_pathology_type=worst,
        failure_reason=failure,
        study_date=(when - timedelta(days=rng.choice((0, 0, 0, 1)))).date().isoformat(),
        study_description=rng.choice(DESCRIPTIONS),
        accession_number=f"A{number:09d}",
        warnings=rng.sample(WARNINGS, rng.choice((0, 0, 0, 1, 2))),
        findings=findings,
        intake=IntakeSummary(files_total=312, dicom_files=310, skipped_non_dicom=2),
        stage_seconds={"intake": 0.5, "headers": 0.3, "volume": 0.2, "inference": 5.1},
        model=MODEL,
        identity=_identity(patient, when),
    )


def result_files(study: SyntheticStudy) -> list[ResultFile]:
    """The files of a finished task (a task that failed as a whole wrote none)."""
    if study.state is not StudyState.DONE:
        return []
    folder = f"results/{study.task_id}"
    return [
        ResultFile(kind="xlsx", path=f"{folder}/output.xlsx"),
        ResultFile(kind="json", path=f"{folder}/report.json"),
        ResultFile(kind="warnings", path=f"{folder}/warnings.txt"),
        ResultFile(kind="preview", path=f"{folder}/previews/study1_axial.png", description="axial"),
        ResultFile(
            kind="preview", path=f"{folder}/previews/study1_coronal.png", description="coronal"
        ),
    ]


@dataclass(frozen=True)
class _Task:
    """What one task's studies share."""

    task_id: str
    door: Door
    received_at: datetime
    state: StudyState
    adapter_id: str | None
    started_at: datetime | None
    finished_at: datetime | None


def _task(rng: random.Random, received: datetime, waiting: StudyState | None) -> _Task:
    door = _weighted(rng, DOOR_WEIGHTS)
    started = received + timedelta(seconds=rng.uniform(1, 120))
    finished = started + timedelta(seconds=rng.uniform(15, 60))
    if waiting is StudyState.QUEUED:
        return _Task(f"{rng.getrandbits(128):032x}", door, received, waiting, None, None, None)
    adapter = rng.choice(ADAPTERS)
    if waiting is StudyState.PROCESSING:
        return _Task(
            f"{rng.getrandbits(128):032x}", door, received, waiting, adapter, started, None
        )
    state = StudyState.FAILED if rng.random() < FAILED_TASKS else StudyState.DONE
    return _Task(f"{rng.getrandbits(128):032x}", door, received, state, adapter, started, finished)


def _report_of(
    rng: random.Random, task: _Task, patient: Patient, number: int, every_label: bool
) -> StudyReport | None:
    if not task.state.final:
        return None
    failure = None
    if task.state is StudyState.FAILED:
        failure = "given up after 3 attempts: the adapter crashed"
    elif rng.random() < FAILURE_ROWS:
        failure = rng.choice(FAILURE_REASONS)
    return synthetic_report(
        rng, patient, task.received_at, number, failure=failure, every_label=every_label
    )


def _first_study(
    rng: random.Random, task: _Task, patient: Patient, number: int, every_label: bool
) -> SyntheticStudy:
    """The task's first study: what its door recorded, and its report."""
    sender = _sender(rng, task.door)
    filename = {
        Door.DICOM: f"DICOM from {sender}",
        Door.IMPORT: f"{task.task_id}.zip",
    }.get(task.door, f"CT_{patient.name.split('^')[0]}_{number}.zip")
    uploaded = task.door in (Door.UPLOAD, Door.REST)
    return SyntheticStudy(
        task_id=task.task_id,
        report_index=0,
        door=task.door,
        sender=sender,
        original_filename=filename,
        study_path=f"uploads/{task.task_id}/{filename}" if uploaded else "",
        content_sha256=f"{rng.getrandbits(256):064x}" if uploaded else None,
        received_at=task.received_at,
        state=task.state,
        adapter_id=task.adapter_id,
        started_at=task.started_at,
        finished_at=task.finished_at,
        report=_report_of(rng, task, patient, number, every_label),
    )


def _task_studies(
    rng: random.Random, task: _Task, patient: Patient, number: int, every_label: bool
) -> list[SyntheticStudy]:
    """One study, or (a finished task, 3%) two of the same patient in one upload: the second
    shares the task's submission (as the registry's rows do) and has its own report."""
    first = _first_study(rng, task, patient, number, every_label)
    if task.state is not StudyState.DONE or rng.random() >= TWO_STUDY_TASKS:
        return [first]
    report = _report_of(rng, task, patient, number + 1, every_label)
    return [first, replace(first, report_index=1, report=report)]


def _waiting_state(tasks_from_newest: int) -> StudyState | None:
    if tasks_from_newest < PROCESSING_TASKS:
        return StudyState.PROCESSING
    if tasks_from_newest < PROCESSING_TASKS + QUEUED_TASKS:
        return StudyState.QUEUED
    return None


def synthetic_registry(
    n_studies: int,
    *,
    end: datetime | None = None,
    seed: int = SEED,
    full_reports: bool = False,
    backlog: bool = True,
) -> SyntheticRegistry:
    """``n_studies`` rows, oldest first (a task's studies together).

    ``full_reports``: every report lists all the model's findings, as a result message does
    (a registry row keeps only the positive ones, and drawing them all takes 3x longer);
    ``backlog``: the newest tasks are still queued or processing (else every task is done
    or failed)."""
    rng = random.Random(seed)
    end = (end or datetime.now(UTC)).replace(microsecond=0)
    patients = _patients(rng, n_studies)
    n_tasks = round(n_studies / (1 + TWO_STUDY_TASKS))
    received = _received_times(rng, n_tasks, end)
    studies: list[SyntheticStudy] = []
    for position, when in enumerate(received):
        task = _task(rng, when, _waiting_state(n_tasks - 1 - position) if backlog else None)
        patient = patients[len(studies) % len(patients)]
        studies += _task_studies(rng, task, patient, len(studies) + 1, full_reports)
    while len(studies) < n_studies:  # rounding: one-study tasks at the end of the year
        task = _task(rng, end, None)
        patient = patients[len(studies) % len(patients)]
        studies += _task_studies(rng, task, patient, len(studies) + 1, full_reports)
    del studies[n_studies:]  # the last task's second study, if it is one too many
    return SyntheticRegistry(studies, sorted(set(patients), key=lambda p: p.patient_id), end)


def row_columns(study: SyntheticStudy) -> dict[str, Any]:
    """The study's row as the registry writes it (record_submission, then record_progress or
    record_result, whose summary is ``writes.apply_report``'s), for a bulk insert."""
    columns: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)  # one set of keys for executemany
    columns |= {
        "task_id": study.task_id,
        "report_index": study.report_index,
        "door": study.door.value,
        "sender": study.sender,
        "priority": Priority.ROUTINE.value,
        "original_filename": study.original_filename,
        "study_path": study.study_path,
        "content_sha256": study.content_sha256,
        "state": study.state.value,
        "stage": "inference" if study.state is StudyState.PROCESSING else None,
        "progress": 1.0 if study.state.final else (0.6 if study.started_at else 0.0),
        "adapter_id": study.adapter_id,
        "attempt": 1 if study.state.final else None,
        "received_at": study.received_at,
        "queued_at": study.received_at,
        "started_at": study.started_at,
        "finished_at": study.finished_at,
        "updated_at": study.finished_at or study.started_at or study.received_at,
        "findings": [],
        "warnings": [],
        "files": [item.model_dump() for item in result_files(study)],
        "quality_flags": "",  # the column's default: no flag until a result says one
    }
    if study.report is not None:
        # apply_report only sets attributes: a plain namespace takes them without the ORM's
        # instrumentation, which would triple the time to build 100k rows.
        row = SimpleNamespace(**columns)
        apply_report(cast(Study, row), study.report)
        columns = vars(row)
    return columns


def progress_messages(study: SyntheticStudy, at: datetime) -> Iterator[StudyProgress]:
    """What the adapter reports of the task while it runs (one study)."""
    for step, (stage, fraction) in enumerate(PROGRESS_STAGES):
        yield StudyProgress(
            task_id=study.task_id,
            stage=stage,
            fraction=fraction,
            message=stage,
            adapter_id=study.adapter_id or ADAPTERS[0],
            at=at + timedelta(seconds=step),
        )


def result_message(studies: list[SyntheticStudy]) -> StudyResult:
    """The result of a task with these studies (a task's rows, report_index order)."""
    first = studies[0]
    reports = [study.report for study in studies if study.report is not None]
    failed = first.state is StudyState.FAILED
    return StudyResult(
        task_id=first.task_id,
        status=TaskStatus.FAILED if failed else TaskStatus.COMPLETED,
        reports=reports,
        files=result_files(first),
        original_filename=first.original_filename,
        study_path=first.study_path,
        adapter_id=first.adapter_id or ADAPTERS[0],
        started_at=first.started_at,
        finished_at=first.finished_at or first.received_at,
        seconds=sum(report.time_of_processing for report in reports),
    )
