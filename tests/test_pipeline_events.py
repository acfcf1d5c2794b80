"""EventFanOut hands every PipelineEvents event, with its arguments, to each handler in order."""

from __future__ import annotations

import inspect
from typing import Any

from services.core.pipeline import EventFanOut, PipelineEvents

EVENTS = sorted(
    name
    for name, member in inspect.getmembers(PipelineEvents, inspect.isfunction)
    if not name.startswith("_")
)


class Recorder(PipelineEvents):
    """Records (its name, event, arguments) for every event, whatever its signature."""

    def __init__(self, name: str, log: list[tuple[str, str, tuple, dict]]) -> None:
        self.name = name
        self.log = log

    def __getattribute__(self, attribute: str) -> Any:
        if attribute in EVENTS:
            log, name = object.__getattribute__(self, "log"), object.__getattribute__(self, "name")
            return lambda *args, **kwargs: log.append((name, attribute, args, kwargs))
        return object.__getattribute__(self, attribute)


def _arguments(event: str) -> tuple[tuple, dict]:
    """Distinct placeholder values for every parameter of one event."""
    parameters = list(inspect.signature(getattr(PipelineEvents, event)).parameters.values())[1:]
    args = tuple(f"{event}-{p.name}" for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD)
    kwargs = {p.name: f"{event}-{p.name}" for p in parameters if p.kind is p.KEYWORD_ONLY}
    return args, kwargs


def test_every_event_reaches_every_handler_in_order_with_its_arguments() -> None:
    assert {"stage_started", "model_input_ready", "study_finished"} <= set(EVENTS)
    log: list[tuple[str, str, tuple, dict]] = []
    fan_out = EventFanOut(Recorder("first", log), Recorder("second", log))
    expected = []
    for event in EVENTS:
        args, kwargs = _arguments(event)
        getattr(fan_out, event)(*args, **kwargs)
        expected += [("first", event, args, kwargs), ("second", event, args, kwargs)]
    assert log == expected
