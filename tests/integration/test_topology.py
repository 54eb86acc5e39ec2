"""Quorum queues with a delivery limit dead-letter poison messages; they become dead tasks."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from django.core.management import call_command
from kombu import Connection, Producer

from reliable_tasks import dead, testing
from reliable_tasks.models import DeadTask
from reliable_tasks.topology import quorum_queue
from tests.support import BROKER_URL, Broker, TcpProxy, wait_for
from tests.testapp.models import Effect
from tests.testapp.tasks import record

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def quorum(broker: Broker) -> Iterator[str]:
    name = f"rt-tests-quorum-{uuid.uuid4().hex[:8]}"
    queue, dead_queue = quorum_queue(name, delivery_limit=1)
    queue(broker.channel).declare()
    dead_queue(broker.channel).declare()
    try:
        yield name
    finally:
        broker.channel.queue_delete(name)
        broker.channel.queue_delete(dead_queue.name)


def test_a_message_redelivered_past_the_limit_becomes_a_dead_task_that_can_be_requeued(
    broker: Broker, quorum: str
) -> None:
    task_id = str(uuid.uuid4())
    Producer(broker.channel).publish(
        json.dumps([["from-quorum"], {}, {}]), routing_key=quorum, exchange=quorum,
        headers={"id": task_id, "task": record.name, "lang": "py", "retries": 0},
        content_type="application/json", content_encoding="utf-8", delivery_mode=2,
    )  # fmt: skip
    # A worker that dies on the message, as RabbitMQ sees it: delivered, then returned, again.
    for _ in range(2):
        message = wait_for(
            lambda: broker.channel.basic_get(quorum, no_ack=False), timeout=10, what="a delivery"
        )
        broker.channel.basic_reject(message.delivery_tag, requeue=True)
    assert broker.channel.basic_get(quorum, no_ack=True) is None
    out = io.StringIO()
    wait_for(
        lambda: (
            call_command("reliable_tasks", "dead-letters", "--queue", quorum, stdout=out)
            or DeadTask.objects.exists()
        ),
        timeout=15,
        what="the dead letter to arrive",
    )
    task = DeadTask.objects.get()
    assert (task.reason, task.task_id, task.task_name, task.args) == (
        "dead_lettered",
        task_id,
        record.name,
        ["from-quorum"],
    )
    # RabbitMQ's own reason, from the message's x-death header.
    assert f"RabbitMQ dead-lettered it from queue '{quorum}': delivery_limit" in task.exc_message
    assert "moved 1 dead-lettered messages" in out.getvalue()
    # Requeued through the outbox, it runs once.
    row = dead.requeue(task)
    assert row.queue == quorum
    testing.run_enqueued()
    assert list(Effect.objects.values_list("key", flat=True)) == ["from-quorum"]


def test_moving_with_nothing_dead_lettered_moves_nothing(quorum: str) -> None:
    from reliable_tasks.topology import move_dead_letters

    with Connection(BROKER_URL) as connection:
        assert move_dead_letters(connection, quorum) == 0


def test_a_quorum_queue_needs_a_positive_delivery_limit() -> None:
    with pytest.raises(ValueError, match="delivery_limit must be at least 1"):
        quorum_queue("q", delivery_limit=0)


def test_a_message_a_worker_kept_as_a_dead_task_then_rejected_is_not_kept_twice(
    broker: Broker, quorum: str
) -> None:
    """A worker stores a message for an unknown task as a dead task, then Celery rejects it:
    the quorum queue dead-letters it. Moving the dead letters acknowledges it without a second
    dead task, which a requeue of both would run twice."""
    from reliable_tasks.topology import move_dead_letters

    task_id = str(uuid.uuid4())
    headers = {"id": task_id, "task": "tests.testapp.tasks.no_such_task", "lang": "py"}
    body = json.dumps([["unknown"], {}, {}])
    Producer(broker.channel).publish(
        body, routing_key=quorum, exchange=quorum, headers=headers,
        content_type="application/json", content_encoding="utf-8", delivery_mode=2,
    )  # fmt: skip
    message = wait_for(
        lambda: broker.channel.basic_get(quorum, no_ack=False), timeout=10, what="a delivery"
    )
    dead.capture_raw(
        dead.RawMessage(
            headers=headers, properties={}, body=body, content_type="application/json",
            content_encoding="utf-8",
        ),
        reason="unregistered", error="no such task",
    )  # fmt: skip
    broker.channel.basic_reject(message.delivery_tag, requeue=False)  # as Celery does
    with Connection(BROKER_URL) as connection:
        wait_for(lambda: move_dead_letters(connection, quorum), timeout=15, what="the dead letter")
    assert list(DeadTask.objects.values_list("task_id", "reason")) == [(task_id, "unregistered")]
    _, dead_queue = quorum_queue(quorum)
    assert broker.channel.basic_get(dead_queue.name, no_ack=True) is None  # acknowledged


def test_following_dead_letters_goes_on_after_the_broker_connection_is_lost(
    broker: Broker, quorum: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`dead-letters --follow` ran one connection and caught nothing: a RabbitMQ restart ended
    it with a traceback. A pass that loses the connection is logged, and the next connects
    afresh and moves what waits."""
    from django.db import connections

    from reliable_tasks.topology import follow_dead_letters

    proxy = TcpProxy(5672)
    stop = threading.Event()

    def follow() -> None:
        try:
            with Connection(f"amqp://guest:guest@127.0.0.1:{proxy.port}//") as connection:
                follow_dead_letters(connection, quorum, interval=0.2, stop=stop)
        finally:
            connections.close_all()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        time.sleep(0.5)  # a pass or two on the first connection
        proxy.cut()
        wait_for(
            lambda: "moving the dead letters of" in caplog.text, timeout=10, what="the lost pass"
        )
        proxy.restore()
        task_id = str(uuid.uuid4())
        Producer(broker.channel).publish(
            json.dumps([["after-the-cut"], {}, {}]), routing_key=quorum, exchange=quorum,
            headers={"id": task_id, "task": record.name, "lang": "py", "retries": 0},
            content_type="application/json", content_encoding="utf-8", delivery_mode=2,
        )  # fmt: skip
        for _ in range(2):  # past the delivery limit of 1: dead-lettered
            message = wait_for(
                lambda: broker.channel.basic_get(quorum, no_ack=False), timeout=10, what="it"
            )
            broker.channel.basic_reject(message.delivery_tag, requeue=True)
        wait_for(
            lambda: DeadTask.objects.filter(task_id=task_id).exists(),
            timeout=15,
            what="the follower to move it",
        )
    finally:
        stop.set()
        follower.join(timeout=10)
        proxy.close()
    assert not follower.is_alive()
    assert DeadTask.objects.get(task_id=task_id).reason == "dead_lettered"
