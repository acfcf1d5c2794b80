"""One input through the whole pipeline: prepared studies, the model, finished reports.

:func:`process_input` chains :func:`~services.core.pipeline.prepare.prepare_studies` and
:func:`finish_study` around an InferenceBackend. Nothing in a study can crash the run: an
error whose policy is FAILURE_ROW becomes that study's Failure row and the next study goes
on; RETRY_LATER and STOP errors propagate to the caller (services/core/errors.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from loguru import logger

from services.core.arrays import ModelInput
from services.core.config import Settings
from services.core.errors import ErrorPolicy, policy_of
from services.core.findings import (
    Thresholds,
    evaluate_findings,
    most_dangerous_finding,
    pathology_flag,
    resolve_thresholds,
)
from services.core.inference.base import InferenceBackend, ModelOutputs
from services.core.model_metadata import ModelMetadata
from services.core.pipeline.events import NO_EVENTS, PipelineEvents
from services.core.pipeline.prepare import (
    PreparedStudy,
    log_name,
    prepare_studies,
    preprocessing_target,
    reason_of_study_error,
)
from services.core.schemas import ModelInfo, ProcessingStatus, StudyReport


def model_info(metadata: ModelMetadata, backend_name: str) -> ModelInfo:
    return ModelInfo(
        version=metadata.model_version,
        demo=metadata.demo,
        backend=backend_name,
        flavour=metadata.flavour,
        weights=[
            {
                "model": weight.model,
                "path": weight.path,
                "sha256": weight.sha256,
                "source": weight.source,
                "source_sha256": weight.source_sha256,
            }
            for weight in metadata.weights
        ],
    )


def finish_study(
    prepared: PreparedStudy,
    outputs: ModelOutputs,
    *,
    metadata: ModelMetadata,
    thresholds: Thresholds,
    backend_name: str,
    inference_seconds: float,
    row: int = 0,
) -> StudyReport:
    """The finished Success report of a prepared study from row ``row`` of the model outputs."""
    report = prepared.report.model_copy(deep=True)
    started = time.perf_counter()
    probability = float(np.clip(outputs.pathology_probability[row], 0.0, 1.0))
    findings = evaluate_findings(
        [float(p) for p in outputs.finding_probabilities[row]],
        metadata.labels,
        thresholds.findings,
        thresholds.not_assessed,
    )
    report.probability_of_pathology = probability
    report.pathology = pathology_flag(probability, thresholds.pathology)
    report.findings = findings
    report.most_dangerous_pathology_type = most_dangerous_finding(findings, metadata.severity_order)
    report.model = model_info(metadata, backend_name)
    report.demo_weights = metadata.demo
    report.embedding = [float(value) for value in outputs.embedding[row]]
    report.processing_status = ProcessingStatus.SUCCESS
    report.failure_reason = None
    stages = dict(prepared.stage_seconds)
    stages["inference"] = round(inference_seconds, 4)
    stages["findings"] = round(time.perf_counter() - started, 4)
    report.stage_seconds = stages
    report.time_of_processing = round(sum(stages.values()), 4)
    return report


def process_input(
    input_path: Path,
    *,
    backend: InferenceBackend,
    settings: Settings,
    display_name: str | None = None,
    events: PipelineEvents = NO_EVENTS,
) -> list[StudyReport]:
    """Every study of one input through the whole pipeline; one report per study (>= 1).

    Raises ThresholdError for thresholds that do not fit the model (a configuration
    error) and ModelServerUnavailable when the model server is unreachable.
    """
    metadata = backend.metadata
    thresholds = resolve_thresholds(metadata, settings.inference)
    target = preprocessing_target(metadata)
    name = display_name or str(input_path)
    reports: list[StudyReport] = []
    for prepared in prepare_studies(
        input_path,
        settings=settings,
        target=target,
        display_name=name,
        events=events,
        body_part_model=backend.body_part_model,
    ):
        report = prepared.report
        if prepared.model_input is not None:
            events.model_input_ready(prepared)
            report = infer_and_finish(prepared, prepared.model_input, backend, thresholds, events)
            prepared.model_input = None  # the 221 MB input is not needed any more
        # Every row says whether this deployment's model is a demo, Failure rows too.
        report.demo_weights = metadata.demo
        logger.info(
            "{} study {}: {} in {:.2f} s",
            log_name(name),
            prepared.index,
            report.processing_status.value,
            report.time_of_processing,
        )
        reports.append(report)
        events.study_finished(report, study_index=prepared.index, n_studies=prepared.n_studies)
    return reports


def infer_and_finish(
    prepared: PreparedStudy,
    model_input: ModelInput,
    backend: InferenceBackend,
    thresholds: Thresholds,
    events: PipelineEvents,
) -> StudyReport:
    started = time.perf_counter()
    index, n_studies = prepared.index, prepared.n_studies
    try:
        events.stage_started("inference", study_index=index, n_studies=n_studies)
        outputs = backend.infer(model_input)
        events.stage_started("findings", study_index=index, n_studies=n_studies)
        return finish_study(
            prepared,
            outputs,
            metadata=backend.metadata,
            thresholds=thresholds,
            backend_name=backend.name,
            inference_seconds=time.perf_counter() - started,
        )
    except Exception as error:
        if policy_of(error) is not ErrorPolicy.FAILURE_ROW:
            raise
        logger.exception("inference failed")
        report = prepared.report.model_copy(deep=True)
        report.failure_reason = f"inference failed: {reason_of_study_error(error)}"
        report.stage_seconds = {
            **prepared.stage_seconds,
            "inference": round(time.perf_counter() - started, 4),
        }
        report.time_of_processing = round(sum(report.stage_seconds.values()), 4)
        return report
