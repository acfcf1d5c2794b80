"""The adapter's two stages of a task, apart from RabbitMQ.

* :func:`prepare_task` (the preparation stage): intake, series selection, the chest check,
  the volume and the model input of every study. A task none of whose studies needs the
  model (refused, unreadable, not a chest CT) is finished here: its result never waits
  behind the model's backlog. Otherwise the prepared studies are left on the shared storage
  (services/adapter/handoff.py) and a :class:`ModelTask` names them. While other tasks
  wait, a new task is first checked only as far as is cheap (``check_first``): a refusal
  is answered at once, a task that passes goes to the preparation lane and is prepared in
  full after the waiting tasks are checked (their refusals never wait behind it).
* :func:`finish_model_task` (the model stage): the model on each prepared input, then the
  report files, SRs and the result. A task whose input is in neither this adapter's memory
  (services/adapter/held_inputs.py) nor the storage goes back to its preparation lane.

:func:`run_task` chains both in one thread (the benchmarks' stack-free path). Errors of a
study become a FAILED result; errors whose policy is not FAILURE_ROW propagate and the
delivery rules decide (services/adapter/delivery.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from loguru import logger

from services.adapter.delivery import completed_result, failed_result
from services.adapter.handoff import (
    CheckRecord,
    PreparedEntry,
    PreparedTask,
    evidence_to_json,
    kept_intake_dir,
    model_input_name,
    model_task,
    prepared_dir,
    read_check,
    read_handoff,
    record_check,
    save_model_input,
    write_handoff,
)
from services.adapter.held_inputs import (
    Handover,
    HeldInputs,
    ModelInputGone,
    inputs_available,
    read_model_input,
)
from services.adapter.progress import WRITING_FRACTION, InferenceTimes, ProgressCallback
from services.adapter.task_runner import (
    EarlySkeletons,
    TaskEvents,
    mark_late_instances,
    result_files,
    side_file_kind,
    sr_context,
    structured_report_files,
)
from services.broker.schemas import (
    ModelTask,
    ResultFile,
    StudyResult,
    StudyTask,
    utc_now,
)
from services.broker.storage import handoff_path, relative_to_storage, result_files_dir
from services.core.config import Settings
from services.core.errors import ErrorPolicy, StudyNotFound, policy_of
from services.core.findings import resolve_thresholds
from services.core.inference.base import InferenceBackend
from services.core.intake.kept import INTAKE_RECORD
from services.core.pipeline import (
    CheckFirst,
    EventFanOut,
    PreparationDeferred,
    PreparedStudy,
    prepare_studies,
)
from services.core.pipeline import preprocessing_target as target_of
from services.core.pipeline.run import infer_and_finish
from services.core.schemas import StudyReport
from services.sr.document import EarlierReports
from services.sr.evidence import EvidenceCollector, StudyEvidence


@dataclass(frozen=True)
class TaskContext:
    """What both stages need besides the task."""

    backend: InferenceBackend
    settings: Settings
    adapter_id: str
    attempt: int
    progress: ProgressCallback | None = None
    inference_times: InferenceTimes | None = None
    earlier_reports: EarlierReports | None = None
    # Model inputs kept in memory between this adapter's stages; None: always on the storage.
    held_inputs: HeldInputs | None = None
    on_handover: Callable[[Handover], None] = lambda handover: None  # counted (metrics)


def prepare_task(
    task: StudyTask, context: TaskContext, *, check_first: bool = False
) -> StudyResult | ModelTask | StudyTask:
    """The task's result when no study needs the model, else its hand-off to the model stage.
    A task prepared before (its delivery was given back after the hand-off was recorded) is
    handed off again, not prepared twice, unless a model input it names is gone.

    ``check_first`` (other tasks are waiting): the task is checked only as far as is cheap
    (services/core/pipeline/prepare.py, CheckFirst); a task none of whose studies is refused
    there comes back as it is, for the preparation lane."""
    storage_root = context.settings.storage.root
    earlier = read_handoff(storage_root, task.task_id)
    if earlier is not None:
        folder = prepared_dir(storage_root, task.task_id)
        if inputs_available(context.held_inputs, folder, task.task_id, earlier):
            return model_task(storage_root, task, earlier, attempt=context.attempt)
        logger.warning("task {}: a model input it was prepared with is gone", task.task_id)
    # A check keeps the unpacked input for the full preparation (its intake is not repeated),
    # its time (counted in the preparation's) and its delivery (the deliveries count on).
    intake_dir = kept_intake_dir(storage_root, task.task_id)
    keep_intake = check_first or (intake_dir / INTAKE_RECORD).is_file()
    check = read_check(storage_root, task.task_id)
    if check is not None and check_first:
        return task  # checked before (its hand-on to the preparation lane was lost)
    checked_s = check.seconds if check is not None else 0.0
    if check is not None:
        context = replace(context, attempt=max(context.attempt, check.attempt))
    started = utc_now()
    clock = time.perf_counter()
    output_dir = result_files_dir(storage_root, task.task_id)
    backend = context.backend
    events = TaskEvents(
        context.progress,
        output_dir,
        inference_times=context.inference_times,
        spacing_mm=backend.metadata.target_spacing_mm,
    )
    evidence = EvidenceCollector()
    entries: list[PreparedEntry] = []
    try:
        study_path = task.resolve_study_path(storage_root)
        if not study_path.exists():
            raise StudyNotFound(
                f"the study {task.study_path!r} is not in the shared storage "
                "(was it uploaded to the same storage volume?)"
            )
        folder = prepared_dir(storage_root, task.task_id)
        for prepared in prepare_studies(
            study_path,
            settings=context.settings,
            target=target_of(backend.metadata),
            display_name=task.original_filename or None,
            events=EventFanOut(events, evidence),
            body_part_model=backend.body_part_model,
            check_first=(
                CheckFirst(context.settings.adapter.check_first_max_voxels) if check_first else None
            ),
            kept_intake_dir=intake_dir if keep_intake else None,
        ):
            entries.append(
                _prepared_entry(
                    prepared, folder, events, evidence, backend, task.task_id, context.held_inputs
                )
            )
        if not entries:
            raise RuntimeError("the pipeline returned no report")
        if not any(entry.input_file for entry in entries):
            reports = [entry.report for entry in entries]
            files = _finish_files(task, context, reports, evidence.studies, events)
            seconds = time.perf_counter() - clock + checked_s
            return completed_result(
                task,
                reports,
                files,
                adapter_id=context.adapter_id,
                attempt=context.attempt,
                started=started,
                seconds=seconds,
                prepare_seconds=seconds,
                check_seconds=checked_s or None,
            )
        side_files = [relative_to_storage(storage_root, path) for path in events.finish()]
        record = PreparedTask(
            task_id=task.task_id,
            entries=entries,
            side_files=side_files,
            started_at=started,
            prepare_seconds=round(time.perf_counter() - clock + checked_s, 4),
            check_seconds=checked_s or None,
            prepared_by=context.adapter_id,
        )
        write_handoff(storage_root, record)
        # The kept intake stays until the result is stored: a second delivery of the task
        # may be reading it (a copy left in the task lane by a lost ack).
        return model_task(storage_root, task, record, attempt=context.attempt)
    except PreparationDeferred:
        passed = CheckRecord(seconds=round(time.perf_counter() - clock, 4), attempt=context.attempt)
        record_check(storage_root, task.task_id, passed)
        logger.info("task {}: checked; its preparation waits its turn", task.task_id)
        return task
    except Exception as error:  # noqa: BLE001 - re-raised unless its policy is FAILURE_ROW
        return _failed_or_raise(task, context, error, started)
    finally:
        events.finish()


def _prepared_entry(
    prepared: PreparedStudy,
    folder: Path,
    events: TaskEvents,
    evidence: EvidenceCollector,
    backend: InferenceBackend,
    task_id: str,
    held_inputs: HeldInputs | None,
) -> PreparedEntry:
    report = prepared.report
    report.demo_weights = backend.metadata.demo
    if prepared.model_input is None:
        # Finished here: a refused or failed study never waits for the model.
        events.study_finished(report, study_index=prepared.index, n_studies=prepared.n_studies)
        # Its SR is written with the task's others: here if the whole task ends in this
        # stage, else by the model stage from the hand-off.
        finished = evidence.finish(report, prepared.index)
        return PreparedEntry(
            report=report,
            index=prepared.index,
            n_studies=prepared.n_studies,
            evidence=evidence_to_json(finished),
        )
    events.model_input_ready(prepared)
    name = model_input_name(prepared.index)
    in_memory = held_inputs is not None and held_inputs.hold(task_id, name, prepared.model_input)
    if not in_memory:
        save_model_input(folder, name, prepared.model_input)
    prepared.model_input = None  # 221 MB: held or on disk now, not by this loop's next study
    return PreparedEntry(
        report=report,
        index=prepared.index,
        n_studies=prepared.n_studies,
        input_file=name,
        input_in_memory=in_memory,
        evidence=evidence_to_json(evidence.take(prepared.index)),
    )


def finish_model_task(handoff: ModelTask, context: TaskContext) -> StudyResult | StudyTask:
    """The model on every prepared study of the task, then its files and result. A task
    whose model input is gone (held by an adapter that was killed, or by another adapter's
    memory) comes back as it is, for its preparation lane: it is prepared again there, in
    the stage whose memory and turn preparations take, its deliveries counted on."""
    task = handoff.task
    # The deliveries spent: the preparation's, then this ModelTask's (a new ModelTask after a
    # send-back starts its own count at 1, so a study that kills its adapter in the model
    # stage still reaches the delivery limit).
    spent = handoff.prepare_attempt + context.attempt - 1
    context = replace(context, attempt=max(context.attempt, handoff.prepare_attempt))
    try:
        return _finish_prepared(handoff, context)
    except ModelInputGone as gone:
        logger.warning("task {}: {}; back to its preparation lane", task.task_id, gone)
    context.on_handover(Handover.PREPARED_AGAIN)
    storage_root = context.settings.storage.root
    check = read_check(storage_root, task.task_id)
    seconds = check.seconds if check is not None else 0.0
    record_check(storage_root, task.task_id, CheckRecord(seconds=seconds, attempt=spent))
    # Its record goes: the queue's view shows it waiting for its preparation, not in the
    # model; a copy of this ModelTask finding no record is sent back too.
    handoff_path(storage_root, task.task_id).unlink(missing_ok=True)
    return task


def _finish_prepared(handoff: ModelTask, context: TaskContext) -> StudyResult:
    task = handoff.task
    storage_root = context.settings.storage.root
    started = utc_now()
    clock = time.perf_counter()
    backend = context.backend
    events = TaskEvents(
        context.progress,
        result_files_dir(storage_root, task.task_id),
        inference_times=context.inference_times,
    )
    skeletons: EarlySkeletons | None = None
    try:
        record = read_handoff(storage_root, task.task_id)
        if record is None:
            raise ModelInputGone("its hand-off record is not in the storage")
        started = record.started_at
        skeletons = EarlySkeletons(
            [entry.evidence for entry in record.entries],
            sr_context(task.task_id, backend, context.settings, context.earlier_reports),
        )
        thresholds = resolve_thresholds(backend.metadata, context.settings.inference)
        folder = prepared_dir(storage_root, task.task_id)
        reports: list[StudyReport] = []
        for entry in record.entries:
            report = entry.report
            if entry.input_file is not None:
                study = PreparedStudy(
                    report=report,
                    model_input=None,
                    index=entry.index,
                    n_studies=entry.n_studies,
                    shared_seconds=0.0,
                    stage_seconds=dict(report.stage_seconds),
                )
                model_input = read_model_input(
                    context.held_inputs, folder, task.task_id, entry, context.on_handover
                )
                report = infer_and_finish(study, model_input, backend, thresholds, events)
                report.demo_weights = backend.metadata.demo
                events.study_finished(report, study_index=entry.index, n_studies=entry.n_studies)
            reports.append(report)
        pairs = list(zip(reports, skeletons.evidence(), strict=True))
        files = _finish_files(task, context, reports, pairs, events, skeletons)
        files.extend(
            ResultFile(
                kind=side_file_kind(
                    result_files_dir(storage_root, task.task_id), storage_root / path
                ),
                path=path,
            )
            for path in record.side_files
        )
        model_seconds = time.perf_counter() - clock
        return completed_result(
            task,
            reports,
            files,
            adapter_id=context.adapter_id,
            attempt=context.attempt,
            started=started,
            seconds=record.prepare_seconds + model_seconds,
            prepare_seconds=record.prepare_seconds,
            check_seconds=record.check_seconds,
            model_seconds=model_seconds,
        )
    except ModelInputGone:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised unless its policy is FAILURE_ROW
        return _failed_or_raise(task, context, error, started)
    finally:
        try:
            events.finish()
        finally:
            if skeletons is not None:
                skeletons.close()


def run_task(task: StudyTask, context: TaskContext) -> StudyResult:
    """Both stages in this thread (no broker between them)."""
    try:
        outcome = prepare_task(task, context)
        if isinstance(outcome, StudyResult):
            return outcome
        assert isinstance(outcome, ModelTask)  # only check_first returns the task itself
        finished = finish_model_task(outcome, context)
        if isinstance(finished, StudyResult):
            return finished
        raise StudyNotFound("the model input prepared moments before is gone")
    finally:
        if context.held_inputs is not None:
            context.held_inputs.drop(task.task_id)


def _finish_files(
    task: StudyTask,
    context: TaskContext,
    reports: list[StudyReport],
    evidence: list[tuple[StudyReport, StudyEvidence | None]],
    events: TaskEvents,
    early: EarlySkeletons | None = None,
) -> list[ResultFile]:
    """The task's report files and SRs; ``early``: the skeletons made during the model
    requests, completed with the context they were made with."""
    storage_root = context.settings.storage.root
    output_dir = result_files_dir(storage_root, task.task_id)
    if task.late_instances:
        mark_late_instances(reports)
    events.report("writing", WRITING_FRACTION, "writing the report files")
    files = result_files(storage_root, output_dir, reports)
    document = (
        early.context
        if early is not None
        else sr_context(task.task_id, context.backend, context.settings, context.earlier_reports)
    )
    skeletons = early.skeletons() if early is not None else None
    files.extend(structured_report_files(storage_root, output_dir, evidence, document, skeletons))
    files.extend(
        ResultFile(
            kind=side_file_kind(output_dir, path), path=relative_to_storage(storage_root, path)
        )
        for path in events.finish()
    )
    return files


def _failed_or_raise(
    task: StudyTask, context: TaskContext, error: Exception, started: datetime
) -> StudyResult:
    if policy_of(error) is not ErrorPolicy.FAILURE_ROW:
        raise error  # the delivery rules decide (the study may be fine)
    logger.opt(exception=error).error("task {} failed", task.task_id)
    return failed_result(
        task,
        f"{type(error).__name__}: {error}",
        adapter_id=context.adapter_id,
        attempt=context.attempt,
        started_at=started,
    )
