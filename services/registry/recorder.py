"""What the adapters report, recorded: progress and results from the registry's queue
(``<prefix>.registry``) written into the registry, each message acked only after its write
was committed.

While the database cannot be written (restarting, unreachable) the message goes back to the
queue and the recorder pauses (``registry.unavailable_backoff``): nothing is lost, and the
writes are idempotent (services/registry/writes.py), so a message recorded twice (a crash
between the commit and the ack) changes nothing the second time.

The frontend runs one (``registry.record_results``); ``python -m services.registry record``
runs one on its own. Several recorders share the queue.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.exc import SQLAlchemyError

from services.broker.connection import declare_topology
from services.broker.consumer import Disposition, QueueConsumer, Report
from services.broker.schemas import QueueTopology, StudyResult
from services.core.config import Settings
from services.registry.registry import Registry
from services.registry.webhooks import WebhookSender, notifications_of

RECORDER_PREFETCH = 20


class RegistryRecorder:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        on_result: Callable[[StudyResult], None] | None = None,
    ) -> None:
        self.registry = registry
        self._on_result = on_result  # told of each result recorded for the first time
        self.topology = QueueTopology.from_settings(settings.rabbitmq)
        self.recorded = 0  # messages written (tests and logs)
        # notifications.webhooks: the messages join the outbox with the result, and a sender
        # thread delivers them (services/registry/webhooks.py).
        notifications = settings.notifications
        self._notifications = (
            partial(notifications_of, notifications) if notifications.webhooks else None
        )
        self.webhooks = WebhookSender(notifications, registry) if notifications.webhooks else None
        self.consumer = QueueConsumer(
            settings.rabbitmq,
            self._declare,
            self.record,
            pause=settings.registry.unavailable_backoff,
            name="registry-recorder",
            prefetch=RECORDER_PREFETCH,
        )

    def _declare(self, channel: BlockingChannel) -> str:
        declare_topology(channel, self.topology)
        return self.topology.registry_queue

    def record(self, report: Report) -> Disposition:
        try:
            if isinstance(report, StudyResult):
                first = self.registry.record_result(report, self._notifications)
                if first and self._on_result is not None:
                    self._on_result(report)
            else:
                self.registry.record_progress(report)
        except SQLAlchemyError as error:
            logger.warning(
                "registry not written for task {} ({}): the message waits in the queue",
                report.task_id,
                type(error).__name__,
            )
            return Disposition.LATER
        self.recorded += 1
        return Disposition.ACK

    def start(self) -> None:
        self.consumer.start()
        if self.webhooks is not None:
            self.webhooks.start()

    def stop(self) -> None:
        self.consumer.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
