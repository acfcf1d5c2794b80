"""The configurable head: the seed heads are instances of it, run folders load strictly."""

from __future__ import annotations

import json
import typing

import pytest
import torch
from pydantic import ValidationError

from convertation.checkpoints import CheckpointError, load_strict
from convertation.head.configurable import (
    HEAD_INFO_FILE,
    HEAD_WEIGHTS_FILE,
    SEED_BINARY_ARCHITECTURE,
    SEED_MULTILABEL_ARCHITECTURE,
    Activation,
    ConfigurableHead,
    HeadArchitecture,
    HeadProbabilities,
    HeadRunError,
    HeadRunInfo,
    SplitSizes,
    TrainingProvenance,
    deployed_label_index,
    linear_architecture,
    load_trained_head,
    save_trained_head,
)
from convertation.head.heads import (
    FindingProbabilities,
    PathologyProbability,
    build_demo_heads,
)
from convertation.head.selection import HeadSelection, LinearProbeCandidate, MlpCandidate
from services.core.labels import FINDING_LABELS


def embeddings(batch: int = 5, dim: int = 512) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)


def test_the_seed_heads_are_configurable_heads():
    binary, multilabel = build_demo_heads(512, seed=0)
    seeds = ((binary, SEED_BINARY_ARCHITECTURE), (multilabel, SEED_MULTILABEL_ARCHITECTURE))
    for seed_head, architecture in seeds:
        configurable = ConfigurableHead(architecture).eval()
        assert list(configurable.state_dict()) == list(seed_head.state_dict())
        load_strict(configurable, seed_head.state_dict(), required_prefix="")
        with torch.no_grad():
            torch.testing.assert_close(configurable(embeddings()), seed_head(embeddings()))
    with torch.no_grad():
        binary_probability = HeadProbabilities(ConfigurableHead(SEED_BINARY_ARCHITECTURE).eval())
        load_strict(binary_probability.head, binary.state_dict(), required_prefix="")
        torch.testing.assert_close(
            binary_probability(embeddings()), PathologyProbability(binary)(embeddings())
        )
        findings = HeadProbabilities(ConfigurableHead(SEED_MULTILABEL_ARCHITECTURE).eval())
        load_strict(findings.head, multilabel.state_dict(), required_prefix="")
        torch.testing.assert_close(
            findings(embeddings()), FindingProbabilities(multilabel)(embeddings())
        )


@pytest.mark.parametrize("activation", typing.get_args(Activation))
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_activation_builds_and_runs(activation, batch_norm):
    architecture = HeadArchitecture(
        task="multilabel",
        embedding_dim=16,
        hidden_sizes=(8, 4),
        activation=activation,
        dropout=0.1,
        batch_norm=batch_norm,
        n_outputs=3,
    )
    head = ConfigurableHead(architecture).eval()
    with torch.no_grad():
        probabilities = HeadProbabilities(head)(embeddings(4, 16))
    assert probabilities.shape == (4, 3)
    assert ((probabilities > 0) & (probabilities < 1)).all()
    names = {type(module).__name__ for module in head.net}
    assert ("BatchNorm1d" in names) == batch_norm


def test_architectures_are_validated():
    with pytest.raises(ValidationError, match="a binary head has 2 logits"):
        SEED_BINARY_ARCHITECTURE.model_validate(
            {**SEED_BINARY_ARCHITECTURE.model_dump(), "n_outputs": 3}
        )
    with pytest.raises(ValidationError, match="hidden sizes must be positive"):
        HeadArchitecture.model_validate(
            {**SEED_BINARY_ARCHITECTURE.model_dump(), "hidden_sizes": [64, 0]}
        )
    with pytest.raises(ValidationError, match="activation"):
        HeadArchitecture.model_validate(
            {**SEED_BINARY_ARCHITECTURE.model_dump(), "activation": "swish2"}
        )


def run_info(architecture: HeadArchitecture, labels: list[str]) -> HeadRunInfo:
    return HeadRunInfo(
        task=architecture.task,
        architecture=architecture,
        labels=labels,
        target_findings=[],
        thresholds={label: 0.5 for label in labels},
        threshold_method="youden",
        training=TrainingProvenance(
            embeddings_file="e.parquet",
            embeddings_sha256="0" * 64,
            labels_file="l.csv",
            labels_sha256="0" * 64,
            seed=0,
            validation_fraction=0.2,
            test_fraction=0.0,
            split_sizes=SplitSizes(train=8, validation=2, test=0),
            positives={},
            trials=1,
            best_trial=1,
            hyperparameters={},
            best_epoch=1,
            epochs_run=1,
            torch_version=torch.__version__,
        ),
        validation_metrics={},
    )


@pytest.fixture
def saved_run(tmp_path):
    architecture = SEED_MULTILABEL_ARCHITECTURE.model_copy(update={"n_outputs": 18})
    torch.manual_seed(0)
    head = ConfigurableHead(architecture).eval()
    save_trained_head(tmp_path, head, run_info(architecture, list(FINDING_LABELS[:18])))
    return tmp_path, head


def test_a_saved_run_loads_back_exactly(saved_run):
    run, head = saved_run
    loaded, info = load_trained_head(run)
    assert info.labels == list(FINDING_LABELS[:18])
    assert not loaded.training
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_weights_that_are_not_the_recorded_ones_are_refused(saved_run):
    run, head = saved_run
    state = head.state_dict()
    state["net.0.bias"] = state["net.0.bias"] + 1
    torch.save(state, run / HEAD_WEIGHTS_FILE)
    with pytest.raises(HeadRunError, match=r"head.json records"):
        load_trained_head(run)


def test_an_architecture_that_does_not_fit_the_weights_is_refused(saved_run):
    run, _ = saved_run
    info = json.loads((run / HEAD_INFO_FILE).read_text())
    info["architecture"]["hidden_sizes"] = [512, 256, 64]
    (run / HEAD_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"shape mismatch for key 'net.6.weight'"):
        load_trained_head(run)


def test_a_head_json_with_unknown_or_missing_fields_is_refused(saved_run, tmp_path_factory):
    run, _ = saved_run
    info = json.loads((run / HEAD_INFO_FILE).read_text())
    (run / HEAD_INFO_FILE).write_text(json.dumps({**info, "labelz": []}))
    with pytest.raises(HeadRunError, match="labelz: Extra inputs are not permitted"):
        load_trained_head(run)
    del info["labels"]
    (run / HEAD_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(HeadRunError, match="labels: Field required"):
        load_trained_head(run)
    with pytest.raises(HeadRunError, match=r"head.json not found"):
        load_trained_head(tmp_path_factory.mktemp("empty"))


def test_a_linear_head_is_one_linear_layer():
    """The linear probe's head: binary logits [0, w.x + b] give sigmoid(w.x + b) at index 1."""
    architecture = linear_architecture("binary", 16, 1)
    head = ConfigurableHead(architecture).eval()
    assert list(head.state_dict()) == ["net.0.weight", "net.0.bias"]
    weight = torch.linspace(-1, 1, 16)
    with torch.no_grad():
        head.net[0].weight.copy_(torch.stack([torch.zeros(16), weight]))
        head.net[0].bias.copy_(torch.tensor([0.0, 0.3]))
        probability = HeadProbabilities(head)(embeddings(4, 16))
    expected = torch.sigmoid(embeddings(4, 16) @ weight + 0.3)[:, None]
    torch.testing.assert_close(probability, expected, rtol=0, atol=1e-7)
    multilabel = linear_architecture("multilabel", 16, 3)
    assert multilabel.hidden_sizes == ()
    assert multilabel.n_outputs == 3


def _selection(chosen: str = "mlp", rule: str = "best") -> dict:
    return {
        "rule": rule,
        "chosen": chosen,
        "reason": "test",
        "mlp": MlpCandidate(
            validation_auroc=0.9, hidden_sizes=(8,), trials=1, best_trial=1, best_epoch=3
        ).model_dump(),
        "linear_probe": LinearProbeCandidate(
            validation_auroc=0.8, regularisation_c={"Emphysema": 0.01}
        ).model_dump(),
        "validation_difference": None,
    }


def test_selection_records_are_validated():
    assert HeadSelection.model_validate(_selection()).chosen == "mlp"
    with pytest.raises(ValidationError, match="rule linear must keep the linear probe"):
        HeadSelection.model_validate(_selection(chosen="mlp", rule="linear"))
    with pytest.raises(ValidationError, match="rule mlp must keep the MLP"):
        HeadSelection.model_validate(_selection(chosen="linear_probe", rule="mlp"))
    with pytest.raises(ValidationError, match="no MLP was trained"):
        HeadSelection.model_validate({**_selection(), "mlp": None})


def test_schema_versions_one_and_two_load_others_are_refused(saved_run):
    run, _ = saved_run
    info = json.loads((run / HEAD_INFO_FILE).read_text())
    assert info["schema_version"] == 2
    assert info["selection"] is None
    (run / HEAD_INFO_FILE).write_text(json.dumps({**info, "selection": _selection()}))
    assert load_trained_head(run)[1].selection is not None
    del info["selection"]  # a run folder written before the selection record existed
    (run / HEAD_INFO_FILE).write_text(json.dumps({**info, "schema_version": 1}))
    assert load_trained_head(run)[1].selection is None
    (run / HEAD_INFO_FILE).write_text(
        json.dumps({**info, "schema_version": 1, "selection": _selection()})
    )
    with pytest.raises(HeadRunError, match="schema_version 1 has no selection"):
        load_trained_head(run)
    (run / HEAD_INFO_FILE).write_text(json.dumps({**info, "schema_version": 3}))
    with pytest.raises(HeadRunError, match=r"schema_version 3 is not one of \(1, 2\)"):
        load_trained_head(run)


def test_deployed_label_mapping():
    head_labels = ["Cancer", "Emphysema"]
    index = deployed_label_index(head_labels, FINDING_LABELS, allow_missing=True)
    assert index[FINDING_LABELS.index("Cancer")] == 0
    assert index[FINDING_LABELS.index("Emphysema")] == 1
    assert sorted(set(index)) == [0, 1, 2]  # 2: the fill column
    with pytest.raises(HeadRunError, match="does not know: \\['Pneumothorax'\\]"):
        deployed_label_index(["Pneumothorax"], FINDING_LABELS, allow_missing=True)
    with pytest.raises(HeadRunError, match="lacks 18 deployed labels"):
        deployed_label_index(head_labels, FINDING_LABELS, allow_missing=False)
