"""The MLP heads: shapes, probability semantics, strict loading and ONNX parity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from stack_support import PROJECT_ROOT

from convertation.errors import CheckpointError
from convertation.head.export import (
    BINARY_FILE,
    MULTILABEL_FILE,
    export_binary_head_onnx,
    export_multilabel_head_onnx,
)
from convertation.head.heads import (
    N_FINDINGS,
    BinaryHead,
    FindingProbabilities,
    MultilabelHead,
    PathologyProbability,
    build_demo_heads,
    load_binary_head,
    load_multilabel_head,
)
from convertation.onnx_export import run_onnx

TOLERANCE = 1e-5


def embeddings(batch: int, dim: int, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=(batch, dim))
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def demo_heads() -> tuple[BinaryHead, MultilabelHead]:
    return build_demo_heads(512, seed=0)


def test_logit_and_probability_shapes(demo_heads):
    binary, multilabel = demo_heads
    batch = torch.from_numpy(embeddings(4, 512))
    with torch.no_grad():
        assert binary(batch).shape == (4, 2)
        assert multilabel(batch).shape == (4, N_FINDINGS)
        pathology = PathologyProbability(binary)(batch)
        findings = FindingProbabilities(multilabel)(batch)
    assert pathology.shape == (4, 1)
    assert findings.shape == (4, N_FINDINGS)
    assert ((pathology >= 0) & (pathology <= 1)).all()
    assert ((findings >= 0) & (findings <= 1)).all()


def test_probability_of_pathology_is_softmax_index_1():
    head = BinaryHead(8).eval()
    with torch.no_grad():
        last = head.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 3.0]))  # logits favour index 1: "pathology"
        probability = PathologyProbability(head)(torch.zeros(2, 8))
    expected = torch.softmax(torch.tensor([0.0, 3.0]), dim=0)[1]
    torch.testing.assert_close(probability, expected.expand(2, 1))
    assert probability[0, 0] > 0.95


def test_finding_probabilities_are_independent_sigmoids(demo_heads):
    _, multilabel = demo_heads
    batch = torch.from_numpy(embeddings(3, 512, seed=1))
    with torch.no_grad():
        logits = multilabel(batch)
        probabilities = FindingProbabilities(multilabel)(batch)
    torch.testing.assert_close(probabilities, 1 / (1 + torch.exp(-logits)))
    assert not torch.allclose(probabilities.sum(dim=1), torch.ones(3))


@pytest.mark.parametrize("embedding_dim", [512, 32])
def test_onnx_heads_match_torch_with_dynamic_batch(tmp_path, embedding_dim):
    binary, multilabel = build_demo_heads(embedding_dim, seed=5)
    binary_path = export_binary_head_onnx(binary, tmp_path / BINARY_FILE)
    multilabel_path = export_multilabel_head_onnx(multilabel, tmp_path / MULTILABEL_FILE)

    for path, name in [
        (binary_path, "pathology_probability"),
        (multilabel_path, "finding_probabilities"),
    ]:
        graph = onnx.load(str(path)).graph
        assert [value.name for value in graph.input] == ["embedding"]
        assert [value.name for value in graph.output] == [name]
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch

    for batch in (1, 5):
        inputs = embeddings(batch, embedding_dim, seed=batch)
        with torch.no_grad():
            expected_pathology = PathologyProbability(binary)(torch.from_numpy(inputs)).numpy()
            expected_findings = FindingProbabilities(multilabel)(torch.from_numpy(inputs)).numpy()
        (pathology,) = run_onnx(binary_path, {"embedding": inputs})
        (findings,) = run_onnx(multilabel_path, {"embedding": inputs})
        assert pathology.shape == (batch, 1)
        assert findings.shape == (batch, N_FINDINGS)
        np.testing.assert_allclose(pathology, expected_pathology, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(findings, expected_findings, atol=TOLERANCE, rtol=0)


def test_heads_load_strictly_from_their_state_dicts(tmp_path, demo_heads):
    binary, multilabel = demo_heads
    torch.save(binary.state_dict(), tmp_path / "binary.pt")
    torch.save({"state_dict": multilabel.state_dict()}, tmp_path / "multilabel.pt")
    loaded_binary = load_binary_head(tmp_path / "binary.pt")
    loaded_multilabel = load_multilabel_head(tmp_path / "multilabel.pt")
    batch = torch.from_numpy(embeddings(3, 512))
    with torch.no_grad():
        torch.testing.assert_close(loaded_binary(batch), binary(batch))
        torch.testing.assert_close(loaded_multilabel(batch), multilabel(batch))


def test_head_loading_names_the_missing_or_misshapen_key(tmp_path, demo_heads):
    binary, _ = demo_heads
    state = binary.state_dict()
    del state["net.5.running_var"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing key 'net\.5\.running_var'"):
        load_binary_head(tmp_path / "missing.pt")
    torch.save(binary.state_dict(), tmp_path / "binary.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch for key 'net\.0\.weight'"):
        load_binary_head(tmp_path / "binary.pt", embedding_dim=32)


def export_heads_cli(output: Path, binary: Path, multilabel: Path) -> subprocess.CompletedProcess:
    """``python -m convertation.head.export`` of the two state dicts into ``output``."""
    command = [sys.executable, "-m", "convertation.head.export", "--output-dir", str(output)]
    command += ["--binary-head", str(binary), "--multilabel-head", str(multilabel)]
    return subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_head_cli_exports_both_heads_and_refuses_a_bad_file(tmp_path, demo_heads):
    binary, multilabel = demo_heads
    torch.save(binary.state_dict(), tmp_path / "binary.pt")
    torch.save(multilabel.state_dict(), tmp_path / "multilabel.pt")
    ok = export_heads_cli(tmp_path / "out", tmp_path / "binary.pt", tmp_path / "multilabel.pt")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / BINARY_FILE).is_file()
    assert (tmp_path / "out" / MULTILABEL_FILE).is_file()

    # The heads swapped: the multilabel state dict cannot be a binary head.
    swapped = export_heads_cli(tmp_path / "bad", tmp_path / "multilabel.pt", tmp_path / "binary.pt")
    assert swapped.returncode != 0
    assert "shape mismatch for key 'net.0.weight'" in swapped.stderr
