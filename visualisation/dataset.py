"""The persistent FiftyOne dataset: one sample per study, its fields, and the 2-D map of the
embeddings computed with fiftyone.brain.

Re-running with more results adds the studies the dataset does not hold yet (by
``study_key``) and leaves the others as they are; the map is computed again over every
embedding the dataset then holds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fiftyone as fo
import fiftyone.brain as fob
import numpy as np
from loguru import logger

from services.core.reports import finding_column
from visualisation.embedding_map import MapChoice, choose_map, umap_installed
from visualisation.errors import VisualisationInputError
from visualisation.media import write_sample_media
from visualisation.records import StudyRecord, embedding_dimensions

EMBEDDING_FIELD = "embedding"
KEY_FIELD = "study_key"
# Every field a sample has, declared up front so that a field exists (and keeps its type) even
# when no study of a run has a value for it (a run of Failures has no probabilities).
SCALAR_FIELDS: dict[str, type[fo.Field]] = {
    KEY_FIELD: fo.StringField,
    "origin": fo.StringField,
    "name": fo.StringField,
    "source": fo.StringField,
    "path_to_study": fo.StringField,
    "study_uid": fo.StringField,
    "series_uid": fo.StringField,
    "status": fo.StringField,
    "failure_reason": fo.StringField,
    "p_pathology": fo.FloatField,
    "call": fo.StringField,
    "most_dangerous_finding": fo.StringField,
    "n_warnings": fo.IntField,
    "is_chest_ct": fo.BooleanField,
    "chest_check": fo.StringField,
    "model_version": fo.StringField,
    "demo_weights": fo.BooleanField,
    "study_date": fo.StringField,
    "study_description": fo.StringField,
    "time_of_processing": fo.FloatField,
    "ground_truth_pathology": fo.BooleanField,
    "label_source": fo.StringField,
}
STRING_LIST_FIELDS = ("warnings", "positive_findings")
LABEL_FIELDS: dict[str, type[fo.Label]] = {
    "prediction": fo.Classification,  # the call, with P(pathology) as its confidence
    "ground_truth": fo.Classifications,  # findings labelled 1 in the labels CSV
}


@dataclass(frozen=True)
class BuildSummary:
    added: int
    already_present: int
    with_embedding: int  # samples of the whole dataset that have one
    map: MapChoice
    seconds: dict[str, float]  # opening the database, adding the samples, the map


def open_dataset(name: str) -> fo.Dataset:
    """The persistent dataset ``name``, created when it does not exist."""
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    logger.info("created the FiftyOne dataset {}", name)
    return dataset


def declare_fields(dataset: fo.Dataset, finding_labels: Sequence[str]) -> None:
    schema = dataset.get_field_schema()
    wanted: dict[str, tuple[type[fo.Field], dict[str, Any]]] = {
        name: (kind, {}) for name, kind in SCALAR_FIELDS.items()
    }
    wanted.update({name: (fo.FloatField, {}) for name in map(finding_column, finding_labels)})
    wanted.update(
        {name: (fo.ListField, {"subfield": fo.StringField}) for name in STRING_LIST_FIELDS}
    )
    wanted.update(
        {
            name: (fo.EmbeddedDocumentField, {"embedded_doc_type": label})
            for name, label in LABEL_FIELDS.items()
        }
    )
    wanted[EMBEDDING_FIELD] = (fo.VectorField, {})
    for name, (kind, options) in wanted.items():
        if name not in schema:
            dataset.add_sample_field(name, kind, **options)


def _classifications(labels: Sequence[str]) -> fo.Classifications:
    return fo.Classifications(classifications=[fo.Classification(label=label) for label in labels])


def sample_of(record: StudyRecord, media_path: Path) -> fo.Sample:
    fields: dict[str, Any] = {
        KEY_FIELD: record.key,
        "origin": record.origin,
        "name": record.name,
        "source": record.source,
        "path_to_study": record.path_to_study,
        "study_uid": record.study_uid,
        "series_uid": record.series_uid,
        "status": record.status,
        "failure_reason": record.failure_reason,
        "p_pathology": record.probability_of_pathology,
        "call": record.call,
        "most_dangerous_finding": record.most_dangerous_finding,
        "warnings": list(record.warnings),
        "n_warnings": len(record.warnings),
        "positive_findings": list(record.positive_findings),
        "is_chest_ct": record.is_chest_ct,
        "chest_check": record.chest_check,
        "model_version": record.model_version,
        "demo_weights": record.demo_weights,
        "study_date": record.study_date,
        "study_description": record.study_description,
        "time_of_processing": record.time_of_processing,
        "ground_truth_pathology": record.ground_truth_pathology,
        "label_source": record.label_source,
    }
    for label, probability in record.finding_probabilities.items():
        fields[finding_column(label)] = probability
    if record.call is not None:
        fields["prediction"] = fo.Classification(
            label=record.call, confidence=record.probability_of_pathology
        )
    if record.ground_truth is not None:
        fields["ground_truth"] = _classifications(record.ground_truth)
    if record.embedding is not None:
        fields[EMBEDDING_FIELD] = np.asarray(record.embedding, dtype=np.float32)
    return fo.Sample(filepath=str(media_path), **fields)


def _check_dimensions(dataset: fo.Dataset, records: Sequence[StudyRecord]) -> None:
    """One map needs one embedding size: a report of one encoder and a parquet of another
    would be drawn as if comparable."""
    sizes = embedding_dimensions(records)
    view = dataset.exists(EMBEDDING_FIELD)
    if len(view):
        sizes.add(len(view.first()[EMBEDDING_FIELD]))
    if len(sizes) > 1:
        raise VisualisationInputError(
            f"embeddings of different sizes {sorted(sizes)}: one dataset holds the embeddings "
            "of one encoder (use another --dataset for the other)"
        )


def add_records(
    dataset: fo.Dataset, records: Sequence[StudyRecord], media_dir: Path
) -> tuple[int, int]:
    """Adds the records whose key the dataset lacks; (added, already present)."""
    _check_dimensions(dataset, records)
    labels = sorted({label for record in records for label in record.finding_probabilities})
    declare_fields(dataset, labels)
    present = set(dataset.distinct(KEY_FIELD))
    new: dict[str, StudyRecord] = {}
    for record in records:
        if record.key not in present:
            new.setdefault(record.key, record)  # the first of a run's duplicates wins
    samples = [sample_of(record, write_sample_media(record, media_dir)) for record in new.values()]
    if samples:
        dataset.add_samples(samples, progress=False)
    return len(samples), len(records) - len(samples)


def compute_map(dataset: fo.Dataset, requested: str | None) -> MapChoice:
    """The 2-D map of every embedding in the dataset, as the brain run ``embeddings_<method>``
    (an older run of that key is replaced)."""
    view = dataset.exists(EMBEDDING_FIELD)
    choice = choose_map(requested, len(view), umap_available=umap_installed())
    logger.info(choice.note)
    if choice.method is None or choice.brain_key is None:
        return choice
    if dataset.has_brain_run(choice.brain_key):
        dataset.delete_brain_run(choice.brain_key)
    fob.compute_visualization(
        view,
        embeddings=EMBEDDING_FIELD,
        method=choice.method,
        brain_key=choice.brain_key,
        num_dims=2,
        progress=False,
        **choice.parameters,
    )
    return choice


def build_dataset(
    name: str,
    records: Sequence[StudyRecord],
    *,
    media_dir: Path,
    method: str | None,
) -> tuple[fo.Dataset, BuildSummary]:
    clock = time.perf_counter()
    dataset = open_dataset(name)
    seconds = {"database": time.perf_counter() - clock}
    clock = time.perf_counter()
    added, already_present = add_records(dataset, records, media_dir)
    seconds["samples"] = time.perf_counter() - clock
    clock = time.perf_counter()
    choice = compute_map(dataset, method)
    seconds["map"] = time.perf_counter() - clock
    summary = BuildSummary(
        added=added,
        already_present=already_present,
        with_embedding=len(dataset.exists(EMBEDDING_FIELD)),
        map=choice,
        seconds={stage: round(value, 2) for stage, value in seconds.items()},
    )
    return dataset, summary
