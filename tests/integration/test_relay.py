"""The relay against the real RabbitMQ: confirmed, batched, identical to apply_async."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Iterator

import pytest
from amqp import serialization as amqp_serialization
from celery import Celery
from celery.app.task import Task
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from reliable_tasks import outbox
from reliable_tasks.models import OutboxMessage, RelayHeartbeat
from reliable_tasks.relay import Relay
from tests.support import (
    QUEUE,
    ROUTED_QUEUE,
    Broker,
    ProcessFactory,
    effects,
    rabbitmqctl,
    wait_for,
)
from tests.testapp.tasks import plain_record, record, routed

pytestmark = pytest.mark.django_db(transaction=True)


def test_committed_rows_are_published_once_and_marked_after_the_confirm(
    broker: Broker, relay: Relay
) -> None:
    with transaction.atomic():
        ids = [record.delay(f"k{i}").id for i in range(3)]
    assert relay.drain() == 3
    messages = broker.get_all(expect=3)
    assert sorted(m.headers["id"] for m in messages) == sorted(ids)
    assert all(m.properties["delivery_mode"] == 2 for m in messages)
    rows = OutboxMessage.objects.all()
    assert {r.status for r in rows} == {"dispatched"}
    assert all(r.dispatched_at and r.publish_attempts == 1 for r in rows)
    assert relay.drain() == 0
    assert broker.depth() == 0


def test_the_relayed_message_is_the_one_apply_async_would_publish(
    broker: Broker, relay: Relay
) -> None:
    ours = record.apply_async(("same",), {"payload": {"a": [1, 2]}}, priority=3, headers={"h": "v"})
    relay.drain()
    # The same call through stock Celery, straight to the broker.
    Task.apply_async(
        record,
        ("same",),
        {"payload": {"a": [1, 2]}},
        task_id=ours.id,
        priority=3,
        headers={"h": "v"},
    )
    relayed, direct = broker.get_all(expect=2)
    # One header more: when the task was enqueued, for the enqueue-to-start latency.
    assert relayed.headers.pop("reliable_enqueued_at")
    assert relayed.headers == direct.headers
    assert relayed.body == direct.body
    assert json.loads(relayed.body) == [
        ["same"],
        {"payload": {"a": [1, 2]}},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    for prop in (
        "content_type",
        "content_encoding",
        "correlation_id",
        "reply_to",
        "priority",
        "delivery_mode",
    ):
        assert relayed.properties.get(prop) == direct.properties.get(prop), prop
    assert relayed.delivery_info["routing_key"] == direct.delivery_info["routing_key"] == QUEUE


def test_the_header_table_stored_at_enqueue_is_py_amqps_and_a_row_without_one_publishes_alike(
    broker: Broker, relay: Relay
) -> None:
    payload = {"nested": {"é": [1, 2.5, None, True, "x" * 300]}, "big": 2**40}
    with transaction.atomic():
        stored = record.delay("stored", payload=payload)
        written_by_the_relay = record.delay("stored", payload=payload)
    rows = {row.task_id: row for row in OutboxMessage.objects.all()}
    for row in rows.values():
        # The relay sends these bytes as the message's headers: the row's headers (in Celery's
        # order; jsonb keeps its own), as py-amqp writes them.
        table = bytes(row.header_table)
        (decoded,), _ = amqp_serialization.loads("F", table, 0)
        assert decoded == row.headers
        assert amqp_serialization.dumps("F", [decoded]) == table
    # A row written without its table (as rows from before it was stored): the relay writes it.
    OutboxMessage.objects.filter(task_id=written_by_the_relay.id).update(header_table=None)
    assert relay.drain() == 2
    messages = {m.headers["id"]: m for m in broker.get_all(expect=2)}
    for task_id in (stored.id, written_by_the_relay.id):
        assert messages[task_id].headers == rows[task_id].headers


def test_expires_becomes_the_ttl_counted_when_the_message_is_published(
    broker: Broker, relay: Relay
) -> None:
    with transaction.atomic():
        stored = record.apply_async(("ttl",), expires=300)
        written_by_the_relay = record.apply_async(("ttl",), expires=300)
    OutboxMessage.objects.filter(task_id=written_by_the_relay.id).update(header_table=None)
    assert relay.drain() == 2
    received = broker.get_all(expect=2)
    assert {m.headers["id"] for m in received} == {stored.id, written_by_the_relay.id}
    for message in received:  # the 'expires' header, in milliseconds from the publication
        assert 280_000 <= int(message.properties["expiration"]) <= 300_000, message.headers["id"]


def published_alone(broker: Broker, relay: Relay, queue: str, task_id: str) -> None:
    """The outbox's one row goes out with the relay's first batch, into ``queue``."""
    assert relay.drain(timeout=30) == 1
    [message] = broker.get_all(queue, expect=1)
    assert message.headers["id"] == task_id
    assert not OutboxMessage.objects.filter(status="pending").exists()


def test_an_expiry_beyond_rabbitmqs_longest_ttl_publishes_with_that_ttl(
    broker: Broker, relay: Relay
) -> None:
    """RabbitMQ takes a TTL of 2^32 - 1 ms (49.7 days) at most and closes the channel on a
    longer one; the worker still drops the message once its 'expires' header passes."""
    far = record.apply_async(("far",), expires=60 * 86400)
    assert relay.drain() == 1
    [message] = broker.get_all(expect=1)
    assert message.headers["id"] == far.id
    assert message.properties["expiration"] == str(2**32 - 1)
    assert not OutboxMessage.objects.filter(status="pending").exists()


def test_headers_just_within_the_enqueue_limit_fit_rabbitmqs_frame(
    broker: Broker, relay: Relay
) -> None:
    """The limit at enqueue leaves room in the content header's one frame (frame_max, 128 KiB)
    for the other properties: a message at the limit goes out."""
    blob = "x" * (outbox.MAX_HEADER_TABLE_BYTES - 600)
    result = record.apply_async(("big headers",), headers={"blob": blob})
    row = OutboxMessage.objects.get()
    assert (
        outbox.MAX_HEADER_TABLE_BYTES - 1000
        < len(row.header_table)
        <= outbox.MAX_HEADER_TABLE_BYTES
    )
    assert relay.drain(timeout=30) == 1
    [message] = broker.get_all(expect=1)
    assert (message.headers["id"], message.headers["blob"]) == (result.id, blob)


def test_a_queue_celery_makes_on_demand_is_declared_as_its_workers_declare_it(
    broker: Broker, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue named only in a call (not in task_queues) is made by Celery as
    task_create_missing_queue_type says: a relay in a process of its own, which never saw the
    call, declares it the same way, or the broker refuses the declaration of a quorum queue a
    worker made as a classic one, and the row could never go out."""
    name = f"{QUEUE}.on-demand"
    queues = record.app.amqp.queues
    monkeypatch.setattr(queues, "create_missing_queue_type", "quorum")
    broker.channel.queue_declare(
        name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
    )  # as a worker consuming it declared it
    try:
        result = record.apply_async(("on demand",), queue=name)
        queues.pop(name)  # the relay's process knows no such queue
        published_alone(broker, relay, name, result.id)
    finally:
        queues.pop(name, None)
        broker.channel.queue_delete(name)


def test_a_broker_without_confirms_gets_the_same_headers() -> None:
    """kombu's virtual transports (the demo's embedded ``filesystem://``) have no confirms:
    the relay publishes through a kombu producer, with the headers decoded from the table."""
    app = Celery("memory-relay", broker="memory://", set_as_current=False)
    with transaction.atomic():
        ids = {record.delay("memory").id, record.delay("memory-from-json").id}
    OutboxMessage.objects.filter(task_id__in=ids, body__contains="from-json").update(
        header_table=None
    )
    with Relay(app) as memory_relay:
        assert memory_relay.drain() == 2
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(QUEUE)
        received = [queue.get(timeout=5) for _ in ids]
        queue.close()
    stored = {row.task_id: row.headers for row in OutboxMessage.objects.all()}
    assert {m.headers["id"]: m.headers for m in received} == stored


def test_a_rolled_back_enqueue_is_never_published(broker: Broker, relay: Relay) -> None:
    with pytest.raises(ZeroDivisionError), transaction.atomic():  # noqa: PT012 - raised inside the transaction
        record.delay("never")
        1 / 0  # noqa: B018 - the error that rolls the transaction back
    assert relay.drain() == 0
    assert broker.get_all() == []


def test_rows_are_not_published_before_they_are_due(broker: Broker, relay: Relay) -> None:
    record.apply_async(("later",), countdown=3600)
    record.delay("now")
    assert relay.drain() == 1
    [message] = broker.get_all(expect=1)
    assert json.loads(message.body)[0] == ["now"]
    OutboxMessage.objects.filter(status="pending").update(due_at=timezone.now())
    assert relay.drain() == 1


def test_routing_follows_task_routes(broker: Broker, relay: Relay) -> None:
    routed.delay("r1")
    relay.drain()
    assert [json.loads(m.body)[0] for m in broker.get_all(ROUTED_QUEUE, expect=1)] == [["r1"]]
    assert broker.get_all(QUEUE) == []


def set_aside_between_two(broker: Broker, relay: Relay, **options: object) -> OutboxMessage:
    """Enqueue a task with ``options`` between two plain ones; drain. The two are delivered
    (once each); the row set aside, still pending, is returned."""
    record.delay("before")
    record.apply_async(("set aside",), **options)
    record.delay("after")
    relay.drain(timeout=30)
    delivered = sorted(json.loads(m.body)[0][0] for m in broker.get_all(expect=2))
    assert delivered == ["after", "before"]
    return OutboxMessage.objects.get(status="pending")


def test_a_message_the_broker_refuses_is_set_aside_and_the_rest_flow(
    broker: Broker, relay: Relay
) -> None:
    # The relay probes each exchange before publishing to it: the row for the missing one is
    # set aside, and the rest of the batch goes out once.
    refused = set_aside_between_two(
        broker, relay, exchange="rt-tests-no-such-exchange", routing_key="x", queue=None
    )
    assert "NOT_FOUND" in refused.last_error
    assert "rt-tests-no-such-exchange" in refused.last_error
    assert refused.due_at > timezone.now()


def test_a_header_amqp_cannot_carry_fails_its_row_and_the_rest_flow(
    broker: Broker, relay: Relay
) -> None:
    """JSON takes an integer of any size, an AMQP header table one of 64 bits at most: the
    row is set aside with the reason, and the relay goes on (it used to stop on it)."""
    row = set_aside_between_two(broker, relay, headers={"n": 2**64})
    assert "cannot build the message" in row.last_error
    assert "an integer beyond 64 bits" in row.last_error


def test_an_unroutable_message_is_returned_and_retried_later(
    broker: Broker, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="reliable_tasks")
    result = record.apply_async(
        ("unroutable",), exchange="amq.direct", routing_key="rt-tests-nobody-binds-this"
    )
    assert relay.run_once() == 0
    row = OutboxMessage.objects.get()
    # The relay's line in the one log form: a grep for the task id finds it.
    [line] = [r.getMessage() for r in caplog.records if f"id={result.id}" in r.getMessage()]
    assert line.startswith(f"task={record.name} id={result.id} outbox={row.pk} | not published (")
    assert "returned by the broker as unroutable" in line
    assert row.status == "pending"
    assert row.last_error == "returned by the broker as unroutable"
    assert row.publish_attempts == 1
    assert row.due_at > timezone.now()


def test_a_stock_celery_worker_runs_the_relayed_task(
    broker: Broker, relay: Relay, processes: ProcessFactory
) -> None:
    worker = processes.worker()
    with transaction.atomic():
        record.delay("stock-worker", payload={"x": 1})
    relay.drain()
    wait_for(lambda: effects("stock-worker"), timeout=60, what="the worker to run the task")
    assert effects("stock-worker") == ["stock-worker"]
    assert worker.poll() is None


def test_plain_celery_tasks_still_publish_directly(broker: Broker) -> None:
    plain_record.delay("plain")
    assert OutboxMessage.objects.count() == 0
    [message] = broker.get_all(expect=1)
    assert message.headers["task"] == plain_record.name


def test_the_relay_records_its_heartbeat(broker: Broker) -> None:
    with Relay(name="hb-test") as named:
        named._housekeeping()
    beat = RelayHeartbeat.objects.get(name="hb-test")
    assert beat.pid > 0
    assert beat.stopped_at is None


@override_settings(RELIABLE_TASKS_OUTBOX_RETENTION=__import__("datetime").timedelta(seconds=0))
def test_prune_deletes_only_dispatched_rows_past_retention(broker: Broker, relay: Relay) -> None:
    record.delay("old")
    relay.drain()
    record.delay("pending")
    assert outbox.prune(limit=10) == 1
    assert list(OutboxMessage.objects.values_list("status", flat=True)) == ["pending"]


def test_a_queue_the_broker_refuses_to_declare_is_isolated_and_the_rest_flow(
    broker: Broker, relay: Relay
) -> None:
    # A queue that exists with other settings: declaring it durable fails the channel.
    mismatched = f"{QUEUE}.mismatched"
    broker.channel.queue_declare(mismatched, durable=False, auto_delete=False)
    try:
        record.delay("before")
        record.apply_async(("refused",), queue=mismatched)
        record.delay("after")
        relay.drain(timeout=30)
        # Declared on a channel of its own: the refusal sets the row aside, fails no batch.
        delivered = Counter(json.loads(m.body)[0][0] for m in broker.get_all(expect=2))
        assert delivered == {"before": 1, "after": 1}
        refused = OutboxMessage.objects.get(status="pending")
        assert refused.last_error.startswith("refused by the broker: ")
        assert "PRECONDITION_FAILED" in refused.last_error
    finally:
        broker.channel.queue_delete(mismatched)


@contextlib.contextmanager
def max_message_size(limit: int) -> Iterator[None]:
    """RabbitMQ's message size limit, for the channels opened meanwhile; the default after."""
    default = 134_217_728
    rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {limit}).")
    try:
        yield
    finally:
        rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {default}).")


def test_a_row_refused_before_is_tried_again_alone_and_fails_no_other_row(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A message over the broker's size limit closes the channel as it is published: the batch
    fails after the broker took the rows before it, which go out twice. Tried again, the row
    goes out on its own, and fails no other row."""
    with max_message_size(4096), Relay() as relay:
        refused_id = record.delay("refused", payload="x" * 8192).id
        relay.drain(timeout=30)
        refused = OutboxMessage.objects.get(task_id=refused_id, status="pending")
        assert refused.last_error.startswith("refused by the broker: ")
        # Due again, between two rows that are fine: one claim takes all three.
        record.delay("before")
        OutboxMessage.objects.filter(pk=refused.pk).update(due_at=timezone.now())
        record.delay("after")
        with caplog.at_level(logging.WARNING, logger="reliable_tasks.relay"):
            relay.drain(timeout=30)
    assert "channel error in a batch" not in caplog.text
    delivered = Counter(json.loads(m.body)[0][0] for m in broker.get_all(expect=2))
    assert delivered == {"before": 1, "after": 1}
    refused.refresh_from_db()
    assert (refused.status, refused.publish_attempts) == ("pending", 2)
    assert "PRECONDITION_FAILED" in refused.last_error


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        # 200 characters fit the column, 400 bytes in UTF-8 do not fit AMQP's short string: a
        # row written before enqueue checked the length.
        ("routing_key", "é" * 200, "the routing key is 400 bytes in UTF-8"),
        ("exchange", "é" * 200, "the exchange name is 400 bytes in UTF-8"),
        ("content_encoding", "no-such-codec", "content_encoding 'no-such-codec'"),
    ],
)
def test_a_row_amqp_cannot_frame_fails_alone_and_the_rest_flow(
    broker: Broker, relay: Relay, field: str, value: str, reason: str
) -> None:
    """The relay used to die on such a row, and every restart on it again: the outbox stopped."""
    record.delay("before")
    unframeable = record.delay("set aside").id
    record.delay("after")
    OutboxMessage.objects.filter(task_id=unframeable).update(**{field: value})
    relay.drain(timeout=30)
    delivered = sorted(json.loads(m.body)[0][0] for m in broker.get_all(expect=2))
    assert delivered == ["after", "before"]
    row = OutboxMessage.objects.get(status="pending")
    assert row.task_id == unframeable
    assert row.last_error.startswith("cannot build the message: ")
    assert reason in row.last_error
    assert row.publish_attempts == 1
    assert row.due_at > timezone.now()


def test_a_text_body_with_an_empty_content_encoding_is_published_as_utf_8(
    broker: Broker, relay: Relay
) -> None:
    """A dead task captured from a producer that named no encoding, then requeued."""
    result = record.delay("naïve ☕")
    OutboxMessage.objects.update(content_encoding="")
    assert relay.drain() == 1
    [message] = broker.get_all(expect=1)
    assert message.properties["content_encoding"] == "utf-8"
    assert json.loads(message.body)[0] == ["naïve ☕"]  # py-amqp decoded it as UTF-8
    assert message.headers["id"] == result.id


def test_a_naive_expires_is_utc_as_the_worker_reads_it(broker: Broker, relay: Relay) -> None:
    """Celery keeps a naive ``expires`` naive; its worker takes it as UTC (maybe_make_aware)."""
    in_five_minutes = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(minutes=5)
    result = record.apply_async(("naive",), expires=in_five_minutes)
    assert OutboxMessage.objects.get().headers["expires"] == in_five_minutes.isoformat()
    assert relay.run_once() == 1
    [message] = broker.get_all(expect=1)
    assert message.headers["id"] == result.id
    assert 280_000 <= int(message.properties["expiration"]) <= 300_000


@pytest.mark.parametrize("naive", [False, True], ids=["seconds", "naive-datetime"])
def test_expires_becomes_the_ttl_on_a_broker_without_confirms(naive: bool) -> None:
    """kombu's producer takes the TTL in seconds (the relay used to give it milliseconds as
    text, and died on it), and a naive expires is UTC there too."""
    app = Celery("memory-relay-ttl", broker="memory://", set_as_current=False)
    in_five_minutes = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(minutes=5)
    record.apply_async(("ttl",), expires=in_five_minutes if naive else 300)
    with Relay(app) as memory_relay:
        assert memory_relay.drain() == 1
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(QUEUE)
        message = queue.get(timeout=5)
        queue.close()
    assert 280_000 <= int(message.properties["expiration"]) <= 300_000


@override_settings(USE_TZ=False)
def test_expires_becomes_the_ttl_when_django_keeps_naive_times(
    broker: Broker, relay: Relay
) -> None:
    record.apply_async(("ttl",), expires=300)
    assert relay.run_once() == 1
    [message] = broker.get_all(expect=1)
    assert 280_000 <= int(message.properties["expiration"]) <= 300_000


def test_a_returned_message_whose_row_has_no_correlation_id_is_not_marked_dispatched(
    broker: Broker, relay: Relay
) -> None:
    """A requeued dead task from a foreign producer may have no correlation_id: the relay
    gives it the task id, as Celery does, which is how a return finds its row."""
    returned = record.apply_async(
        ("unroutable",), exchange="amq.direct", routing_key="rt-tests-nobody-binds-this"
    )
    routed_ok = record.delay("routable")
    for row in OutboxMessage.objects.all():
        del row.properties["correlation_id"]
        row.save(update_fields=["properties"])
    assert relay.run_once() == 1
    [message] = broker.get_all(expect=1)
    assert message.properties["correlation_id"] == message.headers["id"] == routed_ok.id
    row = OutboxMessage.objects.get(task_id=returned.id)
    assert row.status == "pending"
    assert row.last_error == "returned by the broker as unroutable"


def test_a_queue_deleted_while_the_relay_runs_is_declared_again_after_a_return(
    broker: Broker, relay: Relay
) -> None:
    record.delay("declares the queue")
    assert relay.run_once() == 1
    broker.channel.queue_delete(QUEUE)
    record.delay("after the deletion")
    assert relay.run_once() == 0  # returned: the relay thought the queue was there
    assert OutboxMessage.objects.get(status="pending").last_error == (
        "returned by the broker as unroutable"
    )
    OutboxMessage.objects.filter(status="pending").update(due_at=timezone.now())
    assert relay.run_once() == 1
    [message] = broker.get_all(expect=1)
    assert json.loads(message.body)[0] == ["after the deletion"]


def test_an_exchange_that_only_its_queues_declaration_makes_is_not_taken_for_missing(
    broker: Broker, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a broker that has never seen it, a queue on a topic exchange of its own: the relay
    declares the queue (and so its exchange) before it checks the batch's exchanges, and the
    row goes out with its first batch instead of being set aside as refused."""
    from kombu import Exchange, Queue

    name = f"{QUEUE}.fresh"
    exchange = Exchange(f"{name}.topic", "topic", durable=True)
    queues = record.app.amqp.queues
    queues.add(Queue(name, exchange, routing_key="fresh.#"))
    try:
        result = record.apply_async(("fresh",), queue=name)
        row = OutboxMessage.objects.get()
        assert (row.exchange, row.queue) == (exchange.name, name)
        published_alone(broker, relay, name, result.id)
    finally:
        queues.pop(name, None)
        broker.channel.queue_delete(name)
        broker.channel.exchange_delete(exchange.name)
