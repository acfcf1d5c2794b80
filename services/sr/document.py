"""One study's screening result as a DICOM Comprehensive 3D SR (highdicom, TID 1500).

The document belongs to the screened study: it carries the source images' patient and
study modules unchanged, so a PACS files it next to the images, and it references every
instance of the analysed series (CurrentRequestedProcedureEvidenceSequence and the image
library). Its content tree::

    Imaging Measurement Report (TID 1500)
      observer: the device "chest-ct-screening"; procedure reported: CT Chest (LOINC) for a
      chest CT, else the modality received (an MR refused is reported as MR)
      measurement group "Chest CT screening" (algorithm name and version, TID 4019)
        IMAGE source images: the analysed series' instances
        NUM probability of pathology, NUM its threshold       (Success)
        CODE pathology: Present | Absent                       (the 0/1 call; Success)
        CODE most dangerous finding: a finding | None          (Success)
        CODE demo weights: Yes | No;  CODE processing status: Success | Failure
        TEXT failure reason (Failure);  TEXT notice (demo weights)
      one measurement group per finding (Success):
        NUM probability, NUM threshold, CODE finding present: Present | Absent

UIDs are derived from a caller's key (the task id), the study and the document kind, so
writing the same task's SR again yields the same instance: a PACS that receives it twice
keeps one. A later task of the same study (sent again, late instances) writes a new SR that
names the earlier ones in its Predecessor Documents Sequence: it supersedes them. The
series description states the outcome ("AI chest CT screening: PATHOLOGY P=0.81"), so a PACS
list tells the SRs of a study apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path

import highdicom as hd
from highdicom.sr import CodedConcept
from loguru import logger
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from services.core.config import InferenceSettings
from services.core.findings import resolve_thresholds
from services.core.logging_setup import library_warnings_hidden
from services.core.model_metadata import ModelMetadata
from services.core.outcome import OUTCOME_WORDS, study_outcome
from services.core.reports import DEMO_NOTICE
from services.core.schemas import StudyReport
from services.sr import codes as cts
from services.sr.evidence import StudyEvidence

PRODUCT = "chest-ct-screening"
ALGORITHM_NAME = "chest-ct-screening CT-CLIP"
SERIES_NUMBER = 9901  # high, so that viewers list the AI result after the images
SERIES_DESCRIPTION = "AI chest CT screening"
DEMO_SERIES_SUFFIX = " (DEMO weights)"
SERIES_DESCRIPTION_LENGTH = 64  # LO
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "sr.chest-ct-screening")
MAX_TEXT_CHARACTERS = 10_000  # a TEXT item holds up to 64 KiB; a reason is one paragraph


# The reports written before for a study (by StudyInstanceUID): (task id, report index) of
# each (services/adapter/predecessors.py asks the study registry).
EarlierReports = Callable[[str], Sequence[tuple[str, int]]]


@dataclass(frozen=True)
class DocumentContext:
    """What the SRs of one task share beyond the reports."""

    key: str  # the task id (or a batch run's id): the same key gives the same UIDs
    model_version: str  # the deployment's model version (a Failure row has no ModelInfo)
    pathology_threshold: float | None  # the threshold the 0/1 call was made with
    # Earlier SRs of the same study, which a new one supersedes (none: a first SR).
    earlier_reports: EarlierReports | None = None


def document_context(
    key: str,
    metadata: ModelMetadata,
    inference: InferenceSettings,
    earlier_reports: EarlierReports | None = None,
) -> DocumentContext:
    return DocumentContext(
        key=key,
        model_version=metadata.model_version,
        pathology_threshold=resolve_thresholds(metadata, inference).pathology,
        earlier_reports=earlier_reports,
    )


def series_description(report: StudyReport) -> str:
    """The SR series' name in a PACS list says what came out: the call with P(pathology),
    or that the study was not analysed or failed; and DEMO weights."""
    outcome = study_outcome(report)
    text = f"{SERIES_DESCRIPTION}: {OUTCOME_WORDS[outcome]}"
    if report.succeeded and report.probability_of_pathology is not None:
        text += f" P={report.probability_of_pathology:.2f}"
    if report.demo_weights:
        text += DEMO_SERIES_SUFFIX
    return text[:SERIES_DESCRIPTION_LENGTH]


def procedure_reported(report: StudyReport) -> CodedConcept:
    """CT Chest for what the check found to be one (and what was screened); else the
    modality of what was received (an MR is not reported as a chest CT)."""
    if report.succeeded or (report.chest_check is not None and report.chest_check.is_chest):
        return cts.CT_CHEST
    modality = (report.identity.modality if report.identity else None) or ""
    return cts.MODALITY_PROCEDURES.get(modality.upper(), cts.OTHER_PROCEDURE)


def previous_versions(context: DocumentContext, study_uid: str) -> list[Dataset]:
    """What the Predecessor Documents Sequence names: the earlier SRs of this study (their
    UIDs follow from their task, as this one's do)."""
    if context.earlier_reports is None:
        return []
    versions = []
    for task_id, index in context.earlier_reports(study_uid):
        if task_id == context.key:
            continue
        item = Dataset()
        item.SOPClassUID = Comprehensive3DSRStorage
        item.SOPInstanceUID = document_uid(task_id, study_uid, f"instance:{index + 1}")
        item.StudyInstanceUID = study_uid
        item.SeriesInstanceUID = document_uid(task_id, study_uid, "series")
        versions.append(item)
    return versions


def product_version() -> str:
    try:
        return package_metadata.version(PRODUCT)
    except package_metadata.PackageNotFoundError:
        return "unknown"


def document_uid(key: str, study_uid: str, part: str) -> str:
    """A UID that is the same for the same task, study and part ("series", "instance", ...):
    a name-based UUID under the 2.25 root (PS3.5 B.2)."""
    name = "\0".join((key, study_uid, part))
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def _algorithm(report: StudyReport, context: DocumentContext) -> hd.sr.AlgorithmIdentification:
    version = report.model.version if report.model is not None else context.model_version
    parameters = [f"demo weights: {'yes' if report.demo_weights else 'no'}"]
    if report.model is not None:
        parameters.append(f"backend: {report.model.backend} ({report.model.flavour} flavour)")
    return hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=version or "unknown", parameters=parameters
    )


def _probability(name: CodedConcept, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=cts.PROBABILITY_UNIT)


def _present(flag: bool) -> CodedConcept:
    return cts.PRESENT if flag else cts.ABSENT


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,
        value=value[:MAX_TEXT_CHARACTERS],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _tracking(key: str, study_uid: str, identifier: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=document_uid(key, study_uid, f"group:{identifier}"), identifier=identifier[:64]
    )


def _screening_group(
    report: StudyReport,
    algorithm: hd.sr.AlgorithmIdentification,
    context: DocumentContext,
    skeleton: DocumentSkeleton,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The screening's result; its source images are the analysed series' instances."""
    measurements: list[hd.sr.Measurement] = []
    evaluations = [
        hd.sr.QualitativeEvaluation(cts.DEMO_WEIGHTS, cts.YES if report.demo_weights else cts.NO),
        hd.sr.QualitativeEvaluation(
            cts.PROCESSING_STATUS, cts.SUCCESS if report.succeeded else cts.FAILURE
        ),
    ]
    if report.succeeded and report.probability_of_pathology is not None:
        measurements.append(
            _probability(cts.PROBABILITY_OF_PATHOLOGY, report.probability_of_pathology)
        )
        if context.pathology_threshold is not None:
            measurements.append(_probability(cts.PATHOLOGY_THRESHOLD, context.pathology_threshold))
        evaluations.insert(
            0, hd.sr.QualitativeEvaluation(cts.PATHOLOGY_CALL, _present(bool(report.pathology)))
        )
        dangerous = report.most_dangerous_pathology_type
        evaluations.insert(
            1,
            hd.sr.QualitativeEvaluation(
                cts.MOST_DANGEROUS_FINDING,
                cts.finding_code(dangerous) if dangerous else cts.NONE,
            ),
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(context.key, skeleton.evidence.study_uid, "screening"),
        finding_type=cts.SCREENING,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    content = group[0].ContentSequence
    # Where highdicom puts source images (after the evaluations); made with the skeleton.
    content.extend(skeleton.source_images)
    if not report.succeeded:
        content.append(_text(cts.FAILURE_REASON, report.failure_reason or "unknown reason"))
    if report.demo_weights:
        content.append(_text(cts.NOTICE, DEMO_NOTICE))
    return group


def _finding_groups(
    report: StudyReport, algorithm: hd.sr.AlgorithmIdentification, key: str, study_uid: str
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(key, study_uid, f"finding:{finding.label}"),
            finding_type=cts.finding_code(finding.label),
            algorithm_id=algorithm,
            measurements=[
                _probability(cts.FINDING_PROBABILITY, finding.probability),
                _probability(cts.FINDING_THRESHOLD, finding.threshold),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(cts.FINDING_CALL, _present(finding.positive))
            ],
        )
        for finding in report.findings
    ]


@dataclass(frozen=True)
class DocumentSkeleton:
    """An SR made before the model answers: the study's patient and study modules, its
    evidence and the screening group's source images. None of them depends on the result,
    so the adapter makes them while the model request is in flight (with the evidence read
    from the hand-off: 0.14 s for 300 instances); complete_structured_report adds the result
    (0.06 s) and writing the file takes 0.13 s."""

    document: hd.sr.Comprehensive3DSR
    evidence: StudyEvidence
    source_images: tuple[hd.sr.SourceImageForMeasurementGroup, ...]


def _observation_context() -> hd.sr.ObservationContext:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=document_uid(PRODUCT, "device", "observer"),
            name=PRODUCT,
            manufacturer_name=PRODUCT,
            model_name=ALGORITHM_NAME,
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def structured_report_skeleton(
    evidence: StudyEvidence, context: DocumentContext, *, instance_number: int = 1
) -> DocumentSkeleton:
    """The parts of a study's SR that do not depend on its result (``context.key`` makes its
    UIDs reproducible); its content tree is a placeholder until it is completed."""
    key = context.key
    study_uid = evidence.study_uid
    source_images = tuple(
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=instance.SOPClassUID,
            referenced_sop_instance_uid=instance.SOPInstanceUID,
        )
        for instance in evidence.instances
    )
    # Without the source images: highdicom copies and parses the content it is given, which
    # with 300 of them took half the SR's time. The evidence sequences are made from
    # ``evidence`` alone, so they are the same.
    placeholder = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=cts.CT_CHEST,
        imaging_measurements=[
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(key, study_uid, "screening"),
                finding_type=cts.SCREENING,
            )
        ],
    )
    earlier = previous_versions(context, study_uid)
    # highdicom warns about odd source values (a one-part PatientName) by quoting them:
    # patient data must not reach the logs, and the values are the PACS's to keep.
    with library_warnings_hidden():
        document = hd.sr.Comprehensive3DSR(
            evidence=list(evidence.instances),
            content=placeholder[0],
            series_instance_uid=document_uid(key, study_uid, "series"),
            series_number=SERIES_NUMBER,
            sop_instance_uid=document_uid(key, study_uid, f"instance:{instance_number}"),
            instance_number=instance_number,
            manufacturer=PRODUCT,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=product_version(),
            series_description=SERIES_DESCRIPTION,
            is_complete=True,
            is_final=False,  # a machine's preliminary result until a radiologist verifies it
            is_verified=False,
            previous_versions=earlier or None,
        )
    document.CodingSchemeIdentificationSequence = [cts.coding_scheme_identification()]
    return DocumentSkeleton(document=document, evidence=evidence, source_images=source_images)


def complete_structured_report(
    skeleton: DocumentSkeleton, report: StudyReport, context: DocumentContext
) -> Dataset:
    """The skeleton's SR with ``report``'s result, for writing: the content tree is made
    again around the skeleton's source images (its measurement groups, procedure and
    algorithm: milliseconds), and the series description says the outcome. The evidence is
    the skeleton's: the result references no other instance. A skeleton is completed once;
    highdicom's parsed copy of the content (``.content``) stays the placeholder's."""
    algorithm = _algorithm(report, context)
    groups = [_screening_group(report, algorithm, context, skeleton)]
    if report.succeeded:
        groups.extend(_finding_groups(report, algorithm, context.key, skeleton.evidence.study_uid))
    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=procedure_reported(report),
        imaging_measurements=groups,
    )
    document = skeleton.document
    for tag, value in content[0].items():  # the root container, as Comprehensive3DSR takes it
        document[tag] = value
    document.SeriesDescription = series_description(report)
    return document


def build_structured_report(
    report: StudyReport,
    evidence: StudyEvidence,
    context: DocumentContext,
    *,
    instance_number: int = 1,
) -> Dataset:
    """The SR of one study's report; ``context.key`` makes its UIDs reproducible."""
    skeleton = structured_report_skeleton(evidence, context, instance_number=instance_number)
    return complete_structured_report(skeleton, report, context)


def sr_file_name(index: int, evidence: StudyEvidence) -> str:
    """``study_0001_<hash>.dcm``: numbered like the JSON reports, no patient data."""
    return f"study_{index:04d}_{document_uid('name', evidence.study_uid, 'file')[-12:]}.dcm"


def write_structured_reports(
    studies: Sequence[tuple[StudyReport, StudyEvidence | None]],
    folder: Path,
    context: DocumentContext,
    skeletons: Mapping[int, DocumentSkeleton] | None = None,
) -> list[Path]:
    """One SR file per study that has DICOM evidence (NIfTI studies and inputs without a
    study have none); the paths written. ``skeletons`` by position in ``studies`` (from 1):
    made before from the same evidence, each of them used once."""
    written: list[Path] = []
    for index, (report, evidence) in enumerate(studies, start=1):
        if evidence is None:
            continue
        skeleton = (skeletons or {}).get(index)
        if (
            skeleton is None
            or skeleton.evidence is not evidence  # made for another study
            or skeleton.document.InstanceNumber != index  # or at another place
        ):
            skeleton = structured_report_skeleton(evidence, context, instance_number=index)
        document = complete_structured_report(skeleton, report, context)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / sr_file_name(index, evidence)
        document.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# A skeleton made on a thread: some makers give None for a study without DICOM evidence.
SkeletonFuture = Future[DocumentSkeleton] | Future[DocumentSkeleton | None]


def skeletons_made(futures: Mapping[int, SkeletonFuture]) -> dict[int, DocumentSkeleton]:
    """The skeletons made early, by position, for ``write_structured_reports``: one whose
    making failed is left out, so that it is made again there, where its error is reported."""
    made: dict[int, DocumentSkeleton] = {}
    for position, future in futures.items():
        try:
            skeleton = future.result()
        except Exception as error:  # noqa: BLE001 - made again when written, or reported there
            logger.warning("SR skeleton {} not made early: {}", position, type(error).__name__)
            continue
        if skeleton is not None:
            made[position] = skeleton
    return made
