"""The execution ledger in one process, on the real database and Redis."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache, caches
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reliable_tasks import IdempotencyKeyReused, InvalidIdempotencyKey, ledger, pruning
from reliable_tasks.models import IdempotencyKey, KeyResult, OutboxMessage, TaskAttempt
from reliable_tasks.signals import task_deferred
from tests.support import TcpProxy
from tests.testapp.models import Effect, GatewayCharge, Observed
from tests.testapp.tasks import (
    charge,
    leased,
    leased_retry_with_other_args,
    record,
    record_quietly,
    sees_its_own_mark,
    swallows_a_database_error,
    write_then_fail,
)

pytestmark = pytest.mark.django_db(transaction=True)


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _needs_redis(redis_service: None) -> None:
    """These tests count cache hits."""


@contextlib.contextmanager
def ledger_refuses(event: str, key: str, message: str, *, result: bool = False) -> Iterator[None]:
    """A PostgreSQL trigger makes the ledger refuse ``event`` (INSERT, UPDATE) for ``key``; with
    ``result``, the stored results' table refuses the result ``key`` (``record`` returns its key)."""
    table, when = (
        ("reliable_tasks_ledger_result", f"NEW.result = to_jsonb('{key}'::text)")
        if result
        else ("reliable_tasks_ledger", f"NEW.key = '{key}'")
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION rt_test_refuse() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{message}'; END $$ LANGUAGE plpgsql"
        )
        cursor.execute(
            f"CREATE TRIGGER rt_test_refuse BEFORE {event} ON {table} FOR EACH ROW "
            f"WHEN ({when}) EXECUTE FUNCTION rt_test_refuse()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER rt_test_refuse ON {table}")
            cursor.execute("DROP FUNCTION rt_test_refuse()")


def test_a_second_execution_with_the_same_task_id_returns_the_stored_result_without_running() -> (
    None
):
    first = record.apply(("once",), task_id="fixed-id")
    second = record.apply(("once",), task_id="fixed-id")
    assert first.get() == second.get() == "once"
    assert Effect.objects.filter(key="once").count() == 1
    key = IdempotencyKey.objects.get()
    assert (key.task_name, key.key, key.state, key.task_id) == (
        record.name,
        "fixed-id",
        "done",
        "fixed-id",
    )
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", True)]


def test_an_atomic_key_is_written_done_in_one_statement_and_then_only_its_result_is_stored() -> (
    None
):
    """The claim commits only with the task's writes, so it is written "done" at once; what
    follows is the result's plain insert into a table of its own, two values by the claim's
    primary key, or nothing when there is none. The ledger's row is not written again."""

    def ledger_statements(task: object, key: str) -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            task.apply((key,), task_id=key)  # type: ignore[attr-defined]
        statements = [" ".join(q["sql"].split()) for q in queries]
        return [
            sql.partition(") ON CONFLICT (")[2].partition(")")[2].split(" WHERE")[0]
            if '"reliable_tasks_ledger" ' in sql
            else sql.partition(" VALUES")[0]
            for sql in statements
            if "reliable_tasks_ledger" in sql
        ]

    claim, result = (
        ' DO NOTHING RETURNING "token", "id"',
        'INSERT INTO "reliable_tasks_ledger_result" ("ledger_id", "result")',
    )
    assert ledger_statements(record, "with-result") == [claim, result]
    claimed = IdempotencyKey.objects.get(key="with-result")
    assert ledger_statements(record_quietly, "no-result") == [claim]
    keys = {k.key: k for k in IdempotencyKey.objects.all()}
    assert len(keys) == 2
    assert (keys["with-result"].token, keys["with-result"].attempts) == (claimed.token, 1)
    assert keys["with-result"].updated_at == claimed.updated_at
    assert keys["with-result"].result == "with-result"
    assert keys["no-result"].result is None
    assert list(KeyResult.objects.values_list("key_id", "result")) == [(claimed.id, "with-result")]
    for key in keys.values():
        assert key.state == "done"
        assert key.completed_at is not None
        assert key.lease_expires_at is None
    assert Effect.objects.count() == 2


@pytest.mark.postgres
def test_the_result_carries_the_commit_in_its_round_trip_and_a_failure_there_rolls_all_back() -> (
    None
):
    """The result's insert is the outermost transaction's last statement: the COMMIT goes in
    the same string (psycopg 3's client-side binding), and the server's transaction is over
    when it returns. If that statement fails, nothing of the task is committed."""
    from psycopg.pq import TransactionStatus

    after_update: list[tuple[bool, TransactionStatus]] = []

    def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        outcome = execute(sql, params, many, context)
        if '"reliable_tasks_ledger_result"' in sql:
            status = connection.connection.info.transaction_status
            after_update.append((sql.rstrip().endswith("COMMIT"), status))
        return outcome

    with connection.execute_wrapper(watch):
        assert record.apply(("carried",), task_id="carried").get() == "carried"
    assert after_update == [(True, TransactionStatus.IDLE)]
    assert IdempotencyKey.objects.get(key="carried").result == "carried"
    assert Effect.objects.filter(key="carried").count() == 1
    # The commit's on_commit work ran: a duplicate is answered by the cache.
    assert record.apply(("carried",), task_id="carried").get() == "carried"
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", True)]

    with ledger_refuses("INSERT", "refused", "result refused", result=True):
        outcome = record.apply(("refused",), task_id="refused")
    assert outcome.state == "RETRY"
    assert not Effect.objects.filter(key="refused").exists()
    assert not IdempotencyKey.objects.filter(key="refused").exists()
    assert not KeyResult.objects.filter(result="refused").exists()
    [attempt] = TaskAttempt.objects.filter(task_id="refused")
    assert "result refused" in attempt.message


@pytest.mark.postgres
def test_the_claim_carries_the_transactions_begin_one_round_trip_less(tmp_path: Path) -> None:
    """What goes over the wire, from libpq's own trace: the claim's query string starts the
    transaction, psycopg sends no BEGIN of its own, and the result's insert ends it."""
    from psycopg import pq

    connection.ensure_connection()
    raw = connection.connection
    trace = tmp_path / "libpq.trace"
    with trace.open("w") as out:
        raw.pgconn.trace(out.fileno())
        raw.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            assert record.apply(("wire",), task_id="wire").get() == "wire"
        finally:
            raw.pgconn.untrace()
    # One message per entry; a query's text spans lines where the SQL does.
    messages = re.split(r"^(?=[FB]\t)", trace.read_text(), flags=re.MULTILINE)
    sent = [
        " ".join(m.split("\t", 3)[3].split()).strip('"')
        for m in messages
        if m.startswith("F\t") and m.split("\t", 3)[2] == "Query"
    ]
    assert [query.split()[:2] for query in sent] == [
        ["BEGIN;", "INSERT"],  # the claim, carrying the BEGIN
        ["INSERT", "INTO"],  # the task's own write
        ["INSERT", "INTO"],  # the result, carrying the COMMIT
    ], sent
    assert '"reliable_tasks_ledger"' in sent[0]
    assert 'INTO "reliable_tasks_ledger_result"' in sent[2]
    assert sent[2].endswith("; COMMIT")
    assert Effect.objects.filter(key="wire").count() == 1
    assert IdempotencyKey.objects.get(key="wire").result == "wire"


@pytest.mark.postgres
def test_the_carried_begin_keeps_the_isolation_level_and_leaves_psycopg_as_django_set_it() -> None:
    """The BEGIN is psycopg's own, with the connection's isolation level; during the task's
    body psycopg counts as out of autocommit again (Django's server-side cursors depend on it)."""
    from psycopg import IsolationLevel
    from psycopg.pq import TransactionStatus

    seen: list[tuple[str, bool, TransactionStatus]] = []

    def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if "testapp_effect" in sql:  # the task's body, after the claim
            raw = connection.connection
            with raw.cursor() as cursor:
                isolation = cursor.execute("SHOW transaction_isolation").fetchone()
            seen.append((isolation[0], raw.autocommit, raw.info.transaction_status))
        return execute(sql, params, many, context)

    connection.ensure_connection()
    connection.connection.isolation_level = IsolationLevel.SERIALIZABLE
    try:
        with connection.execute_wrapper(watch):
            assert record.apply(("isolated",), task_id="isolated").get() == "isolated"
    finally:
        connection.close()  # the next test's connection has the project's isolation level
    assert seen == [("serializable", False, TransactionStatus.INTRANS)]
    assert Effect.objects.filter(key="isolated").count() == 1


@pytest.mark.postgres
def test_a_claim_that_fails_with_its_begin_rolls_back_and_the_next_execution_runs() -> None:
    """The statement carrying the BEGIN fails (a trigger refuses the key): the transaction it
    opened is rolled back, the connection is usable, and nothing of the task was written."""
    with ledger_refuses("INSERT", "refused-claim", "claim refused"):
        outcome = record.apply(("refused-claim",), task_id="refused-claim")
        assert connection.connection.info.transaction_status.name == "IDLE"
        assert connection.connection.autocommit is True  # as Django leaves it between tasks
        assert record.apply(("after",), task_id="after").get() == "after"
    assert outcome.state == "RETRY"
    assert "claim refused" in TaskAttempt.objects.get(task_id="refused-claim").message
    assert not Effect.objects.filter(key="refused-claim").exists()
    assert not IdempotencyKey.objects.filter(key="refused-claim").exists()
    assert Effect.objects.filter(key="after").count() == 1


def test_a_business_key_runs_once_across_task_ids_and_duplicates_get_the_stored_result() -> None:
    results = [charge.apply((7,), {"amount": 30}).get() for _ in range(3)]
    assert results == [{"order": 7, "charged": 30, "key": "charge:7"}] * 3
    assert Effect.objects.filter(key="charge:7").count() == 1


def test_an_execution_is_marked_started_in_the_cache_while_it_runs_and_only_then() -> None:
    """The mark crash-loop counting reads: there while the task runs, gone once it ended,
    whatever the outcome."""
    assert sees_its_own_mark.apply(task_id="peek").get() is True
    write_then_fail.apply(("unmarked",), task_id="failed")
    for task_id in ("peek", "failed"):
        after = ledger.CacheWrites(task_id=task_id)
        assert ledger.done_cache.start(record.name, "any", after)[1] is False
        ledger.done_cache.finish(after)


def test_marks_count_executions_so_one_ending_leaves_the_other_marked() -> None:
    """Two deliveries of one task id at once: the first to end removes only its own mark."""

    def started(task_id: str) -> ledger.CacheWrites:
        return ledger.CacheWrites(task_id=task_id)

    first, second = started("twice"), started("twice")
    assert ledger.done_cache.start(record.name, "k", first)[1] is False
    assert ledger.done_cache.start(record.name, "k", second)[1] is True
    ledger.done_cache.finish(first)
    probe = started("twice")
    assert ledger.done_cache.start(record.name, "k", probe)[1] is True  # second still runs
    ledger.done_cache.finish(probe)
    ledger.done_cache.finish(second)
    probe = started("twice")
    assert ledger.done_cache.start(record.name, "k", probe)[1] is False
    ledger.done_cache.finish(probe)


def test_a_first_delivery_marks_itself_started_without_reading_the_marks() -> None:
    """Only a redelivery has earlier deliveries to count; a first one still leaves its mark
    for the redelivery that may follow it."""
    first = ledger.CacheWrites(task_id="first")
    assert ledger.done_cache.start(record.name, "k", first, redelivered=False) == (None, None)
    again = ledger.CacheWrites(task_id="first")
    assert ledger.done_cache.start(record.name, "k", again)[1] is True
    assert again.seen == [first.token]
    ledger.done_cache.finish(again)
    ledger.done_cache.finish(first)


@pytest.fixture
def held_background(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Worker-process mode, with the background thread's sends held until the event is set."""
    release = threading.Event()
    sent: list[int] = []

    def send_when_released(batch: list[ledger.CacheWrites]) -> None:
        release.wait(30)
        sent.append(len(batch))
        ledger.done_cache.write(batch)

    monkeypatch.setattr(ledger.done_cache, "in_background", True)
    monkeypatch.setattr(
        ledger.done_cache, "_background", ledger.BackgroundWrites(send_when_released)
    )
    yield release
    release.set()
    ledger.done_cache.flush()


def test_in_a_worker_a_task_that_succeeded_ends_without_waiting_for_the_cache(
    held_background: threading.Event,
) -> None:
    """Its done key and the end of its mark follow from a thread; a duplicate meanwhile is
    answered by the database. A failed execution's writes go at once: its retry must not
    find its mark and count a crash."""

    def marked(task_id: str) -> bool | None:
        probe = ledger.CacheWrites(task_id=task_id)
        started = ledger.done_cache.start(record.name, "probe", probe)[1]
        ledger.done_cache.write([probe])
        return started

    assert record.apply(("later",), task_id="later").get() == "later"
    assert marked("later") is True  # its writes wait in the held thread
    assert ledger.done_cache.get(record.name, "later") is None
    write_then_fail.apply(("at-once",), task_id="at-once")
    assert marked("at-once") is False
    assert record.apply(("later",), task_id="later").get() == "later"
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", False)]

    held_background.set()
    ledger.done_cache.flush()
    assert marked("later") is False
    assert ledger.done_cache.get(record.name, "later") == (
        record.fingerprint(("later",), {}),
        "later",
    )
    assert Effect.objects.filter(key="later").count() == 1


def test_a_duplicates_count_goes_with_its_executions_last_writes(
    held_background: threading.Event,
) -> None:
    """Counting a duplicate costs no round trip of its own: the count waits with the rest."""
    from reliable_tasks import metrics

    assert record.apply(("counted",), task_id="counted").get() == "counted"
    held_background.set()
    ledger.done_cache.flush()
    held_background.clear()
    before = metrics.snapshot().counters["duplicate_hits"]
    assert record.apply(("counted",), task_id="counted").get() == "counted"
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", True)]
    assert metrics.snapshot().counters["duplicate_hits"] == before
    held_background.set()
    ledger.done_cache.flush()
    assert metrics.snapshot().counters["duplicate_hits"] == before + 1


def test_the_background_thread_sends_in_batches_and_starts_again_after_a_flush() -> None:
    batches: list[list[str]] = []
    writer = ledger.BackgroundWrites(lambda batch: batches.append([w.task_id for w in batch]))
    writer.LINGER, writer.BATCH = 30.0, 2  # a batch waits for a second write, never a third
    for task_id in "abc":
        writer.put(ledger.CacheWrites(task_id=task_id))
    wait_until(lambda: batches == [["a", "b"]])
    started = time.monotonic()
    writer.flush(10)  # does not wait out the linger
    assert time.monotonic() - started < 5
    assert batches == [["a", "b"], ["c"]]
    writer.put(ledger.CacheWrites(task_id="d"))
    writer.flush(10)
    assert batches[-1] == ["d"]


def test_a_worker_turns_the_thread_on_and_a_process_shutting_down_sends_what_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery import signals

    sent: list[list[str]] = []
    writer = ledger.BackgroundWrites(lambda batch: sent.append([w.task_id for w in batch]))
    writer.LINGER = 30.0  # only a flush sends before then
    monkeypatch.setattr(ledger.done_cache, "in_background", False)
    monkeypatch.setattr(ledger.done_cache, "_background", writer)
    signals.worker_init.send(sender=None)
    assert ledger.done_cache.in_background is True
    ledger.done_cache.finish(ledger.CacheWrites(task_id="held"), wait=False)
    assert sent == []
    signals.worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
    assert sent == [["held"]]


def test_when_the_thread_falls_behind_an_execution_sends_its_own_writes() -> None:
    """A cache that hangs must not grow the queue without end: past ``QUEUED`` writes, the
    execution that ends sends its own, as it would without the thread."""
    gate = threading.Event()
    sent: list[tuple[str, list[str]]] = []

    def send(batch: list[ledger.CacheWrites]) -> None:
        if threading.current_thread().name == "reliable_tasks-cache":
            gate.wait(30)
        sent.append((threading.current_thread().name, [w.task_id for w in batch]))

    writer = ledger.BackgroundWrites(send)
    writer.LINGER, writer.QUEUED = 0.0, 1
    writer._forget()  # a queue of the new size
    writer.put(ledger.CacheWrites(task_id="a"))  # the thread takes it and hangs at the gate
    wait_until(lambda: writer._queue.empty())
    writer.put(ledger.CacheWrites(task_id="b"))  # waits in the queue
    writer.put(ledger.CacheWrites(task_id="c"))  # the queue is full: sent here
    assert sent == [(threading.current_thread().name, ["c"])]
    gate.set()
    writer.flush(10)
    assert [ids for _, ids in sent] == [["c"], ["a"], ["b"]]


@override_settings(RELIABLE_TASKS_CACHE_ALIAS="missing")
def test_a_cache_alias_missing_from_caches_leaves_tasks_running_once_on_the_database() -> None:
    assert record.apply(("no-cache",), task_id="no-cache").get() == "no-cache"
    assert record.apply(("no-cache",), task_id="no-cache").get() == "no-cache"
    assert Effect.objects.filter(key="no-cache").count() == 1
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", False)]


def test_a_shared_cache_other_than_redis_serves_the_fast_path_and_the_marks(
    tmp_path: Path,
) -> None:
    from django.core.cache import caches

    from reliable_tasks import metrics

    files = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache"}
    with override_settings(
        CACHES={"other": {**files, "LOCATION": str(tmp_path)}}, RELIABLE_TASKS_CACHE_ALIAS="other"
    ):
        other = caches["other"]
        record.apply(("local",), task_id="local")
        assert other.get(ledger.done_cache._mark_key("local")) is None
        again = ledger.CacheWrites(task_id="again")
        assert ledger.done_cache.start(record.name, "local", again) == (
            (record.fingerprint(("local",), {}), "local"),
            False,
        )
        probe = ledger.CacheWrites(task_id="again")
        assert ledger.done_cache.start(record.name, "other", probe)[1] is True
        ledger.done_cache.finish(probe)
        assert record.apply(("local",), task_id="local").get() == "local"
        assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", True)]
        assert metrics.snapshot().histograms["duration"].count == 2


# django-redis's own cache methods pass ``client=`` to its sharded client, which warns each time.
@pytest.mark.filterwarnings("ignore:.* on sharded client should not specify client")
def test_django_redis_sharded_client_serves_the_fast_path_through_the_cache_api() -> None:
    """The sharded client has no single Redis connection for pipelines: the plain cache API
    does the same work."""
    location = settings.CACHES["default"]["LOCATION"]
    sharded = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": [location],
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.ShardClient"},
        "KEY_PREFIX": "sharded",
    }
    with override_settings(CACHES={"sharded": sharded}, RELIABLE_TASKS_CACHE_ALIAS="sharded"):
        assert ledger.redis_client(caches["sharded"]) is None
        assert sees_its_own_mark.apply(task_id="sharded-mark").get() is True
        record.apply(("sharded",), task_id="sharded")
        assert record.apply(("sharded",), task_id="sharded").get() == "sharded"
        caches["sharded"].clear()
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", True)]


def _calls(client: Any, *commands: str) -> dict[str, int]:
    """How many times Redis ran each command so far (its INFO commandstats; commands a
    script runs count too)."""
    stats = client.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in commands}


@pytest.fixture
def sent_to_redis(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What this process sends to Redis, one entry per round trip: a command's name, or
    "pipeline" for a pipeline of them."""
    import redis

    sent: list[str] = []
    execute_command, execute = redis.Redis.execute_command, redis.client.Pipeline.execute

    def command(self: Any, *args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return execute_command(self, *args, **options)

    def pipeline(self: Any, *args: Any, **options: Any) -> Any:
        sent.append("pipeline")
        return execute(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", command)
    monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline)
    return sent


def test_an_execution_starts_in_one_redis_command_and_a_flushed_script_is_loaded_again(
    sent_to_redis: list[str],
) -> None:
    """The start script: one EVALSHA per execution, in one round trip. A server that lost
    its scripts (restarted, SCRIPT FLUSH) is given it again, once."""
    client = ledger.redis_client(cache)
    client.script_flush()
    before = _calls(client, "evalsha", "script|load")
    sent_to_redis.clear()
    record.apply(("scripted",), task_id="scripted")
    first = sent_to_redis[:]
    sent_to_redis.clear()
    assert record.apply(("scripted",), task_id="scripted").get() == "scripted"
    again = sent_to_redis[:]
    after = _calls(client, "evalsha", "script|load")
    # The start, then the execution's end writes (its mark removed, its done key, metrics).
    assert first == ["EVALSHA", "SCRIPT LOAD", "EVALSHA", "pipeline"]
    assert again == ["EVALSHA", "pipeline"]  # the duplicate, answered from the cache
    assert after["script|load"] - before["script|load"] == 1
    assert after["evalsha"] - before["evalsha"] == 3  # the refused one counts: Redis got it
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", True)]
    assert ledger.done_cache._scripts is True


def test_a_redis_that_refuses_scripts_gets_the_start_as_a_pipeline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sent_to_redis: list[str]
) -> None:
    """A Redis user without the scripting commands (an ACL): the start goes as plain commands
    from then on, said once in the log; marks and the fast path work as before."""
    admin = ledger.redis_client(cache)
    admin.acl_setuser(
        "rt-noscript", enabled=True, nopass=True, keys=["*"], channels=["*"],
        commands=["+@all", "-@scripting"],
    )  # fmt: skip
    monkeypatch.setattr(ledger.done_cache, "_scripts", True)
    location = settings.CACHES["default"]["LOCATION"].replace("redis://", "redis://rt-noscript@")
    refusing = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": location}
    try:
        with override_settings(
            CACHES={"default": settings.CACHES["default"], "refusing": refusing},
            RELIABLE_TASKS_CACHE_ALIAS="refusing",
        ):
            client = ledger.redis_client(caches["refusing"])
            assert client.acl_whoami() == "rt-noscript"
            before = _calls(admin, "evalsha", "sadd")
            sent_to_redis.clear()
            with caplog.at_level("INFO", logger="reliable_tasks.ledger"):
                assert sees_its_own_mark.apply(task_id="plain-mark").get() is True
                record.apply(("unscripted",), task_id="unscripted")
                ledger.done_cache.flush()
                assert record.apply(("unscripted",), task_id="unscripted").get() == "unscripted"
            after = _calls(admin, "evalsha", "sadd")
            caches["refusing"].clear()
    finally:
        admin.acl_deluser("rt-noscript")
    assert ledger.done_cache._scripts is False
    # Each execution marked itself, and the first one's probe of its own mark (it starts too).
    assert after["sadd"] - before["sadd"] == 4
    # Tried once; from then on every start is a pipeline, and so is every end.
    assert [c for c in sent_to_redis if c in ("EVALSHA", "SCRIPT LOAD")] == ["EVALSHA"]
    assert sent_to_redis.count("pipeline") == 8, sent_to_redis
    refusals = [r for r in caplog.records if "refused the ledger's start script" in r.message]
    assert len(refusals) == 1
    assert list(Observed.objects.values_list("kind", "cached")) == [("duplicate", True)]


@override_settings(
    CACHES={"local": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
    RELIABLE_TASKS_CACHE_ALIAS="local",
)
def test_a_cache_each_process_keeps_to_itself_holds_no_marks_so_every_redelivery_counts() -> None:
    record.apply(("here",), task_id="here")
    hit, interrupted = ledger.done_cache.start(record.name, "here", ledger.CacheWrites("here"))
    assert hit is not None  # this process still answers its own duplicates
    assert interrupted is None  # but a mark would die with its process: crash loops count all


def test_the_database_answers_duplicates_when_the_cache_forgot() -> None:
    charge.apply((8,), {"amount": 1})
    cache.clear()
    assert charge.apply((8,), {"amount": 1}).get()["charged"] == 1
    assert Effect.objects.count() == 1
    assert list(Observed.objects.values_list("cached", flat=True)) == [False]


def test_a_key_reused_with_other_arguments_is_refused_and_nothing_runs() -> None:
    charge.apply((9,), {"amount": 10})
    refused = charge.apply((9,), {"amount": 11})
    assert refused.failed()
    assert isinstance(refused.result, IdempotencyKeyReused)
    assert "idempotency key 'charge:9' was first used with other arguments" in str(refused.result)
    assert "The task did not run" in str(refused.result)
    assert list(Effect.objects.values_list("payload", flat=True)) == [{"amount": 10}]


def test_a_failing_atomic_task_leaves_neither_its_writes_nor_its_key() -> None:
    failed = write_then_fail.apply(("half",), task_id="fails")
    assert failed.state == "RETRY"
    assert Effect.objects.count() == 0
    assert not IdempotencyKey.objects.exists()


def test_a_task_that_swallows_a_database_error_in_its_transaction_fails_instead_of_losing_its_writes() -> (
    None
):
    """Django rolls a transaction whose statement failed back as its block ends, without a
    word: the task's writes and its key would go, and the task would count as a success."""
    outcome = swallows_a_database_error.apply(("swallowed",), task_id="swallowed")
    assert outcome.state == "RETRY"
    [attempt] = TaskAttempt.objects.all()
    assert attempt.exc_type == "django.db.transaction.TransactionManagementError"
    assert "caught a database error inside its transaction" in attempt.message
    assert "transaction.atomic() block of its own" in attempt.message
    assert not Effect.objects.exists()
    assert not GatewayCharge.objects.exists()
    assert not IdempotencyKey.objects.exists()


@pytest.mark.postgres
def test_a_commit_that_fails_after_the_follow_ups_were_sent_leaves_them_to_the_retry() -> None:
    """PostgreSQL checks a deferred constraint (Django's foreign keys are) at the commit."""
    effects, charges = Effect._meta.db_table, GatewayCharge._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"ALTER TABLE {effects} ADD CONSTRAINT effect_task_charged FOREIGN KEY (task_id) "
            f"REFERENCES {charges} (idempotency_key) DEFERRABLE INITIALLY DEFERRED"
        )
    try:
        outcome = record.apply(("parent",), link=record.si("callback"), task_id="uncharged")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {effects} DROP CONSTRAINT effect_task_charged")
    assert outcome.state == "RETRY"
    assert TaskAttempt.objects.get().exc_type == "django.db.utils.IntegrityError"
    assert not Effect.objects.exists()
    [retry] = OutboxMessage.objects.all()
    assert '"callbacks": [' in retry.body
    assert "callback" in retry.body


@pytest.mark.postgres
def test_in_lease_mode_a_commit_that_fails_after_the_follow_ups_leaves_them_to_the_retry() -> None:
    record.delay("queued")  # the callback's task has a pending row: a second one fails the commit
    outbox = OutboxMessage._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"ALTER TABLE {outbox} ADD CONSTRAINT one_row_per_task UNIQUE (task_name) "
            "DEFERRABLE INITIALLY DEFERRED"
        )
    try:
        outcome = leased.apply(("F1", 0), link=record.si("callback"), task_id="F1-1")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {outbox} DROP CONSTRAINT one_row_per_task")
    assert outcome.state == "RETRY"
    assert TaskAttempt.objects.get().exc_type == "django.db.utils.IntegrityError"
    retry = OutboxMessage.objects.get(task_name=leased.name)
    assert '"callbacks": [' in retry.body
    assert "callback" in retry.body


@pytest.mark.postgres
def test_a_connection_lost_under_the_claim_puts_the_message_back_instead_of_failing_an_attempt() -> (
    None
):
    """The session is ended under the worker (a failover, a restart): the claim fails, and the
    database answers again at once. The task did not fail; its message goes back."""
    import psycopg

    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    params = connection.get_connection_params()
    with psycopg.connect(
        host=params["host"], port=params.get("port", 5432), user=params["user"],
        dbname=params["dbname"], autocommit=True,
    ) as admin:  # fmt: skip
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    outcome = record.apply(("blip",), task_id="blip")
    assert outcome.state == "REJECTED"
    # Not a failed attempt (no retry was scheduled): a requeue, recorded with its error.
    [attempt] = TaskAttempt.objects.all()
    assert attempt.outcome == TaskAttempt.Outcome.REQUEUED
    assert attempt.exc_type in {
        "django.db.utils.OperationalError",
        "django.db.utils.InterfaceError",
    }
    assert not OutboxMessage.objects.exists()
    assert record.apply(("blip",), task_id="blip").get() == "blip"
    assert list(Effect.objects.values_list("key", flat=True)) == ["blip"]


def test_a_lease_mode_retry_with_other_arguments_leaves_a_key_another_delivery_took_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released = ledger.release

    def released_then_taken(claim: ledger.Claim) -> None:
        released(claim)
        # Another delivery of the key claims it between the release and the retry's clean-up.
        taken = ledger.claim(
            claim.task_name, claim.key, claim.fingerprint, task_id="other", worker="w2",
            lease_seconds=60,
        )  # fmt: skip
        assert taken.owned

    monkeypatch.setattr(ledger, "release", released_then_taken)
    outcome = leased_retry_with_other_args.apply(("taken",), task_id="taken-1")
    assert outcome.state == "RETRY"
    [key] = IdempotencyKey.objects.all()
    assert (key.key, key.state, key.task_id) == ("taken-1", "running", "other")


def test_a_lease_mode_key_is_exposed_to_the_task_and_released_when_done() -> None:
    result = leased.apply(("L1", 0)).get()
    assert result == "L1"
    effect = Effect.objects.get(key="lease:L1")
    assert effect.payload == {"key": "lease:L1"}
    key = IdempotencyKey.objects.get(key="lease:L1")
    assert key.state == "done"
    assert key.lease_expires_at is None


def test_a_live_lease_held_elsewhere_defers_the_duplicate(broker: object) -> None:
    holder = ledger.claim(
        leased.name,
        "lease:L2",
        leased.fingerprint(("L2", 0), {}),
        task_id="other",
        worker="elsewhere",
        lease_seconds=60,
    )
    assert holder.owned
    from reliable_tasks.models import OutboxMessage

    deferred = leased.apply(("L2", 0), task_id="dup")
    assert deferred.state == "IGNORED"
    assert Effect.objects.count() == 0
    # The duplicate comes back through the outbox when the lease would have ended.
    row = OutboxMessage.objects.get(task_id="dup")
    assert row.due_at > timezone.now() + dt.timedelta(seconds=55)
    assert list(Observed.objects.values_list("kind", flat=True)) == ["deferred"]


def test_an_expired_lease_is_taken_over() -> None:
    fp = leased.fingerprint(("L3", 0), {})
    crashed = ledger.claim(
        leased.name, "lease:L3", fp, task_id="crashed", worker="dead", lease_seconds=60
    )
    IdempotencyKey.objects.filter(key="lease:L3").update(
        lease_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    assert leased.apply(("L3", 0), task_id="next").get() == "L3"
    key = IdempotencyKey.objects.get(key="lease:L3")
    assert (key.state, key.attempts, key.task_id) == ("done", 2, "next")
    assert key.token != crashed.token
    # The crashed holder can no longer complete or renew.
    assert not ledger.complete(crashed, "late")
    assert not ledger.renew(crashed, 10)


@pytest.mark.postgres
def test_a_worker_whose_clock_runs_ahead_does_not_take_over_a_live_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers on several machines: leases are timed by PostgreSQL's clock, not theirs."""
    held = ledger.claim("t", "skewed", "f", task_id="a", worker="w1", lease_seconds=60)
    assert held.owned
    ahead = timezone.now() + dt.timedelta(minutes=5)
    monkeypatch.setattr(timezone, "now", lambda: ahead)
    second = ledger.claim("t", "skewed", "f", task_id="b", worker="w2", lease_seconds=60)
    assert not second.owned
    assert IdempotencyKey.objects.get(key="skewed").task_id == "a"


@pytest.mark.postgres
def test_a_duplicate_deferred_by_a_worker_whose_clock_runs_ahead_waits_for_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fp = leased.fingerprint(("SK", 0), {})
    ledger.claim(leased.name, "lease:SK", fp, task_id="holder", worker="w1", lease_seconds=60)
    delays: list[float] = []

    def deferred(sender: Any, delay: float, **kwargs: Any) -> None:
        delays.append(delay)

    ahead = timezone.now() + dt.timedelta(minutes=5)
    monkeypatch.setattr(timezone, "now", lambda: ahead)
    task_deferred.connect(deferred)
    try:
        leased.apply(("SK", 0), task_id="duplicate")
    finally:
        task_deferred.disconnect(deferred)
    [delay] = delays
    assert 55 < delay < 62  # the lease's minute, not a second and again


@pytest.mark.postgres
def test_a_worker_whose_clock_lags_renews_its_lease_from_the_databases_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = ledger.claim("t", "lagging", "f", task_id="a", worker="w1", lease_seconds=60)
    real_now = timezone.now
    behind = real_now() - dt.timedelta(minutes=5)
    with monkeypatch.context() as lagging:
        lagging.setattr(timezone, "now", lambda: behind)
        assert ledger.renew(held, 60)
    key = IdempotencyKey.objects.get(key="lagging")
    assert key.lease_expires_at > real_now() + dt.timedelta(seconds=50)
    second = ledger.claim("t", "lagging", "f", task_id="b", worker="w2", lease_seconds=60)
    assert not second.owned


def test_an_invalid_key_callable_fails_at_enqueue_with_the_reason() -> None:
    with pytest.raises(
        InvalidIdempotencyKey,
        match=r"idempotency_key callable of task 'tests\.testapp\.tasks\.charge' failed",
    ):
        charge.delay()


def test_results_that_json_cannot_hold_are_stored_as_null() -> None:
    assert ledger.encode_result("t", object()) is None
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert ledger.decode_result(ledger.encode_result("t", {"at": when})) == {"at": when}
    with override_settings(RELIABLE_TASKS_MAX_RESULT_BYTES=10):
        assert ledger.encode_result("t", "x" * 100) is None


def test_small_results_are_stored_as_json_gives_them_back() -> None:
    """None, bools and ints up to 18 digits skip the JSON round trip; the rest take it, and the
    size limit still applies to both."""
    for value in (None, True, False, 0, -7, 10**18 - 1, -(10**18 - 1), 10**18, 1.5, "x", [1]):
        stored = ledger.encode_result("t", value)
        assert stored == json_round_trip(value), value
        assert type(stored) is type(value), value
    with override_settings(RELIABLE_TASKS_MAX_RESULT_BYTES=10):
        assert ledger.encode_result("t", 10**17) is None  # 18 digits
        assert ledger.encode_result("t", 10**8) == 10**8


def json_round_trip(value: Any) -> Any:
    import json

    from kombu.utils import json as kombu_json

    return json.loads(kombu_json.dumps(value))


def test_a_call_by_position_by_keyword_or_with_defaults_has_one_fingerprint() -> None:
    """Positional calls that give every parameter skip binding to the signature; the digest is
    the one binding gives."""
    by_position = charge.fingerprint((5, 0), {})
    assert by_position == ledger.fingerprint((), {"order_id": 5, "amount": 0})
    assert charge.fingerprint((5,), {}) == by_position
    assert charge.fingerprint((), {"order_id": 5, "amount": 0}) == by_position
    assert charge.fingerprint((5,), {"amount": 0}) == by_position
    assert charge.fingerprint((5, 1), {}) != by_position
    # A call the signature refuses is fingerprinted as given (it fails when it runs).
    assert charge.fingerprint((5, 0, 9), {}) == ledger.fingerprint((5, 0, 9), {})


def test_deleting_keys_is_one_statement_that_checks_them_as_it_deletes() -> None:
    """Stored results hang on no cascade: a delete of keys (a retry's of its running key) is one
    statement with its conditions, not a read and then a delete by primary key, between which
    another execution could complete the key."""
    ledger.claim("t", "held", "f", task_id="x", worker="w", lease_seconds=60)
    with CaptureQueriesContext(connection) as queries:
        IdempotencyKey.objects.filter(key="held", state="running").delete()
    [delete] = [q["sql"] for q in queries if "reliable_tasks_ledger" in q["sql"]]
    assert delete.startswith("DELETE FROM")
    assert '"state"' in delete
    assert not IdempotencyKey.objects.exists()


def test_a_result_left_by_a_key_deleted_outside_pruning_gives_way_to_the_next_owner_of_its_id() -> (
    None
):
    """A key deleted by hand leaves its result; should its id be given out again (a sequence
    reset, a partial restore), the new key's result replaces the old one instead of failing the
    task, and the new key reads its own."""
    record.apply(("first",), task_id="first")
    first = IdempotencyKey.objects.get()
    IdempotencyKey.objects.filter(pk=first.pk).delete()
    assert list(KeyResult.objects.values_list("key_id", "result")) == [(first.pk, "first")]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT setval(pg_get_serial_sequence('reliable_tasks_ledger', 'id'), %s, false)",
                [first.pk],
            )
        else:
            cursor.execute(
                "UPDATE sqlite_sequence SET seq = %s WHERE name = 'reliable_tasks_ledger'",
                [first.pk - 1],
            )
    assert record.apply(("second",), task_id="second").get() == "second"
    second = IdempotencyKey.objects.get()
    assert (second.pk, second.key, second.result) == (first.pk, "second", "second")
    assert Effect.objects.filter(key="second").count() == 1
    assert list(KeyResult.objects.values_list("key_id", "result")) == [(first.pk, "second")]


def test_prune_keeps_a_key_taken_over_between_its_selection_and_its_delete() -> None:
    long_ago = timezone.now() - dt.timedelta(days=8)
    ledger.claim("t", "abandoned", "f", task_id="x", worker="w", lease_seconds=1)
    IdempotencyKey.objects.filter(key="abandoned").update(lease_expires_at=long_ago)

    def taken_over(key_ids: list[int]) -> None:
        # A delivery replayed after the retention takes the abandoned key over meanwhile.
        assert ledger.claim("t", "abandoned", "f", task_id="y", worker="w2", lease_seconds=60).owned

    expired = ledger._prunable(None)
    assert pruning.delete_batch(expired, 100, dependents=taken_over) == 0
    assert IdempotencyKey.objects.get(key="abandoned").task_id == "y"


def test_prune_removes_only_keys_past_retention() -> None:
    record.apply(("old",), task_id="old")
    record.apply(("new",), task_id="new")
    long_ago = timezone.now() - dt.timedelta(days=8)
    IdempotencyKey.objects.filter(key="old").update(completed_at=long_ago)
    held = ledger.claim("t", "abandoned", "f", task_id="x", worker="w", lease_seconds=1)
    IdempotencyKey.objects.filter(key="abandoned").update(lease_expires_at=long_ago)
    ledger.claim("t", "live", "f", task_id="y", worker="w", lease_seconds=60)
    assert held.owned
    assert ledger.prune(limit=100) == 2
    assert sorted(IdempotencyKey.objects.values_list("key", flat=True)) == ["live", "new"]
    # The stored result went with its key.
    assert list(KeyResult.objects.values_list("result", flat=True)) == ["new"]


def duplicate_chord_member(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    backend: Any,
    before: Callable[[], None] = lambda: None,
) -> tuple[Any, float, list[str]]:
    """A duplicate of a chord's member whose key is done, as a worker traces it with this
    result backend: its outcome, how long it took, and what it logged. ``before`` runs just
    before the trace (a fault to start)."""
    from celery.app.trace import build_tracer

    monkeypatch.setattr(record, "_backend", backend)
    trace = build_tracer(record.name, record, app=record.app, eager=False, propagate=False)
    request = {
        "id": "member", "task": record.name, "group": "the-chord", "hostname": "w@test",
        "chord": record.si("body"), "delivery_info": {"redelivered": True},
    }  # fmt: skip
    before()
    started = time.monotonic()
    with caplog.at_level("INFO", logger="reliable_tasks"):
        outcome = trace("member", ("member",), {}, request)
    took = time.monotonic() - started
    return outcome, took, [entry.getMessage() for entry in caplog.records]


@override_settings(RELIABLE_TASKS_DATABASE_DOWN_HOLD=1.5)
def test_a_duplicate_chord_member_whose_result_backend_does_not_answer_goes_back_to_the_queue(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The duplicate cannot tell whether the delivery that ran was counted towards its chord:
    rather than count it twice or not at all, it holds the message while it asks again, and
    past RELIABLE_TASKS_DATABASE_DOWN_HOLD the message goes back to the queue."""
    from celery.backends.redis import RedisBackend

    assert record.apply(("member",), task_id="member").get() == "member"
    # A Redis result backend where nothing listens (port 9): the backend is down.
    down = RedisBackend(app=record.app, url="redis://127.0.0.1:9/0?socket_connect_timeout=1")
    outcome, took, messages = duplicate_chord_member(monkeypatch, caplog, down)
    assert 1.4 < took < 5.0
    assert outcome.info.state == "REJECTED"
    assert outcome.info.retval.requeue is True
    assert sum("holding the message until it answers (1.5 s at most)" in m for m in messages) == 1
    assert sum("result backend still unavailable after 1.5 s" in m for m in messages) == 1
    # Nothing ran again, and the delivery is no failed attempt.
    assert list(Effect.objects.values_list("key", flat=True)) == ["member"]
    assert not TaskAttempt.objects.filter(outcome=TaskAttempt.Outcome.FAILED).exists()


def test_a_result_backend_that_answers_with_an_error_is_not_held(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend that answers, but cannot give the result (here a stored value it cannot
    decode), will not get better by waiting: the message goes back after one pause, unheld."""
    from celery.backends.redis import RedisBackend

    assert record.apply(("member",), task_id="member").get() == "member"
    backend = RedisBackend(app=record.app, url="redis://127.0.0.1:6379/14")
    backend.client.set(backend.get_key_for_task("member"), b"{not json")
    try:
        outcome, took, messages = duplicate_chord_member(monkeypatch, caplog, backend)
    finally:
        backend.forget("member")
    assert took < 5.0  # one pause, not the hold of a minute
    assert outcome.info.state == "REJECTED"
    assert outcome.info.retval.requeue is True
    assert not any("holding the message" in m for m in messages)
    assert sum("result backend unavailable" in m and "requeued" in m for m in messages) == 1


# Celery's Redis result backend stores with redis-py's setex, which redis-py deprecates.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_a_duplicate_chord_member_holds_its_message_until_the_result_backend_answers_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A result backend that stops answering for a few seconds (Redis, reached through a
    proxy that is cut, then restored): the duplicate waits for it, holding its message, and
    then goes on as if nothing happened. It is not put back once a second, each a redelivery
    that a quorum queue counts against its delivery limit."""
    from celery import states
    from celery.backends.redis import RedisBackend

    assert record.apply(("member",), task_id="member").get() == "member"
    proxy = TcpProxy(6379)
    restore = threading.Timer(3.0, proxy.restore)

    def cut() -> None:
        proxy.cut()
        restore.start()

    try:
        backend = RedisBackend(
            app=record.app, url=f"redis://127.0.0.1:{proxy.port}/14?socket_connect_timeout=1"
        )
        backend.store_result("member", "member", states.SUCCESS)  # the first delivery counted
        outcome, held, messages = duplicate_chord_member(monkeypatch, caplog, backend, cut)
    finally:
        restore.cancel()
        proxy.close()
        RedisBackend(app=record.app, url="redis://127.0.0.1:6379/14").forget("member")
    assert held >= 3.0
    assert outcome.info is None  # a success
    assert outcome.retval == "member"  # the stored result, the task not run again
    assert sum("result backend unavailable" in m for m in messages) == 1
    assert sum("result backend answers again" in m for m in messages) == 1
    assert list(Effect.objects.values_list("key", flat=True)) == ["member"]
    assert list(Observed.objects.values_list("kind", flat=True)) == ["duplicate"]


# Celery's Redis result backend stores with redis-py's setex, which redis-py deprecates.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
@pytest.mark.parametrize(
    ("stored_after", "counted"),
    [(0.3, False), (None, True)],
    ids=["result-stored-meanwhile", "no-result"],
)
def test_a_duplicate_chord_member_waits_for_the_first_result_before_it_counts(
    monkeypatch: pytest.MonkeyPatch, stored_after: float | None, counted: bool
) -> None:
    """A copy woken at the first delivery's commit comes before Celery stores that delivery's
    result: it waits for it, and is not counted. With none within a second, the first delivery
    died before its count, and the duplicate counts."""
    from celery import states
    from celery.app.trace import build_tracer
    from celery.backends.redis import RedisBackend

    assert record.apply(("member",), task_id="member").get() == "member"
    backend = RedisBackend(app=record.app, url="redis://127.0.0.1:6379/14")
    backend.forget("member")
    joined = backend.get_key_for_group("chord-wait", ".j")
    backend.client.delete(joined)
    monkeypatch.setattr(record, "_backend", backend)
    if stored_after is not None:
        store = threading.Timer(
            stored_after, backend.store_result, ("member", "member", states.SUCCESS)
        )
        store.start()
    trace = build_tracer(record.name, record, app=record.app, eager=False, propagate=False)
    request = {
        "id": "member", "task": record.name, "group": "chord-wait", "group_index": 0,
        "hostname": "w@test", "chord": record.si("body"), "delivery_info": {"redelivered": True},
    }  # fmt: skip
    try:
        outcome = trace("member", ("member",), {}, request)
        assert outcome.info is None or outcome.info.state == states.SUCCESS
        # Celery's Redis backend keeps the members it counted under the group's '.j' key.
        assert bool(backend.client.exists(joined)) is counted
        assert list(Effect.objects.values_list("key", flat=True)) == ["member"]
    finally:
        backend.forget("member")
        backend.client.delete(joined, backend.get_key_for_group("chord-wait", ".d"))
