"""Model inputs kept in the adapter's memory between its own two stages.

A study's model input is 221 MB. Written to the shared storage for the model stage, it costs
0.2-0.6 s on these virtual machines (fresh page-cache pages under free page reporting,
docs/ARCHITECTURE.md) and 0.03 s more to read back: most of what the stack adds to a study
(benchmarks/README.md, "The model input kept in memory").

While this adapter's model stage is the only one alive, the ModelTask that names the input
can only be taken by that stage, or, should this adapter die, by one that starts later. The
preparation then keeps the input here instead of writing it; the model stage takes it from
here. Where the input is neither here nor on disk (its adapter stopped or was killed, or
another adapter's model stage came up and took the task) the model stage prepares the task
again (services/adapter/stages.py): slower, never wrong, since the input is a pure function
of the study on the shared storage.

Held inputs are keyed by task id and file name, so one task's input can never be read for
another; an array here is never written into, only dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from loguru import logger

from services.adapter.handoff import PreparedEntry, load_model_input
from services.core.arrays import ModelInput

# A held input whose model stage has not come for this long is dropped (its task is
# prepared again if it does come): the bound on memory held for a task that another
# adapter finished, or whose ModelTask was dead-lettered.
HELD_INPUT_MAX_AGE_S = 1800.0


class Handover(str, Enum):
    """How a model input reached the model stage (label of ``cts_adapter_model_inputs_total``)."""

    MEMORY = "memory"  # held by this adapter's preparation
    FILE = "file"  # read from the shared storage
    PREPARED_AGAIN = "prepared_again"  # found in neither: the task was prepared again


@dataclass(frozen=True)
class _Held:
    model_input: ModelInput
    held_at: float  # time.monotonic()


class HeldInputs:
    """At most ``capacity`` model inputs, held while ``may_hold()`` says this adapter's
    model stage is the only one alive. Thread-safe: the stages' worker threads share it."""

    def __init__(
        self,
        capacity: int,
        *,
        may_hold: Callable[[], bool] = lambda: True,
        max_age_s: float = HELD_INPUT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self._may_hold = may_hold
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], _Held] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def hold(self, task_id: str, name: str, model_input: ModelInput) -> bool:
        """Keep the input for this adapter's model stage; False (write it to the storage)
        when another model stage is alive or there is no room."""
        if self.capacity <= 0 or not self._may_hold():
            return False
        with self._lock:
            self._drop_stale()
            key = (task_id, name)
            if key not in self._held and len(self._held) >= self.capacity:
                return False
            self._held[key] = _Held(model_input, self._clock())
            return True

    def take(self, task_id: str, name: str) -> ModelInput | None:
        """The held input, no longer held; None if it is not here."""
        with self._lock:
            held = self._held.pop((task_id, name), None)
        return None if held is None else held.model_input

    def drop(self, task_id: str) -> None:
        """Forget every input of the task (its result is stored)."""
        with self._lock:
            for key in [key for key in self._held if key[0] == task_id]:
                del self._held[key]

    def _drop_stale(self) -> None:
        now = self._clock()
        stale = [key for key, held in self._held.items() if now - held.held_at > self._max_age_s]
        for key in stale:
            del self._held[key]
            logger.warning(
                "task {}: its model input was held {:.0f} s without its model stage; dropped "
                "(the task is prepared again if it comes)",
                key[0],
                self._max_age_s,
            )


class ModelInputGone(Exception):
    """A prepared input is in neither this adapter's memory nor the storage."""


def take_model_input(
    held: HeldInputs | None,
    folder: Path,
    task_id: str,
    entry: PreparedEntry,
    on_handover: Callable[[Handover], None],
) -> ModelInput:
    """The entry's input for the model stage: from this adapter's memory, else from the
    task's prepared ``folder``; ModelInputGone where it is in neither."""
    assert entry.input_file is not None
    model_input = None if held is None else held.take(task_id, entry.input_file)
    if model_input is not None:
        on_handover(Handover.MEMORY)
        return model_input
    model_input = load_model_input(folder, entry.input_file)
    if model_input is None:
        where = "held in its preparing adapter's memory" if entry.input_in_memory else "written"
        raise ModelInputGone(f"model input {entry.input_file} ({where}) is not here")
    on_handover(Handover.FILE)
    return model_input
