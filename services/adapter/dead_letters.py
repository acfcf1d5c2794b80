"""Dead letters that say why they are there.

Rejecting a message (basic_reject, requeue=False) lets the broker dead-letter it, but the
broker only writes ``x-first-death-reason: rejected``: the reason stays in the adapter's
log. So the adapter publishes the message itself to the dead-letter exchange, unchanged
apart from the headers below, waits for the broker's confirm, and only then acks the
original: the message is never lost (a crash in between leaves both copies, never none).
If that publish fails, the caller rejects the message as before (the broker's own dead
letter, without our reason).

Headers added: ``x-cts-reason`` (why, in words), ``x-cts-adapter`` (which adapter),
``x-cts-dead-lettered-at`` (UTC, ISO 8601) and ``x-cts-delivery`` (which delivery).
"""

from __future__ import annotations

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from services.broker.errors import PublishError
from services.broker.schemas import QueueTopology, utc_now

REASON_HEADER = "x-cts-reason"
ADAPTER_HEADER = "x-cts-adapter"
TIME_HEADER = "x-cts-dead-lettered-at"
DELIVERY_HEADER = "x-cts-delivery"
MAX_REASON_CHARS = 1000  # a header is no place for a whole traceback


def dead_letter_properties(
    properties: pika.BasicProperties, *, reason: str, adapter_id: str, attempt: int
) -> pika.BasicProperties:
    """The original properties (type, ids, reply_to, persistence) plus the reason headers."""
    headers = dict(properties.headers or {})
    headers[REASON_HEADER] = (reason or "no reason given")[:MAX_REASON_CHARS]
    headers[ADAPTER_HEADER] = adapter_id
    headers[TIME_HEADER] = utc_now().isoformat()
    headers[DELIVERY_HEADER] = attempt
    return pika.BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=headers,
        delivery_mode=pika.DeliveryMode.Persistent,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.type,
        app_id=properties.app_id,
    )


def publish_dead_letter(
    channel: BlockingChannel,
    topology: QueueTopology,
    *,
    body: bytes,
    properties: pika.BasicProperties,
    reason: str,
    adapter_id: str,
    attempt: int,
) -> None:
    """Publish a copy with the reason to the dead-letter exchange; returns once the broker
    confirmed it (the channel is in confirm mode). Raises PublishError otherwise."""
    try:
        channel.basic_publish(
            exchange=topology.dead_letter_exchange,
            routing_key=topology.task_queue,
            body=body,
            properties=dead_letter_properties(
                properties, reason=reason, adapter_id=adapter_id, attempt=attempt
            ),
            mandatory=True,
        )
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
        # A lost connection is not caught: the message goes back to the queue, as always.
        raise PublishError(f"the dead-letter queue refused the message: {error}") from error
