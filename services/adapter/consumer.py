"""The adapter: one process, one model server backend, and its stages (``adapter.stages``).

* the **preparation stage** takes StudyTasks from the task lanes: intake, series selection,
  the chest check, the volume and the model input (services/adapter/stages.py). A task whose
  studies are all refused gets its result here; the others are handed to the model lanes.
  While more tasks wait, a new one is checked first (``adapter.check_first``): if it passes,
  it waits in its preparation lane, which the stage takes after that priority's task lane,
  so that no refusal waits behind another study's full preparation;
* the **model stage** takes ModelTasks from the model lanes: the model, the reports, the SRs.

While this adapter's model stage is the only one alive, the preparation keeps each model
input in memory for it (``adapter.held_inputs``, services/adapter/held_inputs.py) instead of
writing 221 MB to the storage.

Each stage runs its own connection and I/O loop (services/adapter/stage_loop.py), so a
study that will be refused is prepared and answered while the same adapter's model stage
waits for the model: refusals never queue behind the model's backlog. A result is stored
before it is published and acked, and stored once (the first stored result of a task is the
one every later delivery republishes).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from loguru import logger
from tenacity import RetryCallState

from services.adapter import delivery
from services.adapter.delivery import Decision
from services.adapter.handoff import read_check, remove_prepared, save_model_input
from services.adapter.held_inputs import HeldInputs
from services.adapter.housekeeping import HealthFile, sweep_leftovers_forever
from services.adapter.metrics import WAIT_BROKER, AdapterMetrics, MeteredBackend, adapter_metrics
from services.adapter.model_server_wait import RetryingBackend
from services.adapter.predecessors import EarlierReports
from services.adapter.progress import InferenceTimes, ProgressRelay
from services.adapter.stage_loop import StageLoop, StageSpec
from services.adapter.stages import TaskContext, finish_model_task, prepare_task
from services.broker.connection import CONNECTION_ERRORS
from services.broker.schemas import (
    MODEL_STAGE,
    PREPARE_STAGE,
    PRIORITY_ORDER,
    ModelTask,
    QueueTopology,
    StudyResult,
    StudyTask,
)
from services.broker.storage import (
    handoff_path,
    prepared_dir,
    result_json_path,
    store_result_once,
)
from services.core.arrays import ModelInput
from services.core.config import Settings
from services.core.errors import ModelServerUnavailable, WorkInterrupted
from services.core.inference import create_backend
from services.core.inference.base import InferenceBackend
from services.core.retry import log_retry, retrying, retrying_until_stopped


def default_adapter_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Adapter:
    def __init__(
        self,
        settings: Settings,
        *,
        adapter_id: str | None = None,
        health_file: Path | None = None,
        drain_timeout_s: float = 60.0,
        backend_factory: Callable[[Settings], InferenceBackend] = create_backend,
        metrics: AdapterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.adapter_id = adapter_id or default_adapter_id()
        self.topology = QueueTopology.from_settings(settings.rabbitmq)
        self.storage_root = settings.storage.root
        self.health = HealthFile(health_file)
        self.drain_timeout_s = drain_timeout_s
        self._backend_factory = backend_factory
        self._backend: InferenceBackend | None = None  # metered: every model request counted
        self._transfer_stats: Any = None  # TritonBackend: bytes moved, by transport
        self.metrics = metrics or adapter_metrics()
        self._stop = threading.Event()
        self._count_lock = threading.Lock()
        self.processed = 0  # results published and acked or dead-lettered (tests and logs)
        self.inference_times = InferenceTimes()  # the model's recent durations: progress by time
        self.earlier_reports = EarlierReports(settings)  # what a study's new SR supersedes
        self._stage_loops: list[StageLoop] = []
        self._model_stages_alive = 0  # adapters consuming the model stage's presence queue
        self.held_inputs = HeldInputs(
            settings.adapter.held_inputs,
            may_hold=self.model_stage_alone,
            release=self._write_held_input,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Thread- and signal-safe: stop taking tasks, finish (or give back) the current one."""
        self._stop.set()
        for loop in self._stage_loops:
            loop.wake()  # not at its next poll of the lanes

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        self.settings.storage.root.mkdir(parents=True, exist_ok=True)
        try:
            backend = self._wait_for_backend()
        except WorkInterrupted:
            return
        self._backend = MeteredBackend(backend, self.metrics)
        self._transfer_stats = getattr(backend, "stats", None)
        threading.Thread(
            target=sweep_leftovers_forever,
            args=(self._stop, self.settings.inference.triton_url),
            kwargs={
                "shared_memory": getattr(backend, "transport", None) == "shared_memory",
                "storage_root": self.storage_root,
            },
            name="sweep",
            daemon=True,
        ).start()
        try:
            self._serve_stages()
            self.held_inputs.release_all()  # those the preparation held after the model stage
        finally:
            backend.close()
            self.earlier_reports.close()
            logger.info("adapter {} stopped after {} results", self.adapter_id, self.processed)

    def _before_reconnect(self, state: RetryCallState) -> None:
        log_retry("the adapter's RabbitMQ connection")(state)
        self.metrics.waited(WAIT_BROKER, state.upcoming_sleep)

    def _wait_for_backend(self) -> InferenceBackend:
        """Triton may still be loading models: wait for it (with backoff) before consuming."""

        def create() -> InferenceBackend:
            self.health.touch()
            return self._backend_factory(self.settings)

        return retrying(
            retry_on=ModelServerUnavailable,
            backoff=self.settings.inference.model_server_backoff,
            stop_event=self._stop,
            before_sleep=log_retry("waiting for the model server"),
        )(create)

    def _stage_specs(self) -> list[StageSpec]:
        topology = self.topology
        specs = {
            PREPARE_STAGE: StageSpec(
                PREPARE_STAGE,
                topology.preparation_stage_lanes(),
                StudyTask,
                self._prepare,
                check_first_lanes=(
                    {
                        topology.task_lane(priority): topology.preparation_lane(priority)
                        for priority in PRIORITY_ORDER
                    }
                    if self.settings.adapter.check_first
                    else {}
                ),
                # A stored result is final: what a check kept for the preparation is not needed.
                after_result=self._forget_prepared,
                checked_first_at=self.settings.adapter.check_first_max_waiting,
                earlier_attempts=self._attempts_before_preparation,
            ),
            MODEL_STAGE: StageSpec(
                MODEL_STAGE,
                topology.model_lanes(),
                ModelTask,
                self._finish,
                after_result=self._forget_prepared,
            ),
        }
        return [specs[name] for name in self.settings.adapter.stages]

    def _forget_prepared(self, task_id: str) -> None:
        remove_prepared(self.storage_root, task_id)
        self.held_inputs.drop(task_id)

    def note_model_stages_alive(self, adapters_alive: int) -> None:
        """From the model stage's I/O loop, every second: the adapters consuming its presence
        queue (0: unknown). Held inputs of tasks whose result is stored go; once another
        model stage is alive, the others are written for it (on a thread of their own)."""
        second_came = adapters_alive > 1 and self._model_stages_alive == 1
        self._model_stages_alive = adapters_alive
        self.held_inputs.drop_finished(
            lambda task_id: result_json_path(self.storage_root, task_id).exists()
        )
        if second_came and len(self.held_inputs):
            threading.Thread(
                target=self.held_inputs.release_all, name="held-inputs", daemon=True
            ).start()

    def model_stage_alone(self) -> bool:
        """Whether a ModelTask published now can only be taken by this adapter's model stage
        (or, should it die, by one started later); never while it stops."""
        return (
            MODEL_STAGE in self.settings.adapter.stages
            and self._model_stages_alive == 1
            and not self.stopping
        )

    def _write_held_input(self, task_id: str, name: str, model_input: ModelInput) -> None:
        """A held input to the storage, for whichever model stage takes its task (one whose
        preparation is recorded and whose result is not stored); never raises: an input not
        written is prepared again where it is needed."""
        folder = prepared_dir(self.storage_root, task_id)
        try:
            if (
                not handoff_path(self.storage_root, task_id).is_file()
                or result_json_path(self.storage_root, task_id).exists()
                or (folder / name).is_file()
            ):
                return
            save_model_input(folder, name, model_input)
            logger.info("task {}: its held model input written to the storage", task_id)
        except OSError as error:
            logger.warning("task {}: its held model input not written: {}", task_id, error)

    def _attempts_before_preparation(self, lane: str, task_id: str) -> int:
        """A checked task's deliveries before the one whose check passed: its first delivery
        from a preparation lane goes on as that one (the task lane's count goes on)."""
        if lane not in self.topology.preparation_lanes():
            return 0
        check = read_check(self.storage_root, task_id)
        return 0 if check is None else check.attempt - 1

    def _serve_stages(self) -> None:
        """Each stage on a thread and connection of its own: a refusal is prepared and
        answered while this adapter's model stage waits for the model."""
        self._stage_loops = [StageLoop(self, spec) for spec in self._stage_specs()]
        threads = [
            threading.Thread(target=loop.run, name=f"stage-{loop.spec.name}")
            for loop in self._stage_loops
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def serve_reconnecting(self, serve: Callable[[], None]) -> None:
        """A stage's serve loop, called again after each lost connection (with
        rabbitmq.reconnect_backoff) until the adapter stops."""
        retrying_until_stopped(
            self._stop,
            retry_on=CONNECTION_ERRORS,
            backoff=self.settings.rabbitmq.reconnect_backoff,
            before_sleep=self._before_reconnect,
        )(serve)

    @property
    def stop_event(self) -> threading.Event:
        return self._stop

    def store(self, decision: Decision) -> Decision:
        return self._store(decision)

    def count_processed(self) -> None:
        with self._count_lock:
            self.processed += 1

    def _context(self, attempt: int, send: Callable[[str, float, str], None]) -> TaskContext:
        progress = ProgressRelay(send)
        assert self._backend is not None
        backend = RetryingBackend(
            self._backend,
            self._stop,
            on_retry=progress.retrying,
            backoff=self.settings.inference.model_server_backoff,
            wait_limit_s=self.settings.inference.model_server_wait_limit_s,
            on_wait=self.metrics.model_server_retry,
        )
        return TaskContext(
            backend=backend,
            settings=self.settings,
            adapter_id=self.adapter_id,
            attempt=attempt,
            progress=progress,
            inference_times=self.inference_times,
            earlier_reports=self.earlier_reports,
            held_inputs=self.held_inputs,
            on_handover=self.metrics.model_input_handed_over,
        )

    def _prepare(
        self,
        task: StudyTask,
        attempt: int,
        send: Callable[[str, float, str], None],
        check_first: bool,
    ) -> StudyResult | ModelTask | StudyTask:
        return prepare_task(task, self._context(attempt, send), check_first=check_first)

    def _finish(
        self,
        handoff: ModelTask,
        attempt: int,
        send: Callable[[str, float, str], None],
        _check_first: bool,
    ) -> StudyResult | StudyTask:
        return finish_model_task(handoff, self._context(attempt, send))

    def _store(self, decision: Decision) -> Decision:
        """Store the decision's result once (when it says so) and return the decision with
        the task's stored result: the first stored result of a task is its one result."""
        if not decision.store or decision.result is None:
            return decision
        assert self._backend is not None
        result = delivery.with_demo_flag(decision.result, self._backend.metadata.demo)
        return replace(decision, result=store_result_once(self.storage_root, result), store=False)
