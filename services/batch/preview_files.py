"""The batch's preview images: what the model saw of each study, beside the JSON reports.

For every study that reaches the model the batch writes ``OUTPUT_DIR/previews/<key>_axial.png``
(the mid-axial slice) and ``<key>_coronal.png`` (the mid-coronal view, in true proportions) of
the model input, ``key`` being the hash in the study's JSON file name. ``python -m
visualisation`` uses them as the media of a study's sample. A study refused before the model
(not a chest, broken data) has none.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from services.core.pipeline import PipelineEvents, PreparedStudy
from services.core.previews import write_study_previews
from services.core.reports import study_file_key

PREVIEWS_DIR_NAME = "previews"


class PreviewWriter(PipelineEvents):
    """Writes the two previews of each study's model input into ``directory``."""

    def __init__(self, directory: Path, *, spacing_mm: tuple[float, float, float]) -> None:
        self.directory = Path(directory)
        self.spacing_mm = spacing_mm

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        if prepared.model_input is None:
            return
        try:
            write_study_previews(
                prepared.model_input,
                self.spacing_mm,
                self.directory,
                study_file_key(prepared.report),
            )
        except (OSError, ValueError) as error:  # a preview never fails a study
            logger.warning("preview of study {} not written: {}", prepared.index + 1, error)
