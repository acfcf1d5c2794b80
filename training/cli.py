"""``python -m training {embed,train,evaluate}``: argument parsing and one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

Options = TypeVar("Options")

EMBED_HELP = """Embed a data set with the screening pipeline and the CT-CLIP encoder.

INPUT: a folder (every .nii/.nii.gz anywhere under it is one input; other top-level entries
-- zips, tars, DICOM folders -- are inputs as in `python -m services.batch`) or one file.
Each study becomes a row of OUTPUT.parquet: name (the input's file name), study_uid,
embedding, status, failure_reason, input_path, encoder_version, demo_weights. Resumable:
inputs already in OUTPUT are skipped (--retry-failures runs the failed ones again). With
--ct-rate-metadata, NIfTI files named in that CSV are read as CT-CLIP's own loader reads
them (slope, intercept and spacing from the CSV, affine ignored)."""

TRAIN_HELP = """Train a head on frozen CT-CLIP embeddings.

EMBEDDINGS: parquet with name, embedding (list of floats) and optionally status (rows other
than Success are skipped and counted; without the column every row is used). LABELS: CSV in
the CT-RATE layout, VolumeName + one 0/1 column per finding; rows match by VolumeName == name
(a .nii/.nii.gz suffix on either side is ignored). binary: target = any finding, focal loss
with class-balanced sampling; multilabel: one output per finding column, BCE with per-label
positive weights. Early stopping on the validation AUROC; --trials N > 1 runs a seeded optuna
TPE search whose first trial is the seed design. Every run also fits a linear probe (L2
logistic regression, C chosen per label on validation); --head best (default) keeps the MLP
only when it beats the probe on validation, --head mlp|linear forces one. Writes
RUN_DIR/head.pt, head.json, train.log, split.json, validation.npz and RUN_DIR/linear_probe/."""

EVALUATE_HELP = """Evaluate a trained head with bootstrap 95% CIs, beside the run's linear probe.

Held-out rows: every matched row of EMBEDDINGS whose name is not a training or validation row
in RUN_DIR/split.json. On the training file that leaves the rows of --test-fraction; on
another file (e.g. CT-RATE's validation set) it is every row. Decision thresholds are chosen
on the run's validation rows (Youden's J, or the highest threshold reaching
--target-sensitivity) and written back into RUN_DIR/head.json. The run's linear probe
(RUN_DIR/linear_probe) is evaluated on the same rows: AUROC and AUPRC side by side and the
paired bootstrap difference in AUROC (macro AUROC for multilabel). Writes DIR/metrics.json,
report.md, roc.png, pr.png and predictions.csv."""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train and evaluate the heads on CT-CLIP embeddings (training/README.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser(
        "embed",
        help="embed a data set",
        description=EMBED_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument("input", type=Path, metavar="INPUT")
    embed.add_argument("output", type=Path, metavar="OUTPUT.parquet")
    embed.add_argument("--model-repository", type=Path, help="default: the config's")
    embed.add_argument("--ct-rate-metadata", type=Path, metavar="CSV")
    embed.add_argument("--config", type=Path, help="config file (default: configs/config.yaml)")
    embed.add_argument("--backend", choices=("onnxruntime", "triton"), help="default: the config's")
    embed.add_argument("--retry-failures", action="store_true", help="run failed inputs again")

    train = commands.add_parser(
        "train",
        help="train a head",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--task", choices=("binary", "multilabel"), required=True)
    train.add_argument("--embeddings", type=Path, required=True, metavar="EMBEDDINGS")
    train.add_argument("--labels", type=Path, required=True, metavar="LABELS")
    train.add_argument("--output", type=Path, required=True, metavar="RUN_DIR")
    train.add_argument(
        "--head",
        choices=("best", "mlp", "linear"),
        default="best",
        help="which head to keep: the better on validation (default), the MLP, the linear probe",
    )
    train.add_argument("--trials", type=int, default=1, help="optuna trials (1: seed design only)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--val-fraction",
        dest="validation_fraction",
        type=_fraction,
        default=0.2,
        help="default 0.2",
    )
    train.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.0,
        help="rows held out for `evaluate` on the same file (default 0)",
    )
    train.add_argument("--max-epochs", type=int, default=200)
    train.add_argument("--patience", type=int, default=20, help="epochs without a gain")
    train.add_argument("--batch-size", type=int, default=64)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a trained head",
        description=EVALUATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--run", type=Path, required=True, metavar="RUN_DIR")
    evaluate.add_argument("--embeddings", type=Path, required=True, metavar="EMBEDDINGS")
    evaluate.add_argument("--labels", type=Path, required=True, metavar="LABELS")
    evaluate.add_argument("--output", type=Path, required=True, metavar="DIR")
    evaluate.add_argument("--target-sensitivity", type=float, help="instead of Youden's J")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    return parser


def _options(options_class: Callable[..., Options], args: argparse.Namespace) -> Options:
    """A command's options from its arguments: each argument's dest is the name of an
    option (a field of the command's options class)."""
    names = inspect.signature(options_class).parameters
    return options_class(**{name: getattr(args, name) for name in names})


def _run(args: argparse.Namespace) -> None:
    if args.command == "embed":
        from training.embed import EmbedOptions, embed

        embed(_options(EmbedOptions, args))
    elif args.command == "train":
        from training.train import TrainOptions, train

        train(_options(TrainOptions, args))
    else:
        from training.evaluate import EvaluateOptions, evaluate

        evaluate(_options(EvaluateOptions, args))


def main(argv: list[str] | None = None) -> int:
    """0 on success, 2 with a one-line ``error: ...`` on stderr for unusable input."""
    args = build_parser().parse_args(argv)
    # Checked before torch and pandas are imported: a typo costs no seconds.
    for kind in ("embeddings", "labels"):
        path = getattr(args, kind, None)
        if path is not None and not path.is_file():
            print(f"error: {kind} file not found: {path}", file=sys.stderr)
            return 2
    from convertation.checkpoints import CheckpointError
    from services.core.errors import ScreeningError
    from training.data import TrainingInputError

    try:
        _run(args)
    except (TrainingInputError, CheckpointError, ScreeningError) as error:
        message = str(error).splitlines()[0]
    except ValidationError as error:
        first = error.errors()[0]
        option = "-".join(str(part) for part in first["loc"]).replace("_", "-")
        message = f"--{option}: {first['msg']}"
    else:
        return 0
    print(f"error: {message}", file=sys.stderr)
    return 2
