"""RabbitMQ topology helper: quorum queues that dead-letter poison messages into DeadTask.

A quorum queue counts deliveries itself. With ``x-delivery-limit`` it stops redelivering a
message that keeps coming back (a worker that dies on it every time) and hands it to its
dead-letter exchange; ``move_dead_letters`` then stores each such message as a dead task
(reason ``dead_lettered``) with its raw body, so it can be inspected and requeued::

    from reliable_tasks.topology import quorum_queue

    orders, orders_dead = quorum_queue("orders", delivery_limit=5)
    app.conf.task_queues = [orders]

and run ``python manage.py reliable_tasks dead-letters --queue orders`` (or ``--follow``).
This sits beside the worker's own crash-loop detection (``RELIABLE_TASKS_MAX_DELIVERIES``),
which needs no special queue.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from kombu import Connection, Exchange, Queue

from .conf import conf

logger = logging.getLogger("reliable_tasks.topology")

DEAD_LETTER_SUFFIX = ".dead-letter"


def quorum_queue(name: str, *, delivery_limit: int | None = None) -> tuple[Queue, Queue]:
    """A durable quorum queue with a delivery limit, and the queue its poison messages go to.

    Args:
        name: The task queue's name; the dead-letter queue and exchange are ``name.dead-letter``.
        delivery_limit: Redeliveries before RabbitMQ dead-letters a message; by default
            ``RELIABLE_TASKS_MAX_DELIVERIES``.
    """
    limit = conf.MAX_DELIVERIES if delivery_limit is None else delivery_limit
    if limit < 1:
        raise ValueError(f"delivery_limit must be at least 1, got {limit}")
    dead_exchange = Exchange(name + DEAD_LETTER_SUFFIX, type="direct", durable=True)
    dead_queue = Queue(
        name + DEAD_LETTER_SUFFIX,
        exchange=dead_exchange,
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
    queue = Queue(
        name,
        exchange=Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": limit,
            "x-dead-letter-exchange": dead_exchange.name,
            "x-dead-letter-routing-key": name,
        },
    )
    return queue, dead_queue


def move_dead_letters(connection: Connection, queue: str, *, limit: int | None = None) -> int:
    """Store the messages waiting in ``queue``'s dead-letter queue as dead tasks; return how many.

    Each message is acknowledged only after its dead task committed.
    """
    from . import dead
    from .models import DeadReason, DeadStatus, DeadTask

    _, dead_queue = quorum_queue(queue)
    channel: Any = connection.channel()
    try:
        dead_queue(channel).declare()
        moved = 0
        while limit is None or moved < limit:
            message = channel.basic_get(dead_queue.name, no_ack=False)
            if message is None:
                break
            headers = dict(message.properties.get("application_headers") or {})
            task_id = headers.get("id")
            if (
                _reason(headers) == "rejected"
                and isinstance(task_id, str)
                and DeadTask.objects.using(conf.DATABASE)
                .filter(task_id=task_id, status=DeadStatus.DEAD)
                .exists()
            ):
                # A worker stored it as a dead task (an unknown task, a message it cannot
                # read), then rejected it, and the queue dead-lettered it: kept already.
                channel.basic_ack(message.delivery_tag)
                moved += 1
                continue
            dead.capture_raw(
                dead.RawMessage(
                    headers=headers,
                    properties={
                        k: v for k, v in message.properties.items() if k != "application_headers"
                    },
                    body=message.body,
                    content_type=message.properties.get("content_type") or "",
                    content_encoding=message.properties.get("content_encoding") or "",
                    routing_key=queue,
                ),
                reason=DeadReason.DEAD_LETTERED,
                error=_why(headers),
                queue=queue,
            )
            channel.basic_ack(message.delivery_tag)
            moved += 1
        return moved
    finally:
        channel.close()


def follow_dead_letters(
    connection: Connection,
    queue: str,
    *,
    interval: float = 5.0,
    stop: threading.Event | None = None,
) -> None:
    """Move dead letters every ``interval`` seconds until interrupted (or ``stop`` is set).

    A pass that loses the broker's connection, or finds the database unreachable, is logged and
    tried again after the interval, on a new connection: its messages, unacknowledged, wait in
    the dead-letter queue meanwhile.
    """
    from django.db import DatabaseError, close_old_connections

    stop = stop or threading.Event()
    errors: tuple[type[BaseException], ...] = (
        *connection.connection_errors, *connection.channel_errors, DatabaseError,
    )  # fmt: skip
    current = connection
    try:
        while not stop.is_set():
            try:
                moved = move_dead_letters(current, queue)
            except errors as exc:
                logger.warning(
                    "moving the dead letters of %s failed (%r); trying again in %g s",
                    queue, exc, interval,
                )  # fmt: skip
                if current is not connection:
                    with contextlib.suppress(Exception):
                        current.close()
                current = connection.clone()  # the next pass connects afresh
                close_old_connections()
            else:
                if moved:
                    logger.info(
                        "moved %d dead-lettered messages of %s into dead tasks", moved, queue
                    )
            stop.wait(interval)
    finally:
        if current is not connection:
            current.close()


#: What RabbitMQ's x-death reasons mean.
_REASONS = {
    "delivery_limit": "it was delivered more often than the quorum queue's delivery limit",
    "rejected": "a consumer rejected it without requeueing it",
    "expired": "its time to live passed",
    "maxlen": "the queue was over its length limit",
}


def _reason(headers: dict[str, Any]) -> str | None:
    deaths = headers.get("x-death") or []
    return str(deaths[0].get("reason")) if deaths and isinstance(deaths[0], dict) else None


def _why(headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        first = deaths[0]
        reason = str(first.get("reason"))
        return (
            f"RabbitMQ dead-lettered it from queue {first.get('queue')!r}: {reason} "
            f"(count {first.get('count')}): {_REASONS.get(reason, 'see RabbitMQ: dead lettering')}"
        )
    return "RabbitMQ dead-lettered it"
