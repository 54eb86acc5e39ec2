"""Retries survive restarts; poison messages become dead tasks and the queue keeps flowing."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from kombu import Producer

from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, TaskAttempt
from reliable_tasks.task import UNMARKED_REDELIVERIES_FACTOR
from tests.e2e.test_idempotency_faults import queue_counts
from tests.support import (
    QUEUE,
    Broker,
    ProcessFactory,
    TcpProxy,
    effects,
    rabbitmqctl,
    wait_for,
)
from tests.testapp.models import Effect
from tests.testapp.tasks import (
    charge,
    flaky,
    kill_own_worker,
    pay,
    record,
    two_steps,
    with_deadline,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def signal_env(tmp_path: Path) -> dict[str, str]:
    return {"RT_TEST_SIGNAL_DIR": str(tmp_path)}


def test_a_waiting_retry_survives_a_broker_and_worker_restart(
    broker: Broker, processes: ProcessFactory, signal_env: dict[str, str], service_outage: None
) -> None:
    processes.relay()
    worker = processes.worker(env=signal_env)
    flaky.delay("survivor")
    wait_for(lambda: TaskAttempt.objects.exists(), timeout=60, what="the first attempt to fail")
    # The retry waits in the outbox, not in the broker: no message is held unacknowledged.
    assert OutboxMessage.objects.filter(status="pending").count() == 1
    assert queue_counts() == (0, 0)
    broker.close()
    rabbitmqctl("stop_app")
    processes.kill(worker, signal.SIGKILL)
    processes.worker(env=signal_env)
    time.sleep(4)  # the retry falls due while the broker is down
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    wait_for(
        lambda: effects("flaky:survivor"), timeout=90, what="the retry to run after the restarts"
    )
    assert effects("flaky:survivor") == ["flaky:survivor"]
    assert not DeadTask.objects.exists()


def test_tasks_that_give_up_become_dead_for_each_reason_and_the_queue_flows(
    broker: Broker, processes: ProcessFactory, signal_env: dict[str, str]
) -> None:
    """A relay and a worker: retries exhausted, a deadline passed, a key reused with other
    arguments. Each becomes a dead task for its reason; the tasks behind them run."""
    processes.relay()
    processes.worker(env=signal_env)
    charge.delay(72, amount=10)
    wait_for(lambda: effects("charge:72"), timeout=60, what="the first charge")
    pay.delay(71, outcome="timeout")  # three attempts, then exhausted
    with_deadline.delay("deadline-1")  # waits of 5 s against a deadline of 8 s
    charge.delay(72, amount=99)  # the same business key, other arguments
    record.delay("after-the-dead-ones")
    wait_for(lambda: DeadTask.objects.count() == 3, timeout=90, what="three dead tasks")
    by_reason = {d.reason: d for d in DeadTask.objects.all()}
    assert set(by_reason) == {"exhausted", "deadline", "key_reused"}
    exhausted = by_reason["exhausted"]
    assert (exhausted.task_name, exhausted.args, exhausted.attempt_count) == (pay.name, [71], 3)
    assert [a["number"] for a in exhausted.attempts] == [1, 2, 3]
    assert all(a["worker"].startswith("w") and a["started_at"] for a in exhausted.attempts)
    assert by_reason["deadline"].attempt_count == 2
    reused = by_reason["key_reused"]
    assert (reused.idempotency_key, reused.kwargs) == ("charge:72", {"amount": 99})
    assert "charge:72" in reused.exc_message
    # The first charge stands alone; the queue kept flowing past the three.
    assert [e.payload for e in Effect.objects.filter(key="charge:72")] == [{"amount": 10}]
    wait_for(lambda: effects("after-the-dead-ones"), timeout=30, what="the task behind them")
    wait_for(lambda: queue_counts() == (0, 0), timeout=30, what="the queue to drain")
    assert not OutboxMessage.objects.filter(status="pending").exists()


def test_a_task_that_kills_its_worker_every_time_becomes_dead_and_the_queue_flows(
    broker: Broker, processes: ProcessFactory, signal_env: dict[str, str]
) -> None:
    processes.relay()
    worker = processes.worker(env={**signal_env, "RT_TEST_MAX_DELIVERIES": "3"})
    kill_own_worker.delay("poison")
    record.delay("after-the-poison")
    wait_for(
        lambda: DeadTask.objects.exists(), timeout=120, what="the poison task to be declared dead"
    )
    dead = DeadTask.objects.get()
    assert dead.reason == "crash_loop"
    assert dead.task_name == kill_own_worker.name
    assert dead.args == ["poison"]
    assert [a["outcome"] for a in dead.attempts] == ["lost", "lost", "lost"]
    wait_for(lambda: effects("after-the-poison"), timeout=60, what="the next task to run")
    wait_for(lambda: queue_counts() == (0, 0), timeout=30, what="the queue to drain")
    assert worker.poll() is None


@pytest.mark.postgres
def test_a_ledger_statement_that_keeps_failing_puts_the_message_back_until_it_runs(
    broker: Broker, processes: ProcessFactory
) -> None:
    """The database answers, but the claim cannot take its lock (this test holds the ledger in
    SHARE mode; the worker gives up after 200 ms): each delivery goes back to the queue and
    records why, the latest records kept. However often that happens it is no crash loop, and
    once the lock goes the task runs, once."""
    processes.relay()
    task_id = record.delay("locked-out").id
    limit, kept = 2, 4
    attempts = TaskAttempt.objects.filter(task_id=task_id)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLE {IdempotencyKey._meta.db_table} IN SHARE MODE")
        worker = processes.worker(
            env={
                "RT_TEST_PG_LOCK_TIMEOUT_MS": "200",
                "RT_TEST_MAX_DELIVERIES": str(limit),
                "RT_TEST_MAX_RECORDED_ATTEMPTS": str(kept),
            }
        )
        # More deliveries than a crash loop is allowed, lost and unmarked ones together.
        wait_for(
            lambda: (
                processes.log_of(worker).count("message requeued")
                > limit * UNMARKED_REDELIVERIES_FACTOR + 1
                or DeadTask.objects.exists()
            ),
            timeout=90,
            what="the worker to put the message back again and again",
        )
        assert not DeadTask.objects.exists()
        assert not effects("locked-out")
    wait_for(lambda: effects("locked-out"), timeout=60, what="the task to run once the lock goes")
    wait_for(lambda: queue_counts() == (0, 0), timeout=30, what="the message to be acknowledged")
    assert not DeadTask.objects.exists()
    assert effects("locked-out") == ["locked-out"]
    # Each delivery put the message back (recorded) and the next one's redelivery was paid for
    # by it; the latest records are kept, not two per delivery.
    outcomes = list(attempts.values_list("outcome", flat=True))
    assert set(outcomes) == {TaskAttempt.Outcome.REQUEUED, TaskAttempt.Outcome.REDELIVERED}
    assert len(outcomes) <= kept + 1
    requeued = attempts.filter(outcome=TaskAttempt.Outcome.REQUEUED).values_list(
        "exc_type", "message"
    )
    assert all(exc_type == "django.db.utils.OperationalError" for exc_type, _ in requeued)
    assert all("lock timeout" in message for _, message in requeued)


def test_only_a_delivery_that_started_counts_towards_a_crash_loop(
    broker: Broker, processes: ProcessFactory, signal_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker killed while it runs one task and holds three prefetched ones: the running one's
    redelivery counts a lost attempt, the prefetched ones' redeliveries count nothing."""
    processes.relay()
    worker = processes.worker(env=signal_env)  # one process, prefetch 4
    holder = two_steps.delay("holder", 6.0).id
    waiting = [record.delay(f"prefetched-{i}").id for i in range(3)]
    wait_for(
        lambda: (tmp_path / f"started-holder-{holder}").exists(), timeout=60, what="the holder"
    )
    wait_for(lambda: queue_counts() == (0, 4), timeout=30, what="the worker to prefetch the rest")
    processes.kill(worker, signal.SIGKILL)
    processes.worker(env=signal_env)
    wait_for(
        lambda: effects("holder:part2") and all(effects(f"prefetched-{i}") for i in range(3)),
        timeout=90,
        what="every task to run after the restart",
    )
    lost = TaskAttempt.objects.filter(outcome=TaskAttempt.Outcome.LOST)
    assert list(lost.values_list("task_id", flat=True)) == [holder]
    assert not lost.filter(task_id__in=waiting).exists()
    unmarked = TaskAttempt.objects.filter(outcome=TaskAttempt.Outcome.REDELIVERED)
    assert sorted(unmarked.values_list("task_id", flat=True)) == sorted(waiting)
    assert not DeadTask.objects.exists()


def wait_for_hold(worker: Any, processes: ProcessFactory, timeout: float = 60) -> None:
    """Until the worker says it holds a message whose delivery found the database down."""
    wait_for(
        lambda: "holding the message" in processes.log_of(worker),
        timeout=timeout,
        what="the worker to hold the message",
    )


def held(worker: Any, processes: ProcessFactory, seconds: float) -> None:
    """The worker keeps the message it holds, unacknowledged, for ``seconds``: it does not put
    it back (and take it again) once a second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert queue_counts() == (0, 1), "the message must stay with the worker, unacknowledged"
        time.sleep(0.25)
    assert processes.log_of(worker).count("database unavailable") == 1


def runs_once_the_database_is_back(proxy: TcpProxy, key: str) -> None:
    """Restore the database behind ``proxy``: the held task (effect ``key``) runs, and its
    message is acknowledged."""
    proxy.restore()
    wait_for(lambda: effects(key), timeout=60, what="the task to run afterwards")
    wait_for(lambda: queue_counts() == (0, 0), timeout=30, what="the queue to drain")


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
def test_a_worker_holds_a_message_while_the_database_is_down_and_runs_it_once_it_answers(
    broker: Broker, processes: ProcessFactory, signal_env: dict[str, str]
) -> None:
    """The worker reaches PostgreSQL through a proxy that the test cuts: the delivery finds the
    database gone, and the worker holds the message until it answers, then puts it back once,
    recorded. No delivery counts towards a crash loop."""
    proxy = TcpProxy(int(os.environ.get("PGPORT", "5432")))
    try:
        processes.relay()  # the relay reaches the database directly
        proxy.cut()
        env = {**signal_env, "PGPORT": str(proxy.port), "RT_TEST_MAX_DELIVERIES": "2"}
        worker = processes.worker(env=env)
        task_id = record.delay("through-an-outage").id
        wait_for_hold(worker, processes)
        held(worker, processes, 4.0)
        assert not effects("through-an-outage")
        runs_once_the_database_is_back(proxy, "through-an-outage")
    finally:
        proxy.close()
    assert "database answers again; message requeued" in processes.log_of(worker)
    assert effects("through-an-outage") == ["through-an-outage"]
    # The held delivery recorded its requeue once the database answered, and ended (its mark
    # removed): the redelivery after it was paid for by the requeue.
    outcomes = list(TaskAttempt.objects.filter(task_id=task_id).values_list("outcome", flat=True))
    assert outcomes == ["requeued", "redelivered"]
    assert not DeadTask.objects.exists()


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
def test_a_message_held_longer_than_the_hold_goes_back_and_is_held_again(
    broker: Broker, processes: ProcessFactory
) -> None:
    """RELIABLE_TASKS_DATABASE_DOWN_HOLD bounds the hold: past it the message goes back to the
    queue, and the next delivery, still without a database, is held again."""
    proxy = TcpProxy(int(os.environ.get("PGPORT", "5432")))
    try:
        processes.relay()
        proxy.cut()
        worker = processes.worker(
            env={"PGPORT": str(proxy.port), "RT_TEST_DATABASE_DOWN_HOLD": "1.5"}
        )
        record.delay("past-the-hold")
        wait_for(
            lambda: processes.log_of(worker).count("holding the message") >= 2,
            timeout=60,
            what="the worker to put the message back after the hold and hold it again",
        )
        assert "database still unavailable after 1.5 s; message requeued" in processes.log_of(
            worker
        )
        assert not effects("past-the-hold")
        runs_once_the_database_is_back(proxy, "past-the-hold")
    finally:
        proxy.close()
    assert effects("past-the-hold") == ["past-the-hold"]
    assert not DeadTask.objects.exists()


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
@pytest.mark.parametrize("limits_from", ["message", "worker"])
def test_the_hold_ends_before_the_tasks_time_limit(
    broker: Broker, processes: ProcessFactory, limits_from: str
) -> None:
    """A task with time limits (4 s soft, 5 s hard), given by the message or by the worker's
    ``--soft-time-limit`` and ``--time-limit``: a hold of a minute would have the soft limit
    fail the task, whose message would then be acknowledged, or the hard limit kill its
    process. The hold ends two pauses before the first limit instead."""
    proxy = TcpProxy(int(os.environ.get("PGPORT", "5432")))
    try:
        processes.relay()
        proxy.cut()
        flags = ("--soft-time-limit", "4", "--time-limit", "5")
        worker = processes.worker(
            env={"PGPORT": str(proxy.port)}, extra=flags if limits_from == "worker" else ()
        )
        limits = {"soft_time_limit": 4, "time_limit": 5} if limits_from == "message" else {}
        task_id = record.apply_async(("time-limited",), **limits).id
        wait_for_hold(worker, processes)
        time.sleep(8.0)  # past both limits of the first delivery
        runs_once_the_database_is_back(proxy, "time-limited")
    finally:
        proxy.close()
    log = processes.log_of(worker)
    assert log.count("database still unavailable after") >= 2
    assert "SoftTimeLimitExceeded" not in log
    assert "soft time limit reached" not in log
    assert "Hard time limit" not in log
    assert effects("time-limited") == ["time-limited"]
    outcomes = set(TaskAttempt.objects.filter(task_id=task_id).values_list("outcome", flat=True))
    assert outcomes <= {TaskAttempt.Outcome.REQUEUED, TaskAttempt.Outcome.REDELIVERED}
    assert not DeadTask.objects.exists()


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
def test_under_the_solo_pool_time_limits_do_not_shorten_the_hold(
    broker: Broker, processes: ProcessFactory
) -> None:
    """The solo pool enforces no time limit (nor does the threads pool): the worker's
    ``--time-limit`` would end the hold after three seconds, the message going back once per
    three seconds of an outage, for a limit that never comes. The hold is the setting's."""
    proxy = TcpProxy(int(os.environ.get("PGPORT", "5432")))
    try:
        processes.relay()
        proxy.cut()
        worker = processes.worker(
            env={"PGPORT": str(proxy.port)},
            extra=("-P", "solo", "--soft-time-limit", "4", "--time-limit", "5"),
        )
        record.delay("solo-outage")
        wait_for_hold(worker, processes)
        held(worker, processes, 7.0)  # past both limits
        runs_once_the_database_is_back(proxy, "solo-outage")
    finally:
        proxy.close()
    log = processes.log_of(worker)
    assert "holding the message until it answers (60 s at most)" in log
    assert "database still unavailable after" not in log
    assert effects("solo-outage") == ["solo-outage"]
    assert not DeadTask.objects.exists()


EAGER_CALL = """
import time

import django

django.setup()
from tests.testapp.tasks import record

started = time.monotonic()
outcome = record.apply(("eager-outage",))
reason = getattr(outcome.result, "reason", None)
print(f"state={outcome.state} result={type(outcome.result).__name__}", flush=True)
print(f"reason={type(reason).__name__}", flush=True)
print(f"seconds={time.monotonic() - started:.1f}", flush=True)
"""


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
def test_an_eager_call_finding_the_database_down_is_rejected_at_once_not_held(
    processes: ProcessFactory,
) -> None:
    """``apply()`` runs the task in the caller's process, which has no message to hold or put
    back: the call is rejected at once, where a worker would hold the message for up to
    RELIABLE_TASKS_DATABASE_DOWN_HOLD (60 s here)."""
    proxy = TcpProxy(int(os.environ.get("PGPORT", "5432")))
    try:
        proxy.cut()
        caller = processes.start("-c", EAGER_CALL, env={"PGPORT": str(proxy.port)})
        caller.wait(timeout=40)
    finally:
        proxy.close()
    output = processes.log_of(caller)
    assert caller.returncode == 0, output
    assert "state=REJECTED result=Reject" in output
    assert "reason=OperationalError" in output  # the claim's, the database being gone
    assert float(output.split("seconds=")[1].split()[0]) < 5.0
    assert "holding the message" not in output
    assert not effects("eager-outage")


def test_a_task_killed_by_its_hard_time_limit_goes_back_and_ends_as_a_dead_task(
    broker: Broker, processes: ProcessFactory, signal_env: dict[str, str]
) -> None:
    """Celery kills the process of a task past its hard time limit and, for a stock task,
    reports it failed (its link_error callbacks called) and acknowledges the message: the task
    would be gone, neither retried nor dead. A reliable task's message goes back instead,
    without the failure being reported, each kill counts as a lost delivery, and the task ends
    as a crash loop's dead task, its first part rolled back each time."""
    processes.relay()
    worker = processes.worker(env={**signal_env, "RT_TEST_MAX_DELIVERIES": "2"})
    task_id = two_steps.apply_async(
        ("over-time", 30.0), time_limit=2, link_error=record.si("over-time-errback")
    ).id
    wait_for(lambda: DeadTask.objects.exists(), timeout=90, what="the task to be declared dead")
    dead = DeadTask.objects.get()
    assert (dead.task_id, dead.reason) == (task_id, "crash_loop")
    assert [a["outcome"] for a in dead.attempts] == ["lost", "lost"]
    wait_for(lambda: queue_counts() == (0, 0), timeout=30, what="the queue to drain")
    assert processes.log_of(worker).count("the message goes back to the queue") == 2
    assert not effects("over-time")  # neither its parts nor its errback


def publish_raw(
    broker: Broker,
    body: bytes | str,
    headers: dict[str, object],
    content_type: str = "application/json",
) -> None:
    Producer(broker.channel).publish(
        body, routing_key=QUEUE, headers=headers, content_type=content_type, content_encoding="utf-8",
        delivery_mode=2, correlation_id=str(headers.get("id", "")),
    )  # fmt: skip


def test_messages_celery_would_discard_become_dead_tasks_and_the_queue_flows(
    broker: Broker, processes: ProcessFactory
) -> None:
    unknown_id = str(uuid.uuid4())
    publish_raw(
        broker,
        json.dumps([["a", 1], {"k": "v"}, {}]),
        {"id": unknown_id, "task": "tests.testapp.tasks.no_such_task", "lang": "py"},
    )
    publish_raw(broker, json.dumps([[], {}, {}]), {"lang": "py"})  # no task header at all
    pickled_id = str(uuid.uuid4())
    publish_raw(
        broker, b"\x80\x04K\x01.", {"id": pickled_id, "task": record.name, "lang": "py"},
        content_type="application/x-python-serialize",
    )  # fmt: skip
    huge_id = str(uuid.uuid4())
    publish_raw(
        broker,
        b"[" + b" " * (10 * 1024 * 1024) + b"[",
        {"id": huge_id, "task": record.name, "lang": "py"},
    )
    truncated_id = str(uuid.uuid4())
    publish_raw(broker, b'[["trunc', {"id": truncated_id, "task": record.name, "lang": "py"})
    # JSON, but no task message: Celery's task handler raises on these, which stopped the
    # worker with the message unacknowledged, for the next worker to die on.
    malformed = {str(uuid.uuid4()): body for body in (b"null", b'{"x": 1}', b"[1, 2]")}
    # Three items, but no [args, kwargs, embed]: Celery took them to the pool, failed them as
    # tasks and acknowledged them, with no dead task.
    invalid = {str(uuid.uuid4()): body for body in (b'[[], {}, "x"]', b'["a", "b", {}]')}
    for invalid_id, body in invalid.items():
        publish_raw(broker, body, {"id": invalid_id, "task": record.name, "lang": "py"})
    for malformed_id, body in malformed.items():
        publish_raw(broker, body, {"id": malformed_id, "task": record.name, "lang": "py"})
    record.delay("after-the-junk")
    processes.relay()
    processes.worker()
    wait_for(lambda: effects("after-the-junk"), timeout=60, what="the good task after the junk")
    wait_for(lambda: DeadTask.objects.count() >= 10, timeout=60, what="the junk to be kept")
    unknown = DeadTask.objects.get(task_id=unknown_id)
    assert unknown.reason == "unregistered"
    assert unknown.task_name == "tests.testapp.tasks.no_such_task"
    assert (unknown.args, unknown.kwargs) == (["a", 1], {"k": "v"})
    assert "no task named 'tests.testapp.tasks.no_such_task' is registered" in unknown.exc_message
    assert DeadTask.objects.filter(reason="undecodable", task_name="").exists()
    # A pickle is refused, never loaded; a 10 MB body that is no JSON is kept whole.
    assert DeadTask.objects.get(task_id=pickled_id).reason == "undecodable"
    huge = DeadTask.objects.get(task_id=huge_id)
    assert (huge.reason, len(huge.body)) == ("undecodable", 10 * 1024 * 1024 + 2)
    truncated = DeadTask.objects.get(task_id=truncated_id)
    assert (truncated.reason, truncated.task_name) == ("undecodable", record.name)
    assert truncated.body == '[["trunc'
    for malformed_id, body in malformed.items():
        kept = DeadTask.objects.get(task_id=malformed_id)
        assert (kept.reason, kept.body) == ("undecodable", body.decode())
        assert kept.exc_message.startswith("the message is no task message: ")
    for invalid_id, body in invalid.items():
        kept = DeadTask.objects.get(task_id=invalid_id)
        assert (kept.reason, kept.body) == ("undecodable", body.decode())
        assert "the body is no [args, kwargs, embed] task message" in kept.exc_message
    wait_for(lambda: queue_counts() == (0, 0), timeout=30, what="the queue to drain")


@pytest.mark.postgres  # pg_terminate_backend
def test_a_message_for_an_unknown_task_becomes_dead_after_postgresql_dropped_the_workers_connections(
    broker: Broker, processes: ProcessFactory
) -> None:
    """As after a PostgreSQL restart: the worker's consumer, which stores such messages, must
    connect afresh, not fail with "connection already closed" until the worker restarts."""
    from django.db import connection

    processes.worker()
    unknown = {"task": "tests.testapp.tasks.no_such_task", "lang": "py"}
    publish_raw(broker, json.dumps([[], {}, {}]), {**unknown, "id": "before-the-restart"})
    wait_for(
        lambda: DeadTask.objects.filter(task_id="before-the-restart").exists(),
        timeout=60,
        what="the first unknown task to be kept",
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    publish_raw(broker, json.dumps([[], {}, {}]), {**unknown, "id": "after-the-restart"})
    wait_for(
        lambda: DeadTask.objects.filter(task_id="after-the-restart").exists(),
        timeout=30,
        what="the unknown task sent after the restart to be kept",
    )
    wait_for(lambda: queue_counts() == (0, 0), timeout=30, what="the queue to drain")
