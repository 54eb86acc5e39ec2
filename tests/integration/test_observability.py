"""Status, health, metrics and the operator commands, on the real database and Redis."""

from __future__ import annotations

import datetime as dt
import io
import json
import re

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reliable_tasks import metrics, testing
from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, RelayHeartbeat
from reliable_tasks.relay import Relay
from tests.support import make_dead_task
from tests.testapp.tasks import pay, record

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _uses_redis(redis_service: None) -> None:
    """The shared counters live in the cache."""


def beat(name: str = "relay-1", seconds_ago: float = 0.0) -> None:
    seen = timezone.now() - dt.timedelta(seconds=seconds_ago)
    RelayHeartbeat.objects.create(
        name=name, hostname="h", pid=1, started_at=seen, last_seen_at=seen
    )


def make_dead(order_id: int) -> None:
    pay.apply((order_id,), {"outcome": "declined"})


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("reliable_tasks", *args, stdout=out)
    return out.getvalue()


def test_the_snapshot_counts_backlog_dispatches_retries_dead_tasks_and_keys() -> None:
    record.delay("due")
    record.apply_async(("later",), countdown=600)
    OutboxMessage.objects.filter(task_name=record.name, due_at__lte=timezone.now()).update(
        due_at=timezone.now() - dt.timedelta(seconds=30)
    )
    pay.apply((1,), {"outcome": "timeout"})  # a retry waits in the outbox
    make_dead(2)
    record.apply(("ran",), task_id="ran")
    snap = metrics.snapshot()
    assert snap.outbox_pending == 3
    assert snap.retries_scheduled == 1
    assert 29 < (snap.oldest_due_age_seconds or 0) < 40
    assert snap.dead_by_reason == {"give_up": 1}
    assert snap.dead_by_task == {pay.name: 1}
    # PostgreSQL's estimate exists once the table was analyzed; until then the count is exact.
    if not snap.ledger_keys_estimated:
        assert snap.ledger_keys == 1


def test_worker_counters_and_histograms_are_shared_through_the_cache() -> None:
    before = metrics.snapshot()
    record.delay("counted")
    testing.run_enqueued()
    record.apply(("counted",), task_id=OutboxMessage.objects.get().task_id)  # a duplicate
    after = metrics.snapshot()
    assert after.counters["duplicate_hits"] == before.counters["duplicate_hits"] + 1
    assert after.histograms["latency"].count == before.histograms["latency"].count + 1
    assert after.histograms["duration"].count >= before.histograms["duration"].count + 1
    assert after.histograms["latency"].buckets["+Inf"] == after.histograms["latency"].count


def test_health_fails_without_a_relay_and_passes_with_one(client: Client) -> None:
    response = client.get("/rt/health/")
    assert response.status_code == 503
    assert (
        "no relay heartbeat in the last 60 s; none has ever run here"
        in response.json()["reasons"][0]
    )
    RelayHeartbeat.objects.create(
        name="gone", hostname="h", pid=2, started_at=timezone.now(), last_seen_at=timezone.now(),
        stopped_at=timezone.now(),
    )  # fmt: skip
    assert "every relay recorded has stopped" in client.get("/rt/health/").json()["reasons"][0]
    beat(seconds_ago=1)
    response = client.get("/rt/health/")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@override_settings(RELIABLE_TASKS_HEALTH_MAX_DUE_AGE=10)
def test_health_fails_on_an_old_backlog_and_shows_no_arguments(client: Client) -> None:
    beat()
    record.delay("s3cr3t-argument")
    OutboxMessage.objects.update(due_at=timezone.now() - dt.timedelta(seconds=60))
    response = client.get("/rt/health/")
    assert response.status_code == 503
    [reason] = response.json()["reasons"]
    assert reason.startswith("the oldest due outbox row has waited 60 s (more than 10 s)")
    assert "s3cr3t" not in response.content.decode()


@override_settings(RELIABLE_TASKS_HEALTH_MAX_DUE_AGE=30)
def test_health_fails_when_a_row_keeps_failing_to_publish_though_no_due_row_waits(
    client: Client, relay: Relay
) -> None:
    beat()
    record.apply_async(
        ("s3cr3t-argument",), exchange="rt-tests-no-such-exchange", routing_key="x", queue=None
    )
    assert relay.run_once() == 0
    # Refused once, just now: not yet news, even for a row written long ago (a countdown).
    OutboxMessage.objects.update(created_at=F("created_at") - dt.timedelta(hours=1))
    assert client.get("/rt/health/").status_code == 200
    # Two minutes on, the relay's backoff is due again and the broker refuses it again.
    OutboxMessage.objects.update(
        failing_since=F("failing_since") - dt.timedelta(seconds=120), due_at=timezone.now()
    )
    assert relay.run_once() == 0
    row = OutboxMessage.objects.get()
    assert (row.status, row.publish_attempts) == ("pending", 2)
    assert row.due_at > timezone.now()  # set aside again: the due age does not see it
    response = client.get("/rt/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["outbox"]["oldest_due_age_seconds"] is None
    assert body["outbox"]["failing"] == 1
    [reason] = body["reasons"]
    assert reason.startswith(
        "1 outbox row fails to publish; the broker has refused one for 120 s (more than 30 s)"
    )
    assert "last error" in reason
    assert "s3cr3t" not in response.content.decode()
    text = client.get("/rt/metrics/").content.decode()
    assert "reliable_tasks_outbox_failing 1.0" in text
    assert re.search(r"^reliable_tasks_outbox_oldest_failing_age_seconds 12\d\.", text, re.M)


def test_a_stale_relay_fails_health_with_when_it_was_last_seen(client: Client) -> None:
    beat(seconds_ago=120)
    response = client.get("/rt/health/")
    assert response.status_code == 503
    assert "the last was seen 120 s ago" in response.json()["reasons"][0]


def test_metrics_are_served_in_prometheus_text_format(client: Client) -> None:
    beat()
    record.delay("m")
    make_dead(3)
    text = client.get("/rt/metrics/").content.decode()
    assert "reliable_tasks_outbox_pending 1.0" in text
    assert 'reliable_tasks_dead_tasks_by_reason{reason="give_up"} 1.0' in text
    assert f'reliable_tasks_dead_tasks_by_task{{task="{pay.name}"}} 1.0' in text
    assert 'reliable_tasks_relay_seconds_since_heartbeat{relay="relay-1"}' in text
    assert "reliable_tasks_task_latency_seconds_bucket" in text
    assert "reliable_tasks_duplicate_hits_total" in text


def test_status_prints_for_people_and_for_machines() -> None:
    beat()
    record.delay("s")
    make_dead(4)
    human = run("status")
    assert "reliable_tasks status at" in human
    assert "pending 1" in human
    assert "give_up" in human
    data = json.loads(run("status", "--json"))
    assert data["outbox_pending"] == 1
    assert data["dead_total"] == 1
    assert data["health"]["ok"] is True
    assert data["relays"][0]["name"] == "relay-1"


def test_requeue_command_filters_and_dry_runs() -> None:
    make_dead(5)
    make_dead(6)
    assert (
        run("requeue", "--reason", "give_up", "--dry-run")
        == "would requeue 2 dead tasks (dry run: nothing changed)\n"
    )
    assert DeadTask.objects.filter(status="dead").count() == 2
    first = DeadTask.objects.order_by("id").first()
    assert first is not None
    assert run("requeue", "--id", str(first.pk)) == "requeued 1 dead tasks through the outbox\n"
    assert DeadTask.objects.get(pk=first.pk).status == "requeued"
    assert run("requeue", "--task", "no.such.task") == "requeued 0 dead tasks through the outbox\n"
    with pytest.raises(CommandError, match="say which dead tasks to requeue"):
        run("requeue")
    assert (
        run("requeue", "--all", "--since", "2000-01-01T00:00:00")
        == "requeued 1 dead tasks through the outbox\n"
    )


def test_each_requeue_filter_narrows_the_dead_tasks_it_selects() -> None:
    long_ago = timezone.now() - dt.timedelta(days=3)
    make_dead_task(pay, 1, reason="exhausted")
    make_dead_task(pay, 2, reason="give_up", exc_type="tests.testapp.tasks.CardDeclined")
    make_dead_task(record, "r", reason="exhausted", exc_type="builtins.ValueError")
    make_dead_task(record, "old", reason="crash_loop", exc_type="", last_failed_at=long_ago)

    def would(*filters: str) -> int:
        out = run("requeue", *filters, "--dry-run")
        return int(out.split()[2])

    assert would("--all") == 4
    assert would("--task", pay.name) == 2
    assert would("--task", record.name) == 2
    assert would("--reason", "exhausted") == 2
    assert would("--reason", "crash_loop") == 1
    assert would("--exc-type", "tests.testapp.tasks.CardDeclined") == 1
    assert would("--exc-type", "builtins.ValueError") == 1
    since = (timezone.now() - dt.timedelta(days=1)).isoformat()
    assert would("--since", since) == 3
    assert would("--task", pay.name, "--reason", "exhausted") == 1
    assert DeadTask.objects.filter(status="dead").count() == 4  # dry runs changed nothing
    with pytest.raises(CommandError, match="--since takes an ISO 8601 time"):
        run("requeue", "--since", "yesterday")


def test_requeue_with_renewed_keys_sends_new_task_ids() -> None:
    dead_task = make_dead_task(pay, 3, reason="exhausted")
    assert run("requeue", "--task", pay.name, "--renew-key") == (
        "requeued 1 dead tasks through the outbox\n"
    )
    [row] = OutboxMessage.objects.filter(status="pending")
    assert row.task_id != dead_task.task_id
    dead_task.refresh_from_db()
    assert (dead_task.status, dead_task.requeued_task_id) == ("requeued", row.task_id)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_prune_deletes_in_batches_and_draws_a_bar_on_a_terminal() -> None:
    retention = dt.timedelta(days=7)
    long_ago = timezone.now() - retention - dt.timedelta(days=1)
    for n in range(5):
        record.delay(f"prune-{n}")
    OutboxMessage.objects.update(status="dispatched", dispatched_at=long_ago)
    for n in range(5):
        record.apply((f"key-{n}",))
    IdempotencyKey.objects.update(completed_at=long_ago)
    for n in range(5):
        dead_task = make_dead_task(record, f"dead-{n}", attempts=1)
        DeadTask.objects.filter(pk=dead_task.pk).update(
            status="discarded", status_changed_at=timezone.now() - dt.timedelta(days=31)
        )
    OutboxMessage.objects.filter(status="dispatched").update(dispatched_at=long_ago)
    kept = make_dead_task(record, "kept")  # dead, nobody acted on it: never pruned
    terminal = _Terminal()
    with CaptureQueriesContext(connection) as captured:
        call_command("reliable_tasks", "prune", "--batch-size", "2", stdout=terminal)
    out = terminal.getvalue()
    assert out.endswith(
        "pruned 10 dispatched outbox rows, 5 idempotency keys and 5 old dead tasks and "
        "attempt records\n"
    )
    # 10 outbox rows (the 5 tasks' and 5 dead tasks' messages) in batches of 2: 5 DELETEs.
    outbox_deletes = [
        q
        for q in captured.captured_queries
        if q["sql"].startswith('DELETE FROM "reliable_tasks_outbox"')
    ]
    assert len(outbox_deletes) == 5
    assert f"[{'#' * 30}] 10 / 10" in out
    assert f"[{'#' * 12}{'.' * 18}] 4 / 10" in out  # two batches in
    assert f"[{'#' * 30}] 5 / 5" in out
    assert f"[{'.' * 30}] 0 / 10" in out  # the bar as it starts
    assert list(DeadTask.objects.values_list("pk", flat=True)) == [kept.pk]
    assert not IdempotencyKey.objects.exists()
    # Off a terminal: the summary only.
    assert run("prune") == (
        "pruned 0 dispatched outbox rows, 0 idempotency keys and 0 old dead tasks and attempt "
        "records\n"
    )


def test_status_watch_refreshes_until_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    record.delay("watched")
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr("reliable_tasks.management.commands.reliable_tasks.time.sleep", sleep)
    lines = run("status", "--json", "--watch", "0.5").splitlines()
    assert sleeps == [0.5, 0.5, 0.5]
    assert len(lines) == 3
    assert all(json.loads(line)["outbox_pending"] == 1 for line in lines)
    for watch in ("0", "nan"):
        with pytest.raises(CommandError, match="--watch takes a finite number of seconds > 0"):
            run("status", "--watch", watch)


@pytest.mark.postgres
def test_health_and_status_say_when_the_database_is_gone() -> None:
    """The database session is ended under the app (as a failover or restart does)."""
    import psycopg

    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    params = connection.get_connection_params()
    try:
        with psycopg.connect(
            host=params["host"], port=params.get("port", 5432), user=params["user"],
            dbname=params["dbname"], autocommit=True,
        ) as admin:  # fmt: skip
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        response = Client().get("/rt/health/")
        assert response.status_code == 503
        body = response.json()
        assert set(body) == {"status", "reasons"}
        assert body["status"] == "failing"
        assert body["reasons"][0].startswith("database unreachable (")
        assert "the outbox cannot be read" in body["reasons"][0]
        with pytest.raises(CommandError, match="database unreachable"):
            run("status")
    finally:
        connection.close()  # the next use reconnects
    assert Client().get("/rt/health/").status_code in (200, 503)
    assert "database unreachable" not in Client().get("/rt/health/").content.decode()


def test_metrics_without_prometheus_client_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    response = Client().get("/rt/metrics/")
    assert response.status_code == 501
    assert "pip install 'reliable-tasks[metrics]'" in response.content.decode()


@pytest.mark.postgres
def test_the_snapshot_queries_use_indexes_on_large_tables() -> None:
    """EXPLAIN every query the snapshot sends, on an outbox of 200,000 dispatched rows and a
    dead-task table of 100,000 requeued or discarded ones: none reads a whole table."""
    assert connection.vendor == "postgresql"
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO reliable_tasks_outbox (task_id, task_name, queue, exchange, routing_key, headers,
                properties, body, content_type, content_encoding, status, created_at, due_at,
                dispatched_at, publish_attempts, last_error, failing_since, retries)
            SELECT g::text, 't', 'q', '', 'q', '{}', '{}', '[]', 'application/json', 'utf-8',
                   CASE WHEN g <= 1000 THEN 'pending' ELSE 'dispatched' END, %s,
                   %s - (g || ' seconds')::interval,
                   CASE WHEN g <= 1000 THEN NULL ELSE %s - ((g - 1000) || ' seconds')::interval END,
                   1, CASE WHEN g <= 10 THEN 'nacked by the broker' ELSE '' END,
                   CASE WHEN g <= 10 THEN %s END,
                   CASE WHEN g <= 100 THEN 1 ELSE 0 END
            FROM generate_series(1, 201000) g
            """,
            [now, now, now, now],
        )
        cursor.execute(
            """
            INSERT INTO reliable_tasks_dead (task_id, task_name, idempotency_key, queue, exchange,
                routing_key, headers, properties, body, content_type, content_encoding, reason,
                exc_type, exc_message, attempts, attempt_count, first_failed_at, last_failed_at,
                status, status_changed_by, requeued_task_id)
            SELECT g::text, 'shop.task_' || (g %% 50), '', 'q', '', 'q', '{}', '{}', '[]',
                   'application/json', 'utf-8',
                   CASE WHEN g %% 3 = 0 THEN 'exhausted' ELSE 'give_up' END, 'E', '', '[]', 1,
                   %s, %s,
                   CASE WHEN g <= 500 THEN 'dead' WHEN g %% 2 = 0 THEN 'requeued' ELSE 'discarded' END,
                   '', ''
            FROM generate_series(1, 100500) g
            """,
            [now, now],
        )
        cursor.execute("ANALYZE reliable_tasks_outbox")
        cursor.execute("ANALYZE reliable_tasks_dead")
    with CaptureQueriesContext(connection) as captured:
        snap = metrics.snapshot(now=now)
    # The figures, as a check that the queries explained below are the ones that count them.
    assert (snap.outbox_pending, snap.outbox_due, snap.retries_scheduled) == (1000, 1000, 100)
    assert snap.outbox_failing == 10
    assert snap.dispatched_last_minute == 60
    assert sum(snap.dead_by_reason.values()) == sum(snap.dead_by_task.values()) == 500
    tables = ("reliable_tasks_outbox", "reliable_tasks_dead")
    plans = {}
    with connection.cursor() as cursor:
        for query in captured.captured_queries:
            if any(table in query["sql"] for table in tables):
                cursor.execute("EXPLAIN " + query["sql"])
                plans[query["sql"]] = "\n".join(row[0] for row in cursor.fetchall())
    # pending, due, oldest due, failing, dispatched in the last minute, retries, dead by reason
    # and by task
    assert len(plans) == 8, list(plans)
    for sql, plan in plans.items():
        for table in tables:
            assert f"Seq Scan on {table}" not in plan, f"{sql}\n{plan}"
        assert "Index" in plan, f"{sql}\n{plan}"
        print(f"-- {sql}\n{plan}\n")
    # Refused rows are counted from their own small index, not by reading every pending row.
    [failing] = [plan for sql, plan in plans.items() if "failing_since" in sql]
    assert "using rt_outbox_failing" in failing, failing
