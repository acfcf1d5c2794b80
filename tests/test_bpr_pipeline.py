"""Body-part regression inside the pipeline, with the tiny demo repository (which serves demo
BPR weights): every real fixture keeps the outcome and reason it has without BPR, the demo
evidence is in the report, and ``--save-model-input`` writes the BPR network input of every
slice, checked against the shared reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.batch.model_input_files import ModelInputSaver
from services.core.config import InferenceSettings, Settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.pipeline import process_input

CHEST = "chest_ct_lung_dx_a0002"
HEAD = "head_ct_gantry_tilt"
# The contract's tolerance for the BPR input (issue 10: within 1e-3 of the reference).
BPR_INPUT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def backend(tiny_model_repository: Path) -> Iterator[OnnxRuntimeBackend]:
    backend = OnnxRuntimeBackend(tiny_model_repository, InferenceSettings(onnx_intra_op_threads=1))
    assert backend.body_part_model is not None
    assert backend.body_part_model.demo
    yield backend
    backend.close()


@pytest.mark.slow
def test_every_fixture_keeps_its_outcome_with_demo_bpr(
    fixtures_dir: Path, backend: OnnxRuntimeBackend
) -> None:
    with_bpr = Settings()
    without_bpr = Settings()
    without_bpr.chest_check.body_part_regression = False
    checked = 0
    for folder in sorted(p for p in fixtures_dir.iterdir() if p.is_dir()):
        on = process_input(folder, backend=backend, settings=with_bpr)
        off = process_input(folder, backend=backend, settings=without_bpr)
        assert len(on) == len(off), folder.name
        for got, want in zip(on, off, strict=True):
            assert (got.processing_status, got.failure_reason) == (
                want.processing_status,
                want.failure_reason,
            ), folder.name
            if want.chest_check is None:  # refused before the chest check
                assert got.chest_check is None
                continue
            assert got.chest_check is not None
            assert (got.chest_check.is_chest, got.chest_check.reason) == (
                want.chest_check.is_chest,
                want.chest_check.reason,
            )
            regression = got.chest_check.body_part_regression
            assert regression is not None, folder.name
            assert regression.demo, folder.name
            assert not got.chest_check.body_part_regression_decides
            assert want.chest_check.body_part_regression is None
            # Demo BPR is information in the chest check, not a data-quality warning: the
            # warnings are the same with and without it.
            assert not [w for w in got.warnings if "body-part regression" in w]
            assert regression.summary
            assert got.warnings == want.warnings
            checked += 1
    # Chest, head and abdomen reach the chest check; MR and scout are refused before a volume
    # is read, the duplicate-positions series when its volume is built.
    assert checked == 3


def test_saved_bpr_input_is_every_slice_feet_to_head(
    fixtures_dir: Path, backend: OnnxRuntimeBackend, reference_dir: Path, tmp_path: Path
) -> None:
    for name in (CHEST, HEAD):
        process_input(
            fixtures_dir / name,
            backend=backend,
            settings=Settings(),
            events=ModelInputSaver(tmp_path, fixtures_dir / name),
        )
    saved = np.load(tmp_path / f"{CHEST}.bpr.npy")
    reference = np.load(reference_dir / "bpr_preprocess_chest_ct_lung_dx.npz")["bpr_input"]
    assert saved.shape == reference.shape == (30, 1, 128, 128)
    assert saved.dtype == np.float32
    assert float(np.max(np.abs(saved - reference))) <= BPR_INPUT_TOLERANCE
    assert (tmp_path / f"{CHEST}.npy").is_file()
    # A refused study has no model input, but its analysed series has a BPR input.
    head = np.load(tmp_path / f"{HEAD}.bpr.npy")
    assert head.shape[1:] == (1, 128, 128)
    # [-1, 1] up to float32 rounding of the blur and resize weights.
    assert head.min() >= -1.0 - 1e-6
    assert head.max() <= 1.0 + 1e-6
    assert not (tmp_path / f"{HEAD}.npy").exists()
