"""Synthetic embeddings with a known signal: for the tests, and to try the commands without data.

Both cohorts draw 8 latent factors ``z`` per study, mix them into 512 dimensions with a fixed
matrix (the same "encoder" for every cohort: `MIXING_SEED`), add as much isotropic noise and
L2-normalise, like CT-CLIP's embeddings. They differ in how the labels depend on ``z``:

* `nonlinear_cohort`: a study is diseased when ``z0 * z1 + 0.5 z2 + noise > 0``, an
  interaction no linear model can represent. Its 18 findings (CT-RATE's columns) are linear
  rules on ``z3..z7`` gated by the disease (a diseased study has at least one, a healthy one
  none); the binary target, any finding, is exactly the disease. An MLP can learn what a
  linear probe cannot.
* `linear_cohort`: every finding is a linear rule on ``z`` plus noise. With few studies in
  512 dimensions a linear probe is as good as it gets; an MLP can only tie or overfit. (With
  several findings the binary target, any finding, is a union of half-spaces: not linear;
  one finding keeps it linear.)

``python -m training.synthetic OUTPUT_DIR --signal linear|nonlinear`` writes
``train.parquet``/``train_labels.csv`` and ``test.parquet``/``test_labels.csv`` in the layout
``python -m training train``/``evaluate`` read (the README's side-by-side table comes from it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from services.core.labels import FINDING_LABELS

EMBEDDING_DIM = 512
LATENT_FACTORS = 8
MIXING_SEED = 7  # the same "encoder" for the training and the test cohort
CT_RATE_LABELS = list(FINDING_LABELS[:18])
LINEAR_LABELS = 4
LINEAR_LABEL_NOISE = 0.7
LINEAR_THRESHOLD = 0.8  # about a quarter of the studies positive per finding
Signal = Literal["linear", "nonlinear"]
Cohort = tuple[NDArray[np.float32], NDArray[np.int8]]


def _embed(z: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.float32]:
    """Latent factors -> unit-norm 512-d vectors through the fixed mixing, plus noise."""
    mixing = np.random.default_rng(MIXING_SEED).normal(size=(LATENT_FACTORS, EMBEDDING_DIM))
    vectors = z @ mixing + rng.normal(size=(len(z), EMBEDDING_DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def nonlinear_cohort(studies: int, seed: int) -> Cohort:
    """Embeddings ``[n, 512]`` and 18 finding labels ``[n, 18]`` gated by an interaction."""
    finding_weights = np.random.default_rng(MIXING_SEED + 1).normal(
        size=(len(CT_RATE_LABELS), LATENT_FACTORS - 3)
    )
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(studies, LATENT_FACTORS))
    diseased = z[:, 0] * z[:, 1] + 0.5 * z[:, 2] + 0.3 * rng.normal(size=studies) > 0
    finding_scores = z[:, 3:] @ finding_weights.T + 0.5 * rng.normal(size=(studies, 18))
    labels = (finding_scores > 1.0) & diseased[:, None]
    labels[np.arange(studies), finding_scores.argmax(axis=1)] |= diseased
    return _embed(z, rng), labels.astype(np.int8)


def linear_cohort(studies: int, seed: int, n_labels: int = LINEAR_LABELS) -> Cohort:
    """Embeddings ``[n, 512]`` and ``n_labels`` findings, each a noisy linear rule on ``z``."""
    directions = np.random.default_rng(MIXING_SEED + 2).normal(size=(n_labels, LATENT_FACTORS))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(studies, LATENT_FACTORS))
    scores = z @ directions.T + LINEAR_LABEL_NOISE * rng.normal(size=(studies, n_labels))
    return _embed(z, rng), (scores > LINEAR_THRESHOLD).astype(np.int8)


def write_embeddings(
    path: Path, names: list[str], vectors: list[NDArray[np.float32] | None], statuses: list[str]
) -> Path:
    """A parquet in the layout of ``python -m training embed`` (status Success or Failure)."""
    table = pa.table(
        {
            "name": names,
            "study_uid": [f"1.2.826.0.1.{index}" for index in range(len(names))],
            "embedding": pa.array(vectors, type=pa.list_(pa.float32())),
            "status": statuses,
            "failure_reason": [None if s == "Success" else "no chest CT" for s in statuses],
        }
    )
    pq.write_table(table, path)
    return path


def write_labels(
    path: Path, names: list[str], labels: NDArray[np.int8], label_names: list[str]
) -> Path:
    """A labels CSV in the CT-RATE layout: VolumeName and one 0/1 column per finding."""
    frame = pd.DataFrame(labels, columns=label_names)
    frame.insert(0, "VolumeName", names)
    frame.to_csv(path, index=False)
    return path


def write_cohort(
    output: Path,
    signal: Signal,
    *,
    train_studies: int,
    test_studies: int,
    linear_findings: int = LINEAR_LABELS,
) -> list[Path]:
    """``train``/``test`` parquet and labels CSV of one cohort in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for part, studies, seed in (("train", train_studies, 1), ("test", test_studies, 2)):
        if signal == "nonlinear":
            vectors, labels = nonlinear_cohort(studies, seed)
        else:
            vectors, labels = linear_cohort(studies, seed, linear_findings)
        names = [f"{part}_{index}.nii.gz" for index in range(studies)]
        label_names = list(FINDING_LABELS[: labels.shape[1]])
        written += [
            write_embeddings(
                output / f"{part}.parquet", names, list(vectors), ["Success"] * studies
            ),
            write_labels(output / f"{part}_labels.csv", names, labels, label_names),
        ]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description="Write a synthetic cohort (train and test embeddings and labels).",
    )
    parser.add_argument("output", type=Path, metavar="OUTPUT_DIR")
    parser.add_argument("--signal", choices=("linear", "nonlinear"), required=True)
    parser.add_argument("--train-studies", type=int, default=600)
    parser.add_argument("--test-studies", type=int, default=400)
    parser.add_argument(
        "--findings",
        type=int,
        default=LINEAR_LABELS,
        help="linear signal: finding columns (1 keeps the binary target, any finding, linear)",
    )
    args = parser.parse_args(argv)
    written = write_cohort(
        args.output,
        args.signal,
        train_studies=args.train_studies,
        test_studies=args.test_studies,
        linear_findings=args.findings,
    )
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
