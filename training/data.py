"""Reading the embeddings parquet and the CT-RATE labels CSV, matching them, splitting them.

Embeddings (``python -m training embed``): one row per study with ``name`` (the input's file
name), ``study_uid``, ``embedding`` (list of floats), ``status`` and ``failure_reason``. Rows
whose status is not ``Success`` are skipped and counted; so are names that occur on more than
one successful row (an input holding several studies: which one a label means is unknown).
Only ``name`` and ``embedding`` are required: a file made by another tool (e.g. CT-CLIP's own
embedding export) may lack ``status``, and then every row is read as usable (said once in the
log).

Labels (docs/ARCHITECTURE.md, Contracts): ``VolumeName`` and one 0/1 column per finding. A row matches
an embedding when ``VolumeName`` equals ``name`` once a ``.nii.gz``/``.nii`` suffix is removed
from both, so either side may carry the suffix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from loguru import logger
from numpy.typing import NDArray
from pydantic import BaseModel

Read = TypeVar("Read")

REQUIRED_EMBEDDING_COLUMNS = ("name", "embedding")
STATUS_COLUMN = "status"
SUCCESS_STATUS = "Success"
LABEL_KEY_COLUMN = "VolumeName"
VOLUME_SUFFIXES = (".nii.gz", ".nii")


class TrainingInputError(Exception):
    """Input the trainer or the evaluator cannot use; the message is one line for the user."""


def volume_key(name: str) -> str:
    """The name an embedding row and a label row are matched by (no NIfTI suffix)."""
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class EmbeddingTable:
    keys: list[str]
    vectors: NDArray[np.float32]  # [n, dim]
    rows: int
    not_successful: int
    ambiguous: int


@dataclass(frozen=True)
class LabelTable:
    keys: list[str]
    label_names: list[str]
    values: NDArray[np.int8]  # [n, labels]


class MatchReport(BaseModel):
    embedding_rows: int
    not_successful: int
    ambiguous_names: int
    matched: int
    embeddings_without_labels: int
    labels_without_embeddings: int


@dataclass(frozen=True)
class MatchedData:
    keys: list[str]
    vectors: NDArray[np.float32]  # [n, dim]
    label_names: list[str]
    labels: NDArray[np.int8]  # [n, labels]
    report: MatchReport
    unmatched_embedding_keys: list[str]
    unmatched_label_keys: list[str]


def _read_input(
    path: Path,
    kind: str,
    read: Callable[[Path], Read],
    unreadable: tuple[type[Exception], ...],
    what: str,
) -> tuple[Path, Read]:
    """``read(path)`` of a file the user named: missing (which ``kind``) or unreadable (as
    ``what``), a one-line TrainingInputError."""
    path = Path(path)
    if not path.is_file():
        raise TrainingInputError(f"{kind} file not found: {path}")
    try:
        return path, read(path)
    except unreadable as error:
        raise TrainingInputError(f"{path.name} is not a readable {what}: {error}") from error


def read_embeddings(path: Path) -> EmbeddingTable:
    path, schema = _read_input(
        path, "embeddings", pq.read_schema, (pa.ArrowInvalid, OSError), "parquet file"
    )
    missing = [column for column in REQUIRED_EMBEDDING_COLUMNS if column not in schema.names]
    if missing:
        raise TrainingInputError(
            f"{path.name} lacks column(s) {missing} (has {schema.names}; "
            f"expected {list(REQUIRED_EMBEDDING_COLUMNS)})"
        )
    has_status = STATUS_COLUMN in schema.names
    columns = [*REQUIRED_EMBEDDING_COLUMNS, *([STATUS_COLUMN] if has_status else [])]
    table = pq.read_table(path, columns=columns)
    if has_status:
        successful = table.filter(pc.equal(table[STATUS_COLUMN], SUCCESS_STATUS))
    else:
        logger.info(
            "{} has no {!r} column: all {} rows are read as usable",
            path.name,
            STATUS_COLUMN,
            table.num_rows,
        )
        successful = table
    names = [str(name) for name in successful["name"].to_pylist()]
    counts = Counter(volume_key(name) for name in names)
    keep = [counts[volume_key(name)] == 1 for name in names]
    unique = successful.filter(pa.array(keep, type=pa.bool_()))
    vectors = _embedding_matrix(unique["embedding"], path.name)
    return EmbeddingTable(
        keys=[volume_key(str(name)) for name in unique["name"].to_pylist()],
        vectors=vectors,
        rows=table.num_rows,
        not_successful=table.num_rows - successful.num_rows,
        ambiguous=len(names) - unique.num_rows,
    )


def _embedding_matrix(column: pa.ChunkedArray, file_name: str) -> NDArray[np.float32]:
    if column.null_count:
        raise TrainingInputError(
            f"{file_name}: {column.null_count} successful rows lack an embedding"
        )
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    list_types = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if not any(is_type(column.type) for is_type in list_types):
        raise TrainingInputError(f"{file_name}: column 'embedding' is {column.type}, not a list")
    combined = column.combine_chunks()
    lengths = pc.list_value_length(combined).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max() or lengths.min() == 0:
        raise TrainingInputError(
            f"{file_name}: embeddings have lengths {lengths.min()}..{lengths.max()}; "
            "all must have the same positive length"
        )
    flat = pc.list_flatten(combined).to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = flat.reshape(len(lengths), int(lengths[0]))
    if not np.isfinite(vectors).all():
        raise TrainingInputError(f"{file_name}: an embedding holds NaN or infinity")
    return vectors


def read_labels(path: Path) -> LabelTable:
    csv_errors = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError)
    path, frame = _read_input(path, "labels", pd.read_csv, csv_errors, "CSV")
    if LABEL_KEY_COLUMN not in frame.columns:
        raise TrainingInputError(
            f"{path.name} lacks column {LABEL_KEY_COLUMN!r} (CT-RATE layout: "
            f"{LABEL_KEY_COLUMN} and one 0/1 column per finding)"
        )
    label_names = [str(column) for column in frame.columns if column != LABEL_KEY_COLUMN]
    if not label_names:
        raise TrainingInputError(f"{path.name} has no finding column besides {LABEL_KEY_COLUMN}")
    for name in label_names:
        values = pd.to_numeric(frame[name], errors="coerce")
        if values.isna().any() or not values.isin([0, 1]).all():
            raise TrainingInputError(f"{path.name}: column {name!r} holds values other than 0/1")
    keys = [volume_key(str(name)) for name in frame[LABEL_KEY_COLUMN]]
    duplicates = [key for key, count in Counter(keys).items() if count > 1]
    if duplicates:
        raise TrainingInputError(
            f"{path.name}: {len(duplicates)} {LABEL_KEY_COLUMN} values occur more than once"
        )
    values = frame[label_names].apply(pd.to_numeric).to_numpy().astype(np.int8)
    return LabelTable(keys=keys, label_names=label_names, values=values)


def match(embeddings: EmbeddingTable, labels: LabelTable) -> MatchedData:
    """Embedding rows with their label rows, in the embeddings file's order."""
    label_row = {key: index for index, key in enumerate(labels.keys)}
    embedding_keys = set(embeddings.keys)
    matched = [index for index, key in enumerate(embeddings.keys) if key in label_row]
    unmatched_embeddings = [key for key in embeddings.keys if key not in label_row]
    unmatched_labels = [key for key in labels.keys if key not in embedding_keys]
    if not matched:
        raise TrainingInputError(
            f"no embedding row matches a {LABEL_KEY_COLUMN} ({len(embeddings.keys)} usable "
            f"embedding rows, {len(labels.keys)} label rows; .nii/.nii.gz suffixes are ignored)"
        )
    keys = [embeddings.keys[index] for index in matched]
    report = MatchReport(
        embedding_rows=embeddings.rows,
        not_successful=embeddings.not_successful,
        ambiguous_names=embeddings.ambiguous,
        matched=len(matched),
        embeddings_without_labels=len(unmatched_embeddings),
        labels_without_embeddings=len(unmatched_labels),
    )
    return MatchedData(
        keys=keys,
        vectors=embeddings.vectors[matched],
        label_names=labels.label_names,
        labels=labels.values[[label_row[key] for key in keys]],
        report=report,
        unmatched_embedding_keys=unmatched_embeddings,
        unmatched_label_keys=unmatched_labels,
    )


def load_matched(embeddings_path: Path, labels_path: Path) -> MatchedData:
    return match(read_embeddings(embeddings_path), read_labels(labels_path))


def any_finding(labels: NDArray[np.int8]) -> NDArray[np.int8]:
    """The binary target of docs/ARCHITECTURE.md, Contracts: pathology when any finding is 1."""
    return (labels.max(axis=1) > 0).astype(np.int8)


@dataclass(frozen=True)
class Split:
    train: NDArray[np.int64]  # row indices
    validation: NDArray[np.int64]
    test: NDArray[np.int64]


def stratified_split(
    strata: NDArray[np.int8], *, validation_fraction: float, test_fraction: float, seed: int
) -> Split:
    """Row indices per part, each class of ``strata`` divided in the same proportions."""
    if not 0 < validation_fraction < 1 or not 0 <= test_fraction < 1:
        raise TrainingInputError("--val-fraction must be in (0, 1) and --test-fraction in [0, 1)")
    if validation_fraction + test_fraction >= 1:
        raise TrainingInputError("--val-fraction plus --test-fraction must stay below 1")
    generator = np.random.default_rng(seed)
    parts: dict[str, list[NDArray[np.int64]]] = {"train": [], "validation": [], "test": []}
    for value in np.unique(strata):
        rows = generator.permutation(np.flatnonzero(strata == value))
        n_test = round(len(rows) * test_fraction)
        n_validation = round(len(rows) * validation_fraction)
        parts["test"].append(rows[:n_test])
        parts["validation"].append(rows[n_test : n_test + n_validation])
        parts["train"].append(rows[n_test + n_validation :])
    joined = {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
    return Split(train=joined["train"], validation=joined["validation"], test=joined["test"])
