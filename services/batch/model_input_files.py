"""``--save-model-input DIR``: every study's model input as a .npy file, to check the
model-input contract from outside (docs/ARCHITECTURE.md, "Contracts")."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from services.core.pipeline import PipelineEvents, PreparedStudy

STRIPPED_SUFFIXES = (".zip", ".dcm")


def model_input_file_name(input_name: str, index: int, n_studies: int) -> str:
    """``<input name>.npy``, with ``_<index>`` when the input holds several studies."""
    stem = Path(input_name).name
    for suffix in STRIPPED_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
    stem = re.sub(r"[^\w.\-]+", "_", stem).strip("._") or "input"
    return f"{stem}_{index}.npy" if n_studies > 1 else f"{stem}.npy"


class ModelInputSaver(PipelineEvents):
    """Saves each study's model input of one input under ``directory``."""

    def __init__(self, directory: Path, input_path: Path) -> None:
        self.directory = Path(directory)
        self.input_name = Path(input_path).name

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        assert prepared.model_input is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = model_input_file_name(self.input_name, prepared.index, prepared.n_studies)
        np.save(self.directory / name, prepared.model_input)
