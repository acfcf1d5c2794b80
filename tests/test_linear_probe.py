"""The linear probe built into ``training train``, on a *linear* signal with few studies.

`training.synthetic.linear_cohort`: 200 training studies in 512 dimensions whose findings are
noisy linear rules on 8 latent factors. There a linear probe is as good as a head gets and an
MLP can only tie or overfit its validation rows, so whatever ``--head best`` keeps must do
at least as well as the probe on held-out studies (within 0.01 AUROC). The non-linear signal,
where the MLP must be kept and beat the probe, is in ``tests/test_training.py``.

Also: the probe is exactly scikit-learn's logistic regression once exported to ONNX (the
graph the repository builder deploys), ``--head`` forces a head, an embeddings file without
``status`` is read, and a run folder written before the probe existed still loads and
evaluates.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from loguru import logger

from convertation.head.configurable import (
    HEAD_INFO_FILE,
    export_trained_head_onnx,
    load_trained_head,
)
from convertation.head.export import INPUT_NAME
from convertation.onnx_export import run_onnx
from services.core.labels import FINDING_LABELS
from training.cli import main
from training.data import load_matched, read_embeddings
from training.fit import FitData
from training.probe import DEFAULT_C, REGULARISATION_GRID, fit_linear_probe
from training.selection import validation_difference
from training.synthetic import linear_cohort, write_cohort

TRAIN_STUDIES = 200
TEST_STUDIES = 400
SCHEDULE = ("--max-epochs", 60, "--patience", 10)
# The bar: the kept head may trail the probe on held-out rows by at most this much.
PROBE_TOLERANCE = 0.01
PARITY_TOLERANCE = 1e-5
FINDINGS = {"binary": 1, "multilabel": 4}  # one finding keeps the binary target linear


def run_cli(*arguments: object) -> int:
    return main([str(argument) for argument in arguments])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("linear_probe")


@pytest.fixture(scope="module")
def cohorts(workspace: Path) -> dict[str, Path]:
    """Per task, a folder with train/test parquet and labels CSV of the linear signal."""
    folders = {}
    for task, findings in FINDINGS.items():
        folders[task] = workspace / f"cohort_{task}"
        write_cohort(
            folders[task],
            "linear",
            train_studies=TRAIN_STUDIES,
            test_studies=TEST_STUDIES,
            linear_findings=findings,
        )
    return folders


def train(cohort: Path, output: Path, task: str, *extra: object) -> Path:
    code = run_cli(
        "train", "--task", task, "--embeddings", cohort / "train.parquet",
        "--labels", cohort / "train_labels.csv", "--output", output, *SCHEDULE, *extra,
    )  # fmt: skip
    assert code == 0
    return output


def evaluate(run: Path, cohort: Path, output: Path) -> dict:
    code = run_cli(
        "evaluate", "--run", run, "--embeddings", cohort / "test.parquet",
        "--labels", cohort / "test_labels.csv", "--output", output,
    )  # fmt: skip
    assert code == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def best_runs(cohorts: dict[str, Path], workspace: Path) -> dict[str, Path]:
    return {task: train(cohorts[task], workspace / f"best_{task}", task) for task in FINDINGS}


@pytest.fixture(scope="module")
def best_metrics(
    best_runs: dict[str, Path], cohorts: dict[str, Path], workspace: Path
) -> dict[str, dict]:
    return {
        task: evaluate(run, cohorts[task], workspace / f"best_{task}_eval")
        for task, run in best_runs.items()
    }


@pytest.mark.parametrize("task", list(FINDINGS))
def test_linear_signal_the_kept_head_is_not_worse_than_the_probe(
    task: str, best_runs: dict[str, Path], best_metrics: dict[str, dict], capsys
) -> None:
    baseline = best_metrics[task]["baseline"]
    chosen, probe = baseline["chosen"]["auroc"], baseline["linear_probe"]["auroc"]
    difference = baseline["difference_auroc"]
    selection = json.loads((best_runs[task] / HEAD_INFO_FILE).read_text())["selection"]
    with capsys.disabled():
        print(f"\nlinear {task}: kept {baseline['chosen_head']}; validation MLP "
              f"{selection['mlp']['validation_auroc']:.3f}, probe "
              f"{selection['linear_probe']['validation_auroc']:.3f}; held-out chosen "
              f"{chosen['value']:.3f}, probe {probe['value']:.3f}")  # fmt: skip
    assert baseline["chosen_head"] == selection["chosen"]
    assert chosen["value"] >= probe["value"] - PROBE_TOLERANCE
    assert difference["value"] == pytest.approx(chosen["value"] - probe["value"], abs=1e-12)
    if selection["chosen"] == "linear_probe":  # the same head twice: exactly no difference
        assert difference == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
        assert "is the linear probe" in baseline["note"]


def _fit_data(run: Path, cohort: Path, task: str) -> FitData:
    """The training and validation rows of ``run``, rebuilt from its split.json."""
    data = load_matched(cohort / "train.parquet", cohort / "train_labels.csv")
    split = json.loads((run / "split.json").read_text())
    row = {key: index for index, key in enumerate(data.keys)}
    targets = data.labels.max(axis=1) if task == "binary" else data.labels
    train_rows = [row[key] for key in split["train"]]
    validation_rows = [row[key] for key in split["validation"]]
    return FitData(
        task="binary" if task == "binary" else "multilabel",
        train_vectors=data.vectors[train_rows],
        train_targets=targets[train_rows],
        validation_vectors=data.vectors[validation_rows],
        validation_targets=targets[validation_rows],
    )


@pytest.mark.parametrize("task", list(FINDINGS))
def test_the_saved_probe_exported_to_onnx_gives_sklearns_probabilities(
    task: str, best_runs: dict[str, Path], cohorts: dict[str, Path], workspace: Path
) -> None:
    """RUN/linear_probe through the builder's export (multilabel: laid onto the 20 deployed
    labels) reproduces scikit-learn's predict_proba of the regressions fitted on the run's
    rows, within 1e-5."""
    run = best_runs[task]
    probe = fit_linear_probe(_fit_data(run, cohorts[task], task))
    test_vectors, _ = linear_cohort(TEST_STUDIES, seed=2, n_labels=FINDINGS[task])
    expected = probe.sklearn_probabilities(test_vectors)

    head, info = load_trained_head(run / "linear_probe")
    assert info.architecture.hidden_sizes == ()
    deployed = {"deployed_labels": FINDING_LABELS, "missing_label_probability": 0.0}
    graph = export_trained_head_onnx(
        head, info, workspace / f"probe_{task}.onnx", **(deployed if task == "multilabel" else {})
    )
    (exported,) = run_onnx(graph, {INPUT_NAME: test_vectors})
    if task == "multilabel":  # the cohort's findings are the first deployed labels
        assert info.labels == list(FINDING_LABELS[: len(info.labels)])
        assert (exported[:, len(info.labels) :] == 0.0).all()  # not assessed
        exported = exported[:, : len(info.labels)]
    assert exported.shape == expected.shape
    np.testing.assert_allclose(exported, expected, rtol=0, atol=PARITY_TOLERANCE)
    assert 0.05 < expected.mean() < 0.6  # real probabilities, not a constant or saturated

    recorded = json.loads((run / HEAD_INFO_FILE).read_text())["selection"]["linear_probe"]
    assert list(recorded["regularisation_c"].values()) == [p.c for p in probe.label_probes]
    assert all(p.c in REGULARISATION_GRID for p in probe.label_probes)


@pytest.fixture(scope="module")
def forced_runs(cohorts: dict[str, Path], workspace: Path) -> dict[str, Path]:
    cohort = cohorts["binary"]
    return {
        rule: train(cohort, workspace / f"forced_{rule}", "binary", "--head", rule)
        for rule in ("mlp", "linear")
    }


def test_head_mlp_keeps_the_mlp_beside_its_probe(
    forced_runs: dict[str, Path], cohorts: dict[str, Path], workspace: Path
) -> None:
    run = forced_runs["mlp"]
    info = json.loads((run / HEAD_INFO_FILE).read_text())
    assert info["selection"]["rule"] == "mlp"
    assert info["selection"]["chosen"] == "mlp"
    assert info["architecture"]["hidden_sizes"] == [256, 128]  # the seed design
    assert (run / "linear_probe" / "head.pt").is_file()
    metrics = evaluate(run, cohorts["binary"], workspace / "forced_mlp_eval")
    baseline = metrics["baseline"]
    assert baseline["chosen_head"] == "mlp"
    chosen, probe = baseline["chosen"]["auroc"]["value"], baseline["linear_probe"]["auroc"]["value"]
    assert chosen != probe
    assert baseline["difference_auroc"]["value"] == pytest.approx(chosen - probe, abs=1e-12)
    report = (workspace / "forced_mlp_eval" / "report.md").read_text()
    assert "| chosen: MLP |" in report
    assert "(--head mlp)" in report


def test_head_linear_trains_no_mlp_and_deploys_the_probe(
    forced_runs: dict[str, Path], best_runs: dict[str, Path]
) -> None:
    run = forced_runs["linear"]
    info = json.loads((run / HEAD_INFO_FILE).read_text())
    probe_info = json.loads((run / "linear_probe" / HEAD_INFO_FILE).read_text())
    assert info["selection"]["chosen"] == "linear_probe"
    assert info["selection"]["mlp"] is None
    assert info["selection"]["validation_difference"] is None
    assert info["architecture"]["hidden_sizes"] == []
    assert info["weights_sha256"] == probe_info["weights_sha256"]
    log = (run / "train.log").read_text()
    assert "linear probe: validation AUROC" in log
    assert re.search(r"epoch +\d+:", log) is None  # no MLP was trained
    # The same rows and seed as the --head best run: the same probe.
    best_probe = json.loads((best_runs["binary"] / "linear_probe" / HEAD_INFO_FILE).read_text())
    assert probe_info["weights_sha256"] == best_probe["weights_sha256"]


def test_validation_difference_is_a_paired_bootstrap() -> None:
    rng = np.random.default_rng(5)
    targets = (rng.random((150, 1)) < 0.3).astype(np.int8)
    informative = (targets + rng.normal(0, 0.6, targets.shape)).astype(np.float32)
    weak = (targets + rng.normal(0, 3.0, targets.shape)).astype(np.float32)
    better = validation_difference(targets, informative, weak, seed=0)
    assert better.ci_low is not None
    assert better.ci_high is not None
    assert better.ci_low > 0
    same = validation_difference(targets, weak, weak, seed=0)
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    # Paired: the CI of a difference between close heads is narrower than either head's.
    close = (weak + rng.normal(0, 0.3, weak.shape)).astype(np.float32)
    nearby = validation_difference(targets, close, weak, seed=0)
    assert nearby.ci_low is not None
    assert nearby.ci_high is not None
    assert nearby.ci_high - nearby.ci_low < better.ci_high - better.ci_low


def test_embeddings_without_status_are_all_usable(
    cohorts: dict[str, Path], workspace: Path
) -> None:
    cohort = cohorts["binary"]
    table = pq.read_table(cohort / "train.parquet").drop_columns(["status", "failure_reason"])
    bare = workspace / "no_status.parquet"
    pq.write_table(table, bare)
    messages: list[str] = []
    handler = logger.add(messages.append, format="{message}", level="INFO")
    try:
        embeddings = read_embeddings(bare)
    finally:
        logger.remove(handler)
    assert len(embeddings.keys) == TRAIN_STUDIES
    assert embeddings.not_successful == 0
    said = [message for message in messages if "no 'status' column" in message]
    assert len(said) == 1
    assert f"all {TRAIN_STUDIES} rows are read as usable" in said[0]
    run = workspace / "no_status_run"
    code = run_cli(
        "train", "--task", "binary", "--embeddings", bare, "--labels", cohort / "train_labels.csv",
        "--output", run, "--head", "linear",
    )  # fmt: skip
    assert code == 0
    sizes = json.loads((run / HEAD_INFO_FILE).read_text())["training"]["split_sizes"]
    assert sum(sizes.values()) == TRAIN_STUDIES


def test_a_run_from_before_the_probe_loads_and_evaluates(
    best_runs: dict[str, Path], cohorts: dict[str, Path], workspace: Path
) -> None:
    """Schema version 1: no ``selection`` in head.json, no linear_probe folder."""
    run = workspace / "schema_1"
    shutil.copytree(best_runs["binary"], run)
    shutil.rmtree(run / "linear_probe")
    info = json.loads((run / HEAD_INFO_FILE).read_text())
    del info["selection"]
    info["schema_version"] = 1
    (run / HEAD_INFO_FILE).write_text(json.dumps(info))
    _, loaded = load_trained_head(run)
    assert loaded.selection is None
    assert loaded.schema_version == 1
    metrics = evaluate(run, cohorts["binary"], workspace / "schema_1_eval")
    assert metrics["baseline"] is None
    report = (workspace / "schema_1_eval" / "report.md").read_text()
    assert "This run has no linear probe" in report
    assert json.loads((run / HEAD_INFO_FILE).read_text())["schema_version"] == 1


def test_labels_a_split_cannot_fit_or_choose_for():
    """A label without a positive training row gets its smoothed prevalence, one whose
    validation rows hold one class scikit-learn's default C; both as scikit-learn predicts."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    signal = (vectors[:, 0] > 0).astype(np.int8)
    targets = np.column_stack([signal, signal, signal]).astype(np.int8)
    targets[:48, 1] = 0  # no positive among the 48 training rows
    targets[48:, 2] = 0  # no positive among the 12 validation rows
    data = FitData(
        task="multilabel",
        train_vectors=vectors[:48],
        train_targets=targets[:48],
        validation_vectors=vectors[48:],
        validation_targets=targets[48:],
    )
    probe = fit_linear_probe(data)
    assert probe.label_probes[0].c in REGULARISATION_GRID
    assert probe.label_probes[1].c is None
    assert probe.label_probes[2].c == DEFAULT_C
    prevalence = 0.5 / 49  # (0 positives + 1/2) / (48 rows + 1)
    np.testing.assert_allclose(probe.validation_probabilities[:, 1], prevalence, rtol=1e-6)
    np.testing.assert_allclose(
        probe.validation_probabilities,
        probe.sklearn_probabilities(vectors[48:]),
        rtol=0,
        atol=PARITY_TOLERANCE,
    )
