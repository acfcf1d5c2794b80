"""What the adapter's I/O thread does with a decision (services/adapter/delivery.py): publish
the result to the study registry's queue and to the submitter, then ack, give the message
back, or dead-letter it with its reason (services/adapter/dead_letters.py). pika objects are
touched on the I/O thread only.

The registry's copy is what makes a result count: when the broker does not confirm it, the
task is given back (its stored result is republished on the next delivery, never
recomputed), so no result leaves the queue unrecorded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pika
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel

from services.adapter.dead_letters import publish_dead_letter
from services.adapter.delivery import Action, Decision
from services.broker.connection import (
    publish_for_preparation,
    publish_model_task,
    publish_reply,
    publish_to_registry,
)
from services.broker.errors import PublishError
from services.broker.schemas import ModelTask, QueueTopology, StudyProgress, StudyTask
from services.broker.storage import mark_delivered


@dataclass(frozen=True)
class Delivery:
    """One message as the broker handed it out: what a dead letter must carry on."""

    tag: int
    properties: pika.BasicProperties
    body: bytes
    attempt: int = 1


def execute_decision(
    channel: BlockingChannel,
    decision: Decision,
    message: Delivery,
    *,
    topology: QueueTopology,
    adapter_id: str,
    reply_to: str | None,
    correlation_id: str | None,
    storage_root: Path | None = None,
) -> bool:
    """Publish the decision's result, then ack, give back or dead-letter the message.

    True when the message left the queue (acked or dead-lettered).
    """
    if not channel.is_open:
        return False
    if decision.handoff is not None and not _hand_on(channel, topology, decision.handoff):
        # Given back: the next delivery finds the recorded preparation and hands it on (or
        # checks the task again).
        channel.basic_nack(message.tag, requeue=True)
        return False
    result = decision.result
    if result is not None:
        try:
            publish_to_registry(channel, topology, result)
        except PublishError as error:
            logger.warning("result of task {} not recorded: {}; given back", result.task_id, error)
            channel.basic_nack(message.tag, requeue=True)
            return False
    if result is not None and reply_to:
        try:
            publish_reply(
                channel,
                result,
                reply_to=reply_to,
                correlation_id=correlation_id or result.correlation_id,
            )
        except PublishError as error:
            # The submitter's queue is gone; a stored result stays in storage for it.
            logger.warning("result of task {} not delivered: {}", result.task_id, error)
            delivered = False
        else:
            delivered = True
    else:
        delivered = result is not None
    if delivered and storage_root is not None and result is not None:
        # Both copies confirmed: should the ack below be lost (a broker restart, a cut
        # link), the redelivered task is acked without sending the result twice.
        with contextlib.suppress(OSError):
            mark_delivered(storage_root, result.task_id, reply_to)
    if decision.action is Action.REQUEUE:
        channel.basic_nack(message.tag, requeue=True)
        return False
    if decision.action is Action.DEAD_LETTER:
        dead_letter(channel, decision, message, topology=topology, adapter_id=adapter_id)
    else:
        channel.basic_ack(message.tag)
    return True


def dead_letter(
    channel: BlockingChannel,
    decision: Decision,
    message: Delivery,
    *,
    topology: QueueTopology,
    adapter_id: str,
) -> None:
    """A confirmed copy with the reason in the dead-letter queue, then the ack; if the copy is
    refused, a plain reject (the broker's own dead letter, without our reason)."""
    try:
        publish_dead_letter(
            channel,
            topology,
            body=message.body,
            properties=message.properties,
            reason=decision.reason or decision.note,
            adapter_id=adapter_id,
            attempt=message.attempt,
        )
    except PublishError as error:
        logger.warning("dead letter without its reason: {}", error)
        channel.basic_reject(message.tag, requeue=False)
        return
    channel.basic_ack(message.tag)


def send_progress(
    channel: BlockingChannel, topology: QueueTopology, task: StudyTask, update: StudyProgress
) -> None:
    """Best effort: a progress message that cannot be sent is dropped."""
    if not channel.is_open:
        return
    with contextlib.suppress(PublishError):
        publish_to_registry(channel, topology, update, persistent=False)
    if not task.reply_to:
        return
    with contextlib.suppress(PublishError):
        publish_reply(
            channel,
            update,
            reply_to=task.reply_to,
            correlation_id=task.reply_correlation_id,
            persistent=False,
        )


def _hand_on(
    channel: BlockingChannel, topology: QueueTopology, handoff: ModelTask | StudyTask
) -> bool:
    """Publish a prepared task to its model lane, a checked one to its preparation lane."""
    try:
        if isinstance(handoff, ModelTask):
            publish_model_task(channel, topology, handoff)
        else:
            publish_for_preparation(channel, topology, handoff)
    except PublishError as error:
        task_id = handoff.task.task_id if isinstance(handoff, ModelTask) else handoff.task_id
        logger.warning("task {} not handed on: {}", task_id, error)
        return False
    return True
