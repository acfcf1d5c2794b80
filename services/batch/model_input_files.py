"""``--save-model-input DIR``: what the models see, as .npy files, to check the input contracts
from outside (docs/ARCHITECTURE.md, "Contracts").

Per study: ``<input name>.npy``, the CT-CLIP model input ``[1, 1, D, H, W]`` (studies that
reach the model), and ``<input name>.bpr.npy``, the body-part regression network input of
**every** slice of the analysed series, ``[k, 1, 128, 128]`` feet to head (every study whose
series was loaded, chest or not; the chest check itself scores only a few of these slices).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from services.core.body_part.bpr_input import bpr_input_all_slices
from services.core.pipeline import PipelineEvents, PreparedStudy
from services.core.volume import Volume

STRIPPED_SUFFIXES = (".zip", ".dcm")
MODEL_INPUT_SUFFIX = ".npy"
BPR_INPUT_SUFFIX = ".bpr.npy"


def model_input_file_name(
    input_name: str, index: int, n_studies: int, suffix: str = MODEL_INPUT_SUFFIX
) -> str:
    """``<input name><suffix>``, with ``_<index>`` when the input holds several studies."""
    stem = Path(input_name).name
    for stripped in STRIPPED_SUFFIXES:
        if stem.lower().endswith(stripped) and len(stem) > len(stripped):
            stem = stem[: -len(stripped)]
    stem = re.sub(r"[^\w.\-]+", "_", stem).strip("._") or "input"
    return f"{stem}_{index}{suffix}" if n_studies > 1 else f"{stem}{suffix}"


class ModelInputSaver(PipelineEvents):
    """Saves each study's model inputs of one input under ``directory``."""

    def __init__(self, directory: Path, input_path: Path) -> None:
        self.directory = Path(directory)
        self.input_name = Path(input_path).name

    def volume_loaded(self, volume: Volume, *, study_index: int, n_studies: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = model_input_file_name(self.input_name, study_index, n_studies, BPR_INPUT_SUFFIX)
        np.save(self.directory / name, bpr_input_all_slices(volume))

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        assert prepared.model_input is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = model_input_file_name(self.input_name, prepared.index, prepared.n_studies)
        np.save(self.directory / name, prepared.model_input)
