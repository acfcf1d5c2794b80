"""Training and evaluating the heads on embeddings with a known, learnable signal.

The synthetic cohort (`training.synthetic.nonlinear_cohort`): 8 latent factors ``z`` per
study, mixed into 512 dimensions with as much isotropic noise, then L2-normalised like
CT-CLIP's embeddings. A study is diseased when ``z0 * z1 + 0.5 z2 + noise > 0``: an
interaction, which no linear model can represent, plus a linear part. Its findings (the 18
CT-RATE columns) are linear rules on ``z3..z7``, gated by the disease (a diseased study has at
least one, a healthy one none); the binary target, any finding, is then exactly the disease.
So logistic regression gets the linear part only and an MLP can learn both: the claim "the
head beats logistic regression on held-out data" is true by construction, and the tests check
that training actually gets there (the head's lower 95% CI bound above the baseline's AUROC),
that ``--head best`` keeps the MLP over the run's own linear probe, and that ``evaluate``
shows it beating the probe. The linear signal, where the probe must not lose, is in
``tests/test_linear_probe.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from convertation.head.configurable import (
    HeadRunError,
    export_trained_head_onnx,
    load_trained_head,
)
from convertation.head.export import INPUT_NAME
from convertation.onnx_export import run_onnx
from services.core.labels import FINDING_LABELS
from training.cli import main
from training.data import load_matched
from training.metrics import METRIC_NAMES
from training.synthetic import CT_RATE_LABELS, nonlinear_cohort, write_embeddings
from training.synthetic import write_labels as write_label_table

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Shorter patience than the default 20 keeps the file fast; the heads still converge here.
TEST_SCHEDULE = ("--patience", 10)
TRAIN_STUDIES = 600
TEST_STUDIES = 400
FAILED_ROWS = 4
DUPLICATED_NAME_ROWS = 2
LABELS_WITHOUT_EMBEDDINGS = 3
PARITY_TOLERANCE = 1e-5


def write_labels(path: Path, names: list[str], labels: np.ndarray) -> Path:
    return write_label_table(path, names, labels, CT_RATE_LABELS)


class Cohort:
    def __init__(self, root: Path) -> None:
        self.train_vectors, self.train_labels = nonlinear_cohort(TRAIN_STUDIES, seed=1)
        self.test_vectors, self.test_labels = nonlinear_cohort(TEST_STUDIES, seed=2)
        # Training file: embeddings named *.nii.gz, labels without the suffix; plus rows the
        # reader must skip (failed studies, one name on two rows) and labels without rows.
        names = [f"train_{i}.nii.gz" for i in range(TRAIN_STUDIES)]
        failed = [f"failed_{i}.zip" for i in range(FAILED_ROWS)]
        twice = ["two_studies.zip"] * DUPLICATED_NAME_ROWS
        extra = [list(v) for v in self.test_vectors[:DUPLICATED_NAME_ROWS]]
        self.train_embeddings = write_embeddings(
            root / "train.parquet",
            names + failed + twice,
            list(self.train_vectors) + [None] * FAILED_ROWS + extra,
            ["Success"] * TRAIN_STUDIES + ["Failure"] * FAILED_ROWS + ["Success"] * 2,
        )
        label_names = [name.removesuffix(".nii.gz") for name in names]
        label_names += [f"not_embedded_{i}" for i in range(LABELS_WITHOUT_EMBEDDINGS)]
        extra_labels = np.ones((LABELS_WITHOUT_EMBEDDINGS, 18), dtype=np.int8)
        self.train_csv = write_labels(
            root / "train_labels.csv", label_names, np.vstack([self.train_labels, extra_labels])
        )
        test_names = [f"valid_{i}.nii.gz" for i in range(TEST_STUDIES)]
        self.test_embeddings = write_embeddings(
            root / "test.parquet", test_names, list(self.test_vectors), ["Success"] * TEST_STUDIES
        )
        self.test_csv = write_labels(root / "test_labels.csv", test_names, self.test_labels)

    @property
    def train_any(self) -> np.ndarray:
        return self.train_labels.max(axis=1)

    @property
    def test_any(self) -> np.ndarray:
        return self.test_labels.max(axis=1)


def run_cli(*arguments: object) -> int:
    return main([str(argument) for argument in arguments])


def train_head(cohort: Cohort, output: Path, task: str, *extra: object) -> Path:
    code = run_cli(
        "train", "--task", task, "--embeddings", cohort.train_embeddings,
        "--labels", cohort.train_csv, "--output", output, *TEST_SCHEDULE, *extra,
    )  # fmt: skip
    assert code == 0
    return output


def evaluate_head(run: Path, embeddings: Path, labels: Path, output: Path, *extra) -> dict:
    code = run_cli(
        "evaluate", "--run", run, "--embeddings", embeddings, "--labels", labels,
        "--output", output, *extra,
    )  # fmt: skip
    assert code == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def cohort(workspace) -> Cohort:
    return Cohort(workspace)


@pytest.fixture(scope="module")
def binary_run(cohort, workspace) -> Path:
    return train_head(cohort, workspace / "binary", "binary")


@pytest.fixture(scope="module")
def multilabel_run(cohort, workspace) -> Path:
    return train_head(cohort, workspace / "multilabel", "multilabel")


@pytest.fixture(scope="module")
def binary_metrics(cohort, binary_run, workspace) -> dict:
    return evaluate_head(
        binary_run, cohort.test_embeddings, cohort.test_csv, workspace / "binary_eval"
    )


@pytest.fixture(scope="module")
def multilabel_metrics(cohort, multilabel_run, workspace) -> dict:
    return evaluate_head(
        multilabel_run, cohort.test_embeddings, cohort.test_csv, workspace / "multilabel_eval"
    )


def logistic_auroc(train_x, train_y, test_x, test_y) -> float:
    model = LogisticRegression(solver="liblinear").fit(train_x, train_y)
    return float(roc_auc_score(test_y, model.predict_proba(test_x)[:, 1]))


def test_rows_are_matched_skipped_and_counted(cohort):
    data = load_matched(cohort.train_embeddings, cohort.train_csv)
    report = data.report
    assert report.embedding_rows == TRAIN_STUDIES + FAILED_ROWS + DUPLICATED_NAME_ROWS
    assert report.not_successful == FAILED_ROWS
    assert report.ambiguous_names == DUPLICATED_NAME_ROWS
    assert report.matched == TRAIN_STUDIES  # names with .nii.gz met labels without it
    assert report.labels_without_embeddings == LABELS_WITHOUT_EMBEDDINGS
    assert data.label_names == CT_RATE_LABELS
    np.testing.assert_array_equal(data.labels, cohort.train_labels)
    np.testing.assert_array_equal(data.vectors, cohort.train_vectors)


def test_binary_head_beats_logistic_regression(cohort, binary_metrics, capsys):
    baseline = logistic_auroc(
        cohort.train_vectors, cohort.train_any, cohort.test_vectors, cohort.test_any
    )
    auroc = binary_metrics["auroc"]
    with capsys.disabled():
        print(f"\nbinary held-out AUROC {auroc} vs logistic regression {baseline:.3f}")
    assert binary_metrics["rows"]["held_out"] == TEST_STUDIES
    assert auroc["ci_low"] > baseline


def test_multilabel_head_beats_logistic_regression(cohort, multilabel_metrics, capsys):
    baselines = [
        logistic_auroc(
            cohort.train_vectors,
            cohort.train_labels[:, j],
            cohort.test_vectors,
            cohort.test_labels[:, j],
        )
        for j in range(len(CT_RATE_LABELS))
    ]
    macro = multilabel_metrics["macro_auroc"]
    with capsys.disabled():
        print(f"\nmultilabel held-out macro AUROC {macro} vs logistic regression "
              f"{np.mean(baselines):.3f}")  # fmt: skip
    assert macro["ci_low"] > np.mean(baselines)
    per_label = multilabel_metrics["per_label"]
    assert list(per_label) == CT_RATE_LABELS
    assert multilabel_metrics["auroc"] == macro


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_nonlinear_signal_keeps_the_mlp_and_it_beats_the_linear_probe(task, request, capsys):
    run = request.getfixturevalue(f"{task}_run")
    metrics = request.getfixturevalue(f"{task}_metrics")
    selection = json.loads((run / "head.json").read_text())["selection"]
    assert selection["rule"] == "best"
    assert selection["chosen"] == "mlp"
    assert selection["validation_difference"]["ci_low"] > 0  # the reason it was kept
    baseline = metrics["baseline"]
    assert baseline["chosen_head"] == "mlp"
    assert baseline["chosen"]["auroc"] == metrics["auroc"]  # the top-level (macro) AUROC
    chosen, probe = baseline["chosen"]["auroc"], baseline["linear_probe"]["auroc"]
    difference = baseline["difference_auroc"]
    with capsys.disabled():
        print(f"\n{task} held-out AUROC: chosen MLP {chosen['value']:.3f}, linear probe "
              f"{probe['value']:.3f}, difference {difference}")  # fmt: skip
    assert difference["value"] == pytest.approx(chosen["value"] - probe["value"], abs=1e-12)
    assert difference["ci_low"] > 0
    assert difference["ci_low"] <= difference["value"] <= difference["ci_high"]


def _estimates(metrics: dict) -> list[dict]:
    found = [metrics[name] for name in METRIC_NAMES]
    for label in metrics.get("per_label", {}).values():
        found += [label[name] for name in METRIC_NAMES]
    return found


def test_confidence_intervals_contain_the_point_estimates(binary_metrics, multilabel_metrics):
    estimates = _estimates(binary_metrics) + _estimates(multilabel_metrics)
    assert len(estimates) == len(METRIC_NAMES) * (1 + 1 + 18)
    for estimate in estimates:
        assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"], estimate


def test_evaluation_writes_report_plots_and_thresholds(binary_metrics, binary_run, workspace):
    output = workspace / "binary_eval"
    for picture in ("roc.png", "pr.png"):
        content = (output / picture).read_bytes()
        assert content.startswith(b"\x89PNG")
        assert len(content) > 10_000
    report = (output / "report.md").read_text()
    assert "pathology" in report
    assert f"{binary_metrics['auroc']['value']:.3f}" in report
    head = json.loads((binary_run / "head.json").read_text())
    assert head["threshold_method"] == "youden"
    assert head["thresholds"]["pathology"] == binary_metrics["threshold"]
    predictions = pd.read_csv(output / "predictions.csv")
    assert len(predictions) == TEST_STUDIES
    # The chosen head beside the run's linear probe.
    baseline = binary_metrics["baseline"]
    assert "## Chosen head and linear probe" in report
    assert f"| linear probe | {baseline['linear_probe']['validation_auroc']:.3f} |" in report
    assert f"{baseline['difference_auroc']['value']:+.3f}" in report


def test_target_sensitivity_thresholds_reach_it_on_validation(cohort, binary_run, workspace):
    run = workspace / "binary_sensitivity"
    shutil.copytree(binary_run, run)
    evaluate_head(
        run, cohort.test_embeddings, cohort.test_csv, workspace / "sensitivity_eval",
        "--target-sensitivity", 0.95,
    )  # fmt: skip
    head = json.loads((run / "head.json").read_text())
    assert head["threshold_method"] == "sensitivity>=0.95"
    threshold = head["thresholds"]["pathology"]
    with np.load(run / "validation.npz") as validation:
        positives = validation["probabilities"][validation["targets"][:, 0] == 1, 0]
    assert (positives >= threshold).mean() >= 0.95
    # The highest such threshold: one step up, the sensitivity drops below the target.
    assert (positives > threshold).mean() < 0.95


def test_same_seed_same_run_and_held_out_rows(cohort, workspace):
    first = train_head(cohort, workspace / "seeded_a", "binary", "--test-fraction", 0.2)
    second = train_head(cohort, workspace / "seeded_b", "binary", "--test-fraction", 0.2)
    head_a = json.loads((first / "head.json").read_text())
    head_b = json.loads((second / "head.json").read_text())
    assert head_a["validation_metrics"] == head_b["validation_metrics"]
    assert head_a["weights_sha256"] == head_b["weights_sha256"]
    assert head_a["selection"] == head_b["selection"]
    probes = [
        json.loads((run / "linear_probe" / "head.json").read_text()) for run in (first, second)
    ]
    assert probes[0]["weights_sha256"] == probes[1]["weights_sha256"]
    sizes = head_a["training"]["split_sizes"]
    assert sum(sizes.values()) == TRAIN_STUDIES
    assert abs(sizes["test"] - 0.2 * TRAIN_STUDIES) <= 1  # rounded per class
    # Evaluated on its own training file, only the --test-fraction rows count.
    metrics = evaluate_head(first, cohort.train_embeddings, cohort.train_csv, workspace / "own")
    assert metrics["rows"]["held_out"] == sizes["test"]
    assert metrics["rows"]["used_in_training"] == sizes["train"] + sizes["validation"]


def test_search_with_three_trials(cohort, binary_run, workspace):
    run = train_head(cohort, workspace / "search", "binary", "--trials", 3)
    head = json.loads((run / "head.json").read_text())
    seed_only = json.loads((binary_run / "head.json").read_text())
    mlp, seed_mlp = head["selection"]["mlp"], seed_only["selection"]["mlp"]
    assert mlp["trials"] == 3
    assert 1 <= mlp["best_trial"] <= 3
    # Trial 1 is the seed design with the same seed: the search cannot end below it.
    assert mlp["validation_auroc"] >= seed_mlp["validation_auroc"]
    log = (run / "train.log").read_text()
    assert "trial 3/3 done" in log
    assert "epoch" in log


def _validation_vectors(cohort: Cohort, run: Path) -> np.ndarray:
    with np.load(run / "validation.npz") as validation:
        names = list(validation["names"])
    index = {f"train_{i}": i for i in range(TRAIN_STUDIES)}
    return cohort.train_vectors[[index[name] for name in names]]


def test_exported_heads_give_the_trainers_probabilities(
    cohort, binary_run, multilabel_run, workspace
):
    """The loader + ONNX export reproduce what the trainer computed (validation.npz) and what
    evaluate computed (predictions.csv) within 1e-5, in ONNX Runtime."""
    binary, binary_info = load_trained_head(binary_run)
    path = export_trained_head_onnx(binary, binary_info, workspace / "binary.onnx")
    with np.load(binary_run / "validation.npz") as validation:
        trainer = validation["probabilities"]
    (onnx_validation,) = run_onnx(path, {INPUT_NAME: _validation_vectors(cohort, binary_run)})
    assert onnx_validation.shape == trainer.shape == (len(trainer), 1)
    np.testing.assert_allclose(onnx_validation, trainer, rtol=0, atol=PARITY_TOLERANCE)

    multilabel, multilabel_info = load_trained_head(multilabel_run)
    deployed = export_trained_head_onnx(
        multilabel, multilabel_info, workspace / "multilabel.onnx",
        deployed_labels=FINDING_LABELS, missing_label_probability=0.0,
    )  # fmt: skip
    (onnx_test,) = run_onnx(deployed, {INPUT_NAME: cohort.test_vectors})
    assert onnx_test.shape == (TEST_STUDIES, len(FINDING_LABELS))
    evaluated = pd.read_csv(workspace / "multilabel_eval" / "predictions.csv")
    for j, name in enumerate(CT_RATE_LABELS):
        np.testing.assert_allclose(
            onnx_test[:, j], evaluated[f"probability:{name}"], rtol=0, atol=PARITY_TOLERANCE
        )
    assert (onnx_test[:, 18:] == 0.0).all()  # COVID-19 and Cancer: not in the CT-RATE CSV
    with np.load(multilabel_run / "validation.npz") as validation:
        trainer = validation["probabilities"]
    (onnx_validation,) = run_onnx(
        deployed, {INPUT_NAME: _validation_vectors(cohort, multilabel_run)}
    )
    np.testing.assert_allclose(onnx_validation[:, :18], trainer, rtol=0, atol=PARITY_TOLERANCE)


def test_a_head_without_all_deployed_labels_is_refused_without_a_fill(multilabel_run, workspace):
    head, info = load_trained_head(multilabel_run)
    with pytest.raises(HeadRunError, match=r"lacks 2 deployed labels: \['COVID-19', 'Cancer'\]"):
        export_trained_head_onnx(
            head, info, workspace / "refused.onnx", deployed_labels=FINDING_LABELS
        )
    assert not (workspace / "refused.onnx").exists()


def _one_line_error(capsys, *arguments: object) -> str:
    assert run_cli(*arguments) == 2
    captured = capsys.readouterr().err.strip().splitlines()
    assert len(captured) == 1, captured
    assert captured[0].startswith("error: "), captured
    return captured[0]


def test_missing_column_is_a_one_line_error(cohort, workspace, capsys):
    table = pq.read_table(cohort.test_embeddings).drop_columns(["embedding"])
    pq.write_table(table, workspace / "no_embedding.parquet")
    message = _one_line_error(
        capsys, "train", "--task", "binary", "--embeddings", workspace / "no_embedding.parquet",
        "--labels", cohort.test_csv, "--output", workspace / "never_a",
    )  # fmt: skip
    assert "lacks column(s) ['embedding']" in message


def test_no_matching_labels_is_a_one_line_error(cohort, workspace, capsys):
    message = _one_line_error(
        capsys, "train", "--task", "multilabel", "--embeddings", cohort.test_embeddings,
        "--labels", cohort.train_csv, "--output", workspace / "never_b",
    )  # fmt: skip
    assert "no embedding row matches a VolumeName" in message
    assert not (workspace / "never_b" / "head.json").exists()


def test_single_class_is_a_one_line_error(cohort, workspace, capsys):
    names = [f"valid_{i}" for i in range(TEST_STUDIES)]
    healthy = write_labels(
        workspace / "healthy.csv", names, np.zeros((TEST_STUDIES, 18), dtype=np.int8)
    )
    for task, expected in (("binary", "single class"), ("multilabel", "hold a single class")):
        message = _one_line_error(
            capsys, "train", "--task", task, "--embeddings", cohort.test_embeddings,
            "--labels", healthy, "--output", workspace / f"never_{task}",
        )  # fmt: skip
        assert expected in message


def test_labels_that_are_not_0_or_1_are_a_one_line_error(cohort, workspace, capsys):
    frame = pd.read_csv(cohort.test_csv)
    frame.loc[3, "Emphysema"] = 2
    frame.to_csv(workspace / "bad_values.csv", index=False)
    message = _one_line_error(
        capsys, "train", "--task", "binary", "--embeddings", cohort.test_embeddings,
        "--labels", workspace / "bad_values.csv", "--output", workspace / "never_c",
    )  # fmt: skip
    assert "'Emphysema' holds values other than 0/1" in message


def test_evaluating_only_training_rows_is_a_one_line_error(cohort, binary_run, workspace, capsys):
    message = _one_line_error(
        capsys, "evaluate", "--run", binary_run, "--embeddings", cohort.train_embeddings,
        "--labels", cohort.train_csv, "--output", workspace / "never_d",
    )  # fmt: skip
    assert "no held-out rows" in message


def test_command_line_entry_point_exits_non_zero(cohort, workspace):
    completed = subprocess.run(
        [
            sys.executable, "-m", "training", "train", "--task", "binary",
            "--embeddings", workspace / "missing.parquet", "--labels", cohort.test_csv,
            "--output", workspace / "never_e",
        ],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: embeddings file not found: {workspace / 'missing.parquet'}"
    ]
