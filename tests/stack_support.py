"""Helpers of the stack tests (adapter, frontend, end-to-end): free ports, zipped fixtures,
waiting, broker clean-up. Not a test module."""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from services.broker.connection import connect
from services.broker.schemas import STAGES, QueueTopology
from services.core.config import RabbitMQSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def zip_directory(source: Path, target: Path) -> Path:
    """A zip of every file of ``source`` (as a customer sends a study)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, arcname=f"{source.name}/{path.relative_to(source)}")
    return target


def wait_for(
    probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def delete_topology(settings: RabbitMQSettings, extra_queues: list[str] = ()) -> None:  # type: ignore[assignment]
    """Remove every queue and exchange a test declared under its prefix."""
    topology = QueueTopology.from_settings(settings)
    connection = connect(settings, name="test cleanup", give_up_after_s=10)
    try:
        channel = connection.channel()
        queues = (
            *topology.waiting_lanes(),
            *topology.model_lanes(),
            *(topology.presence_queue(stage) for stage in STAGES),
            topology.dead_letter_queue,
            topology.registry_queue,
        )
        for queue in (*queues, *extra_queues):
            channel.queue_delete(queue)
        for exchange in (topology.task_exchange, topology.dead_letter_exchange):
            channel.exchange_delete(exchange)
    finally:
        connection.close()
