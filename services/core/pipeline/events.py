"""What the pipeline tells its caller while it works: stages, model inputs, finished studies.

The pipeline stays the single path from input to report; callers that need more (the
adapter's progress messages and preview images, the batch's saved model inputs) pass a
:class:`PipelineEvents` subclass and override the methods they care about. An event
handler must not raise: what it does is a side show, never a reason to fail a study.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.core.dicom.objects import Series, Study
    from services.core.pipeline.prepare import PreparedStudy
    from services.core.schemas import StudyReport
    from services.core.volume import Volume

# The stages of a study, in order; every report's stage_seconds uses these names.
STAGES: tuple[str, ...] = (
    "intake",
    "headers",
    "selection",
    "volume",
    "chest_check",
    "preprocessing",
    "inference",
    "findings",
)


class PipelineEvents:
    """No-op handlers; subclass and override."""

    def stage_started(self, stage: str, *, study_index: int, n_studies: int) -> None:
        """A stage begins. Input-wide stages (intake, headers) have study_index 0 and
        n_studies 0, because the studies are not known yet."""

    def series_selected(
        self, study: Study, series: Series | None, *, study_index: int, n_studies: int
    ) -> None:
        """A DICOM study's series were weighed; ``series`` is the one to analyse (None: no
        usable series). The study's files can be read until the handler returns (they may
        live in the input's temporary folder). NIfTI studies have no such event."""

    def volume_loaded(self, volume: Volume, *, study_index: int, n_studies: int) -> None:
        """The selected series is in memory (HU), before the chest check: a refused study
        has one too. The volume is shared with the pipeline: read it, never change it, and
        keep no reference (it is hundreds of MB)."""

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        """A study's model input is ready and about to be sent to the model."""

    def study_finished(self, report: StudyReport, *, study_index: int, n_studies: int) -> None:
        """A study's report is final (Success or Failure)."""


NO_EVENTS = PipelineEvents()


class EventFanOut(PipelineEvents):
    """Hands every pipeline event to several handlers, in order (a test checks that each
    PipelineEvents method is forwarded)."""

    def __init__(self, *handlers: PipelineEvents) -> None:
        self.handlers = handlers

    def stage_started(self, stage: str, *, study_index: int, n_studies: int) -> None:
        for handler in self.handlers:
            handler.stage_started(stage, study_index=study_index, n_studies=n_studies)

    def series_selected(
        self, study: Study, series: Series | None, *, study_index: int, n_studies: int
    ) -> None:
        for handler in self.handlers:
            handler.series_selected(study, series, study_index=study_index, n_studies=n_studies)

    def volume_loaded(self, volume: Volume, *, study_index: int, n_studies: int) -> None:
        for handler in self.handlers:
            handler.volume_loaded(volume, study_index=study_index, n_studies=n_studies)

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        for handler in self.handlers:
            handler.model_input_ready(prepared)

    def study_finished(self, report: StudyReport, *, study_index: int, n_studies: int) -> None:
        for handler in self.handlers:
            handler.study_finished(report, study_index=study_index, n_studies=n_studies)


class StageClock:
    """Times named stages and announces each; a failing stage is timed too, and
    ``current`` names it for the failure reason."""

    def __init__(
        self,
        events: PipelineEvents = NO_EVENTS,
        *,
        study_index: int = 0,
        n_studies: int = 0,
        seconds: dict[str, float] | None = None,
    ) -> None:
        self.events = events
        self.study_index = study_index
        self.n_studies = n_studies
        self.seconds: dict[str, float] = dict(seconds or {})
        self.current: str | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
        self.events.stage_started(name, study_index=self.study_index, n_studies=self.n_studies)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 4)

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 4)
