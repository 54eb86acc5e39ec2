"""Enqueue: the outbox row is written in the caller's transaction, with Celery's message."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import functools
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Task, chain, group, signals
from celery._state import _task_stack
from django.db import transaction
from django.test import override_settings
from django.utils import timezone
from kombu import Exchange, Queue

from reliable_tasks import PayloadNotSerializable, PayloadTooLarge, UnsupportedOption
from reliable_tasks.models import OutboxMessage
from reliable_tasks.outbox import ENQUEUED_AT_HEADER
from tests.support import QUEUE, ROUTED_QUEUE
from tests.testapp import tasks as testapp_tasks
from tests.testapp.models import Effect
from tests.testapp.tasks import record, routed

pytestmark = pytest.mark.django_db(transaction=True)


def test_delay_inside_a_rolled_back_transaction_leaves_no_row() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():  # noqa: PT012 - raised inside the transaction
        record.delay("rolled-back")
        assert OutboxMessage.objects.count() == 1
        raise RuntimeError("roll back")
    assert OutboxMessage.objects.count() == 0


def test_delay_returns_the_task_id_the_row_carries() -> None:
    with transaction.atomic():
        result = record.delay("committed", payload={"n": 1})
    row = OutboxMessage.objects.get()
    assert row.task_id == result.id
    assert row.headers["id"] == result.id
    assert row.headers["task"] == "tests.testapp.tasks.record"
    assert row.status == "pending"
    assert row.queue == QUEUE
    assert row.routing_key == QUEUE
    assert row.content_type == "application/json"


def test_delay_in_autocommit_commits_the_row_at_once() -> None:
    record.delay("autocommit")
    # Another connection sees it: the row was committed, not left in a transaction.
    from django.db import connections

    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM reliable_tasks_outbox")
            assert cursor.fetchone()[0] == 1
    finally:
        other.close()


def test_task_routes_decide_the_queue_as_apply_async_would() -> None:
    routed.delay("r")
    record.apply_async(("q",), queue="explicit-queue")
    rows = dict(OutboxMessage.objects.values_list("task_name", "queue"))
    assert rows["tests.testapp.tasks.routed"] == ROUTED_QUEUE
    assert rows["tests.testapp.tasks.record"] == "explicit-queue"


def test_countdown_and_eta_set_when_the_row_becomes_due() -> None:
    before = timezone.now()
    record.apply_async(("c",), countdown=60)
    eta = timezone.now() + dt.timedelta(hours=2)
    record.apply_async(("e",), eta=eta)
    due = {r.body.split('"')[1]: r.due_at for r in OutboxMessage.objects.all()}
    assert before + dt.timedelta(seconds=59) < due["c"] < timezone.now() + dt.timedelta(seconds=61)
    assert abs((due["e"] - eta).total_seconds()) < 0.01


@pytest.fixture(params=["topic", "direct"])
def quorum_queue(request: pytest.FixtureRequest) -> Iterator[Queue]:
    """A quorum queue in the Celery configuration, on an exchange of the given type: Celery's
    build then sends a message with a countdown or an eta through its native delayed delivery
    (topic, fanout), or warns that it cannot (direct)."""
    exchange = Exchange(f"rt-test-{request.param}", type=request.param)
    queue = Queue(
        "rt-test-quorum", exchange, routing_key="rt.quorum",
        queue_arguments={"x-queue-type": "quorum"},
    )  # fmt: skip
    queues = record.app.amqp.queues
    queues.add(queue)
    try:
        yield queue
    finally:
        queues.pop(queue.name)


def test_a_countdown_with_a_quorum_queue_is_held_by_the_relay_alone(
    quorum_queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """A row with a countdown or an eta is routed as one without: not to Celery's delay exchange
    (``celery_delayed_27``, where RabbitMQ would hold the message for its countdown again after
    the relay published it when due), and Celery warns of nothing."""
    before = timezone.now()
    with caplog.at_level("WARNING"):
        record.apply_async(("now",), queue=quorum_queue.name)
        record.apply_async(("countdown",), countdown=30, queue=quorum_queue.name)
        record.apply_async(("eta",), eta=before + dt.timedelta(minutes=5), queue=quorum_queue.name)
    rows = {r.body.split('"')[1]: r for r in OutboxMessage.objects.all()}
    now = rows.pop("now")
    assert now.exchange != "celery_delayed_27"
    for row in rows.values():
        assert (row.exchange, row.routing_key, row.queue) == (
            now.exchange,
            now.routing_key,
            now.queue,
        )
        assert row.due_at == dt.datetime.fromisoformat(row.headers["eta"])
    countdown_due = (rows["countdown"].due_at - before).total_seconds()
    assert 29 < countdown_due < 31
    assert rows["eta"].due_at == before + dt.timedelta(minutes=5)
    assert not [r for r in caplog.records if "delayed delivery" in r.getMessage()]


def test_before_task_publish_receivers_see_the_eta_of_a_countdown() -> None:
    """The eta a reliable task's countdown gets is among the message's headers when Celery
    sends ``before_task_publish``, as for a stock task; an eta header the call names wins."""
    seen: list[Any] = []

    def receiver(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        seen.append((headers or {}).get("eta"))

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        record.apply_async(("countdown",), countdown=60)
        record.apply_async(("named",), countdown=60, headers={"eta": "2030-01-01T00:00:00+00:00"})
    finally:
        signals.before_task_publish.disconnect(receiver)
    rows = {r.body.split('"')[1]: r.headers["eta"] for r in OutboxMessage.objects.all()}
    assert seen == [rows["countdown"], "2030-01-01T00:00:00+00:00"]
    assert rows["named"] == "2030-01-01T00:00:00+00:00"


def test_priority_expires_and_headers_are_kept_for_the_relay() -> None:
    record.apply_async(("p",), priority=7, expires=300, headers={"tenant": "acme"})
    row = OutboxMessage.objects.get()
    assert row.properties["priority"] == 7
    assert row.headers["tenant"] == "acme"
    assert row.headers["expires"] is not None


def test_json_types_kombu_supports_are_accepted() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    record.delay(
        "types", payload={"when": when, "id": uuid.UUID(int=1), "amount": decimal.Decimal("1.10")}
    )
    assert '"amount"' in OutboxMessage.objects.get().body


def test_an_unencodable_argument_is_named_and_the_transaction_stays_usable() -> None:
    with transaction.atomic():
        Effect.objects.create(key="before")
        with pytest.raises(PayloadNotSerializable) as info:
            record.delay("bad", payload={"items": [1, object()]})
        # The transaction is intact: the write before the error and after it both commit.
        Effect.objects.create(key="after")
    message = str(info.value)
    assert "task 'tests.testapp.tasks.record'" in message
    assert "kwargs['payload']['items'][1] = <object object at" in message
    assert "(type object) cannot be encoded as JSON" in message
    assert "Nothing was written to the outbox" in message
    assert OutboxMessage.objects.count() == 0
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["after", "before"]


@override_settings(RELIABLE_TASKS_MAX_PAYLOAD_BYTES=1024)
def test_a_payload_above_the_limit_is_refused_with_its_size() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        record.delay("big", payload="x" * 5000)
    assert (
        "is 6 KiB encoded (arguments and headers); the limit is RELIABLE_TASKS_MAX_PAYLOAD_BYTES = 1 KiB"
        in str(info.value)
    )
    assert OutboxMessage.objects.count() == 0


def test_pickle_is_refused() -> None:
    with pytest.raises(
        UnsupportedOption,
        match="called with serializer='pickle'; reliable tasks travel as JSON only",
    ):
        record.apply_async(("x",), serializer="pickle")
    assert OutboxMessage.objects.count() == 0


def test_signatures_chains_and_groups_go_through_the_outbox() -> None:
    record.s("sig").delay()
    chain(record.si("c1"), record.si("c2")).delay()
    group(record.si("g1"), record.si("g2")).delay()
    record.apply_async(("linked",), link=record.si("callback"))
    rows = list(OutboxMessage.objects.order_by("id"))
    first_args = [r.body for r in rows]
    assert len(rows) == 5
    assert any('"sig"' in b for b in first_args)
    # The chain travels as one message whose body embeds the rest of the chain.
    chained = next(r for r in rows if '"c1"' in r.body)
    assert '"c2"' in chained.body
    assert sum('"g1"' in b or '"g2"' in b for b in first_args) == 2
    linked = next(r for r in rows if '"linked"' in r.body)
    assert '"callback"' in linked.body


def test_the_rpc_result_backend_is_refused_with_what_to_use_instead() -> None:
    from celery.backends.rpc import RPCBackend

    from tests.celery_app import app

    original = app.backend
    app._local.backend = RPCBackend(app=app)
    try:
        with pytest.raises(UnsupportedOption, match="rpc:// result backend"):
            record.delay("rpc")
    finally:
        app._local.backend = original
    assert OutboxMessage.objects.count() == 0


# -- plain calls, built from a template ----------------------------------------------------------
# A plain call (``delay(*args)``, no options, outside a running task) after the first one of its
# task is built from a template of Celery's message instead of by Celery (``outbox.Template``).
# These tests count the calls that reach Celery's ``send_task`` (the ``celery_sends`` fixture)
# to tell the two paths apart.


def _but_the_ids(row: OutboxMessage) -> dict[str, Any]:
    """What two calls with the same arguments share: all but the task id and the enqueue time."""
    per_call = {"id", "root_id", ENQUEUED_AT_HEADER}
    return {
        "task_name": row.task_name, "queue": row.queue, "exchange": row.exchange,
        "routing_key": row.routing_key, "body": row.body, "content_type": row.content_type,
        "content_encoding": row.content_encoding, "retries": row.retries, "status": row.status,
        "headers": {k: v for k, v in row.headers.items() if k not in per_call},
        "properties": {k: v for k, v in row.properties.items() if k != "correlation_id"},
    }  # fmt: skip


@contextlib.contextmanager
def publish_receiver() -> Iterator[list[str]]:
    """A receiver of Celery's ``before_task_publish``: the ids of the messages it saw."""
    seen: list[str] = []

    def receiver(headers: dict[str, Any], **kwargs: Any) -> None:
        seen.append(headers["id"])

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        signals.before_task_publish.disconnect(receiver)


@pytest.mark.parametrize(
    ("task_name", "args", "kwargs"),
    [
        (
            "record",
            ("plain",),
            {"payload": {"nested": [1, "é\x00", None, 2.5], "deep": [[[["x"]]]]}},
        ),
        ("routed", ("through task_routes",), {}),
        ("with_options", ("task-level options",), {"note": "x" * 3000}),
    ],
    ids=["default-queue", "task-routes", "task-options"],
)
def test_a_message_from_the_template_is_the_one_celery_builds(
    celery_sends: list[str], task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    # By name: evaluating a task at collection time would finalize the Celery app too early.
    task = getattr(testapp_tasks, task_name)
    task.delay("first")  # Celery builds it; the template is made from it
    from_template = task.apply_async(args, kwargs)
    with publish_receiver() as seen:  # a receiver must see the call: Celery builds it
        by_celery = task.apply_async(args, kwargs)
    assert celery_sends == [task.name, task.name]
    assert seen == [by_celery.id]
    rows = {row.task_id: row for row in OutboxMessage.objects.all()}
    made = rows[from_template.id]
    assert _but_the_ids(made) == _but_the_ids(rows[by_celery.id])
    assert made.headers["id"] == made.headers["root_id"] == from_template.id
    assert made.properties["correlation_id"] == from_template.id
    assert from_template.ignored == by_celery.ignored == task.ignore_result


def test_a_changed_setting_is_honoured_by_the_next_call(celery_sends: list[str]) -> None:
    def queues() -> dict[str, str]:
        return {row.body: row.queue for row in OutboxMessage.objects.all()}

    record.delay("a")
    record.delay("b")
    with override_settings(CELERY_TASK_DEFAULT_QUEUE=QUEUE + ".other"):
        record.delay("c")
        record.delay("d")
    record.delay("e")
    conf = record.app.conf
    conf.task_default_queue = QUEUE + ".changed"  # in Celery's own configuration
    try:
        record.delay("f")
    finally:
        del conf.changes["task_default_queue"]
    record.delay("g")
    by_key = {json.loads(body)[0][0]: queue for body, queue in queues().items()}
    assert by_key == {
        "a": QUEUE, "b": QUEUE, "c": QUEUE + ".other", "d": QUEUE + ".other", "e": QUEUE,
        "f": QUEUE + ".changed", "g": QUEUE,
    }  # fmt: skip
    assert len(celery_sends) == 5  # a, c, e, f, g: after each change Celery builds again


def test_calls_with_options_or_from_a_running_task_go_through_celery(
    celery_sends: list[str],
) -> None:
    record.delay("template")
    record.apply_async(("countdown",), countdown=60)
    record.apply_async(("headers",), headers={"tenant": "t1"})
    parent = routed._get_current_object()
    _task_stack.push(parent)
    parent.push_request(id="parent-id", root_id="root-id", called_directly=False)
    try:
        child = record.delay("child")
    finally:
        parent.pop_request()
        _task_stack.pop()
    assert len(celery_sends) == 4
    row = OutboxMessage.objects.get(task_id=child.id)
    assert (row.headers["parent_id"], row.headers["root_id"]) == ("parent-id", "root-id")
    assert OutboxMessage.objects.get(headers__tenant="t1").headers["argsrepr"] == "('headers',)"


def test_wrong_arguments_are_refused_from_the_template_too(celery_sends: list[str]) -> None:
    record.delay("a")
    with pytest.raises(TypeError):
        record.delay()
    with pytest.raises(TypeError):
        record.delay("a", "b", "c")
    with pytest.raises(TypeError, match="must be a list or tuple"):
        record.apply_async({"a": 1})  # one argument, but not in a tuple
    with pytest.raises(PayloadNotSerializable, match=r"args\[0\]"):
        record.delay(object())
    assert celery_sends == [record.name]
    assert OutboxMessage.objects.count() == 1


def test_a_router_function_and_a_wrapper_of_apply_async_see_every_call(
    celery_sends: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record.delay("template")
    routed_args: list[Any] = []

    def route(name: str, args: Any, kwargs: Any, options: Any, **kw: Any) -> None:
        routed_args.append(args)

    router = record.app.amqp.router
    monkeypatch.setattr(router, "routes", [*router.routes, route])
    record.delay("a")
    record.delay("b")
    assert routed_args == [("a",), ("b",)]

    # Tracing libraries (sentry-sdk among them) wrap Celery's apply_async to add headers.
    celery_apply_async = Task.apply_async

    @functools.wraps(celery_apply_async)
    def traced(self: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options["headers"] = {**(options.get("headers") or {}), "trace": "t-1"}
        return celery_apply_async(self, args, kwargs, **options)

    monkeypatch.undo()  # the router as it was; the template is usable again
    celery_sends.clear()
    monkeypatch.setattr(Task, "apply_async", traced)
    record.delay("c")
    record.delay("d")
    traces = dict(OutboxMessage.objects.values_list("headers__argsrepr", "headers__trace"))
    assert traces["('c',)"] == traces["('d',)"] == "t-1"
