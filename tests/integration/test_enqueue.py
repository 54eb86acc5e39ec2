"""Enqueue: the outbox row is written in the caller's transaction, with Celery's message."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest
from celery import chain, group
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from reliable_tasks import PayloadNotSerializable, PayloadTooLarge, UnsupportedOption
from reliable_tasks.models import OutboxMessage
from tests.support import QUEUE, ROUTED_QUEUE
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
