"""Model inputs kept in the adapter's memory between its own two stages.

A study's model input is 221 MB. Written to the shared storage for the model stage, it costs
0.2-0.6 s on these virtual machines (fresh page-cache pages under free page reporting,
docs/ARCHITECTURE.md) and 0.03 s more to read back: most of what the stack adds to a study
(benchmarks/README.md, "The model input kept in memory").

While this adapter's model stage is the only one alive, the ModelTask that names the input
can only be taken by that stage, or, should this adapter die, by one that starts later. The
preparation then keeps the input here instead of writing it; the model stage reads it from
here, and it goes when the task's result is stored. It is written to the storage instead
when the adapter stops, when a second model stage comes up, or after 30 minutes. Where the input is neither here nor on disk (its adapter was killed, or
another adapter's model stage came up and took the task), the model stage sends the task
back to its preparation lane, which prepares it again (services/adapter/stages.py): slower,
never wrong, since the input is a pure function of the study on the shared storage.

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

from services.adapter.handoff import PreparedEntry, PreparedTask, load_model_input
from services.core.arrays import ModelInput

# A held input whose result has not been stored for this long is written to the storage
# (``release``) and dropped: the bound on memory held for a task whose ModelTask another
# adapter took, or that waits behind a long run of more urgent studies.
HELD_INPUT_MAX_AGE_S = 1800.0

# Where an input held too long goes: (task id, file name, input).
Release = Callable[[str, str, ModelInput], None]


class Handover(str, Enum):
    """How a model input reached the model stage (label of ``cts_adapter_model_inputs_total``)."""

    MEMORY = "memory"  # held by this adapter's preparation
    FILE = "file"  # read from the shared storage
    PREPARED_AGAIN = "prepared_again"  # in neither: the task went back to its preparation


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
        release: Release = lambda task_id, name, model_input: None,
        max_age_s: float = HELD_INPUT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self._may_hold = may_hold
        self._release = release
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
        self._release_stale()
        with self._lock:
            if self.capacity <= 0 or not self._may_hold():
                return False
            key = (task_id, name)
            if key not in self._held and len(self._held) >= self.capacity:
                return False
            self._held[key] = _Held(model_input, self._clock())
            return True

    def find(self, task_id: str, name: str) -> ModelInput | None:
        """The held input (held on until the task's result is stored: a model request given
        back, e.g. by a stopping adapter, finds it again); None if it is not here."""
        with self._lock:
            held = self._held.get((task_id, name))
        return None if held is None else held.model_input

    def drop(self, task_id: str) -> None:
        """Forget every input of the task (its result is stored)."""
        with self._lock:
            for key in [key for key in self._held if key[0] == task_id]:
                del self._held[key]

    def drop_finished(self, is_finished: Callable[[str], bool]) -> None:
        """Forget the inputs of tasks ``is_finished`` (by task id: a result another adapter
        stored)."""
        with self._lock:
            for key in [key for key in self._held if is_finished(key[0])]:
                del self._held[key]

    def release_all(self) -> None:
        """Write every held input to the storage (``release``) and forget it."""
        self._release_where(lambda held: True)

    def _release_stale(self) -> None:
        now = self._clock()
        self._release_where(lambda held: now - held.held_at > self._max_age_s)

    def _release_where(self, chosen: Callable[[_Held], bool]) -> None:
        with self._lock:
            leaving = [(key, held) for key, held in self._held.items() if chosen(held)]
        for (task_id, name), held in leaving:
            # Written before it is forgotten (a model stage finds it in one or the other),
            # outside the lock (0.2-0.6 s each).
            self._release(task_id, name, held.model_input)
            with self._lock:
                if self._held.get((task_id, name)) is held:
                    del self._held[(task_id, name)]


class ModelInputGone(Exception):
    """A prepared input is in neither this adapter's memory nor the storage."""


def inputs_available(
    held: HeldInputs | None, folder: Path, task_id: str, record: PreparedTask
) -> bool:
    """Whether every model input the record names is in this adapter's memory or in the
    task's prepared ``folder`` (else the task must be prepared again)."""
    return all(
        (held is not None and held.find(task_id, entry.input_file) is not None)
        or (folder / entry.input_file).is_file()
        for entry in record.entries
        if entry.input_file is not None
    )


def read_model_input(
    held: HeldInputs | None,
    folder: Path,
    task_id: str,
    entry: PreparedEntry,
    on_handover: Callable[[Handover], None],
) -> ModelInput:
    """The entry's input for the model stage: from this adapter's memory, else from the
    task's prepared ``folder``; ModelInputGone where it is in neither."""
    assert entry.input_file is not None
    model_input = None if held is None else held.find(task_id, entry.input_file)
    if model_input is not None:
        on_handover(Handover.MEMORY)
        return model_input
    model_input = load_model_input(folder, entry.input_file)
    if model_input is None:
        where = "held in its preparing adapter's memory" if entry.input_in_memory else "written"
        raise ModelInputGone(f"model input {entry.input_file} ({where}) is not here")
    on_handover(Handover.FILE)
    return model_input
