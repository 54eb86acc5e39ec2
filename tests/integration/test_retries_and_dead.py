"""Retries are outbox rows written with the failed attempt; tasks that give up become dead."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from django.test import override_settings
from django.utils import timezone

from reliable_tasks import dead, ledger, testing
from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, TaskAttempt
from tests.testapp.models import Effect
from tests.testapp.tasks import (
    GatewayTimeout,
    autoretrying,
    celery_style_retry,
    charge,
    declines_through_autoretry,
    leased_retry_with_other_args,
    pay,
    record,
    retries_with_other_args,
    returns_a_set,
    slow_query,
    with_deadline,
    write_then_fail,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _signal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.testapp.tasks.SIGNAL_DIR", tmp_path)


def test_a_failed_attempt_writes_its_record_and_the_next_attempt_due_after_the_backoff() -> None:
    before = timezone.now()
    outcome = pay.apply((1,), {"outcome": "timeout"}, task_id="pay-1")
    assert outcome.state == "RETRY"
    [attempt] = TaskAttempt.objects.all()
    assert (attempt.task_id, attempt.number, attempt.outcome) == ("pay-1", 1, "failed")
    assert attempt.exc_type == "tests.testapp.tasks.GatewayTimeout"
    assert "gateway timed out for order 1" in attempt.message
    assert "raise GatewayTimeout" in attempt.traceback
    [retry] = OutboxMessage.objects.all()
    assert retry.task_id == "pay-1"
    assert retry.headers["retries"] == 1
    assert retry.headers["reliable_first_attempt"]
    # Full jitter on a 1 s base: the first wait is within [0, 1] s.
    assert before <= retry.due_at <= timezone.now() + dt.timedelta(seconds=1)
    assert 0 <= retry.headers["reliable_previous_delay"] <= 1


def test_retries_exhausted_make_a_dead_task_with_every_attempt() -> None:
    before = timezone.now()
    pay.apply_async((2,), {"outcome": "timeout"})
    with pytest.raises(Exception, match="gateway timed out for order 2"):
        testing.run_enqueued()
    after = timezone.now()
    [task] = DeadTask.objects.all()
    # Each attempt says where and when it ran; the dead task, when it failed first and last.
    for attempt in task.attempts:
        assert attempt["worker"]
        started, ended = (dt.datetime.fromisoformat(attempt[k]) for k in ("started_at", "ended_at"))
        assert before <= started <= ended <= after
    assert task.first_failed_at == dt.datetime.fromisoformat(task.attempts[0]["started_at"])
    assert task.first_failed_at < task.last_failed_at <= after
    assert task.reason == "exhausted"
    assert task.task_name == pay.name
    assert task.args == [2]
    assert task.kwargs == {"outcome": "timeout"}
    assert task.exc_type == "tests.testapp.tasks.GatewayTimeout"
    assert task.attempt_count == 3
    assert [a["number"] for a in task.attempts] == [1, 2, 3]
    assert all("GatewayTimeout" in a["traceback"] for a in task.attempts)
    assert task.status == "dead"
    assert testing.enqueued() == []


def test_an_error_message_and_traceback_are_kept_within_their_bounds() -> None:
    outcome = pay.apply((4,), {"outcome": "huge-error"})
    assert outcome.failed()
    [attempt] = TaskAttempt.objects.all()
    assert dead.MAX_MESSAGE - 20 < len(attempt.message) <= dead.MAX_MESSAGE
    assert attempt.message.startswith("declined: xxx")
    assert attempt.message.endswith("... (truncated)")
    assert dead.MAX_TRACEBACK - 20 < len(attempt.traceback) <= dead.MAX_TRACEBACK
    assert attempt.traceback.startswith("Traceback (most recent call last)")
    assert attempt.traceback.endswith("... (truncated)")
    task = DeadTask.objects.get()
    assert task.exc_message == attempt.message
    assert task.attempts[0]["message"] == attempt.message


def test_a_task_without_a_policy_follows_the_projects_default() -> None:
    policy = {"max_attempts": 2, "base": 1.0, "cap": 1.0, "jitter": "none"}
    with override_settings(RELIABLE_TASKS_RETRY_POLICY=policy):
        write_then_fail.delay("default-policy")
        with pytest.raises(ValueError, match="default-policy failed after its write"):
            testing.run_enqueued()
    task = DeadTask.objects.get()
    assert (task.reason, task.attempt_count) == ("exhausted", 2)
    # Every attempt's write rolled back with it (atomic mode).
    assert not Effect.objects.exists()


def test_a_broken_default_policy_is_logged_and_the_built_in_one_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with override_settings(RELIABLE_TASKS_RETRY_POLICY={"max_attempts": 0}):
        outcome = write_then_fail.apply(("broken-policy",))
    assert outcome.state == "RETRY"  # RetryPolicy(): five attempts, so this one is retried
    assert "RELIABLE_TASKS_RETRY_POLICY is not a valid RetryPolicy" in caplog.text
    assert "using RetryPolicy() meanwhile" in caplog.text
    assert OutboxMessage.objects.get().headers["retries"] == 1


def test_a_give_up_exception_makes_the_task_dead_at_once() -> None:
    outcome = pay.apply((3,), {"outcome": "declined"})
    assert outcome.failed()
    [task] = DeadTask.objects.all()
    assert (task.reason, task.attempt_count) == ("give_up", 1)
    assert task.exc_message == "card declined for order 3"
    assert not OutboxMessage.objects.exists()


def test_an_exception_outside_retry_on_is_not_retried() -> None:
    outcome = pay.apply((4,), {"outcome": "bug"})
    assert isinstance(outcome.result, KeyError)
    [task] = DeadTask.objects.all()
    assert (task.reason, task.exc_type, task.attempt_count) == (
        "not_retryable",
        "builtins.KeyError",
        1,
    )
    assert not OutboxMessage.objects.exists()


def test_retry_requested_by_the_task_uses_its_delay() -> None:
    outcome = pay.apply((6,), {"outcome": "retry-after"})
    assert outcome.state == "RETRY"
    [retry] = OutboxMessage.objects.all()
    wait = (retry.due_at - timezone.now()).total_seconds()
    assert 28 < wait <= 30


def test_a_passed_deadline_stops_the_retries() -> None:
    # 5 s waits and an 8 s deadline: a first attempt may retry...
    assert with_deadline.apply(("fresh",)).state == "RETRY"
    # ...but not one whose run of attempts began 4 s ago (4 + 5 > 8).
    began = (timezone.now() - dt.timedelta(seconds=4)).isoformat()
    late = with_deadline.apply(("late",), headers={"reliable_first_attempt": began}, retries=1)
    assert late.failed()
    [task] = DeadTask.objects.all()
    assert (task.reason, task.args) == ("deadline", ["late"])


def test_a_key_reused_with_other_arguments_becomes_a_dead_task() -> None:
    charge.apply((9,), {"amount": 10})
    charge.apply((9,), {"amount": 11})
    [task] = DeadTask.objects.all()
    assert task.reason == "key_reused"
    assert task.idempotency_key == "charge:9"
    assert task.kwargs == {"amount": 11}


def _dead_pay(order_id: int) -> DeadTask:
    pay.delay(order_id, outcome="timeout")
    with pytest.raises(Exception, match="timed out"):
        testing.run_enqueued()
    return DeadTask.objects.get(args=[order_id])


def test_requeue_sends_the_same_message_again_through_the_outbox() -> None:
    task = _dead_pay(7)
    row = dead.requeue(task, args=[7], kwargs={"outcome": "ok"}, user="ops")
    task.refresh_from_db()
    assert (task.status, task.status_changed_by, task.requeued_outbox_id) == (
        "requeued",
        "ops",
        row.pk,
    )
    assert row.task_id == task.task_id
    assert row.headers["retries"] == 0
    assert "reliable_first_attempt" not in row.headers
    assert testing.run_enqueued() == ["paid 7"]
    assert Effect.objects.filter(key="pay:7").count() == 1


def test_requeue_with_a_renewed_key_runs_under_a_new_key_and_task_id() -> None:
    # A dead task whose key is done already would only be a duplicate; a renewed key runs.
    record.delay("again")
    row = OutboxMessage.objects.get(status="pending")
    source = DeadTask.objects.create(
        task_id=row.task_id, task_name=row.task_name, args=["again"], kwargs={}, idempotency_key=row.task_id,
        queue=row.queue, exchange=row.exchange, routing_key=row.routing_key, headers=row.headers,
        properties=row.properties, body=row.body, content_type=row.content_type,
        content_encoding=row.content_encoding, reason="exhausted",
    )  # fmt: skip
    testing.run_enqueued()
    renewed = dead.requeue(source, renew_key=True)
    assert renewed.task_id != row.task_id
    assert renewed.headers["reliable_idempotency_key"].startswith(f"{row.task_id}:requeue:")
    testing.run_enqueued()
    assert Effect.objects.filter(key="again").count() == 2
    assert IdempotencyKey.objects.filter(
        key=renewed.headers["reliable_idempotency_key"], state="done"
    ).exists()


def test_discard_keeps_the_record_and_bulk_actions_take_only_dead_ones() -> None:
    first, second = _dead_pay(11), _dead_pay(12)
    dead.discard(first, user="ops")
    assert dead.requeue_many(DeadTask.objects.all(), user="ops") == 1
    statuses = sorted(
        (args[0], status) for args, status in DeadTask.objects.values_list("args", "status")
    )
    assert statuses == [(11, "discarded"), (12, "requeued")]
    second.refresh_from_db()
    assert OutboxMessage.objects.get(pk=second.requeued_outbox_id).status == "pending"


def test_an_undecodable_dead_task_cannot_be_requeued() -> None:
    task = dead.capture_raw(
        dead.RawMessage(
            headers={"task": "x", "id": "1"},
            properties={},
            body=b"\xff\xfe\x00",
            content_type="application/json",
            content_encoding="utf-8",
        ),
        reason="undecodable",
        error="bad bytes",
    )
    assert task.content_encoding == "base64"
    with pytest.raises(dead.CannotRequeue, match="could not be decoded"):
        dead.requeue(task)


def test_the_retry_dead_and_requeue_signals_carry_what_they_document() -> None:
    from reliable_tasks import signals

    seen: list[tuple[str, dict[str, object]]] = []

    def receiver(name: str) -> Callable[..., None]:
        def receive(sender: object, **kwargs: object) -> None:
            seen.append((name, {"sender": sender, **kwargs}))

        return receive

    receivers = {n: receiver(n) for n in ("task_retried", "task_dead", "task_requeued")}
    for name, receive in receivers.items():
        getattr(signals, name).connect(receive)
    try:
        task = _dead_pay(51)
        row = dead.requeue(task, user="ops")
    finally:
        for name, receive in receivers.items():
            getattr(signals, name).disconnect(receive)
    assert [name for name, _ in seen] == [
        "task_retried",
        "task_retried",
        "task_dead",
        "task_requeued",
    ]
    retried = [kwargs for name, kwargs in seen if name == "task_retried"]
    assert [k["attempt"] for k in retried] == [1, 2]
    assert all(k["task_id"] == task.task_id and k["task"].name == pay.name for k in retried)
    assert all(isinstance(k["exc"], GatewayTimeout) and 0 <= k["delay"] <= 10 for k in retried)  # type: ignore[operator]
    _, died = seen[2]
    assert died["sender"] is DeadTask
    assert died["dead_task"].pk == task.pk  # type: ignore[attr-defined]
    assert isinstance(died["exc"], GatewayTimeout)
    _, requeued = seen[3]
    assert (requeued["dead_task"].pk, requeued["outbox_id"], requeued["user"]) == (
        task.pk,
        row.pk,
        "ops",
    )  # type: ignore[attr-defined]


@pytest.mark.postgres
def test_a_failed_attempt_whose_retry_cannot_be_written_leaves_no_record() -> None:
    """The attempt's record and the retry's outbox row commit together, or neither does."""
    from django.db import DatabaseError, connection

    table = OutboxMessage._meta.db_table
    with connection.cursor() as cursor:
        # The database refuses the retry's row: the attempt's record, written first in the
        # same transaction, must roll back with it.
        cursor.execute(
            "CREATE FUNCTION rt_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'outbox refused by the test'; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER rt_test_refuse BEFORE INSERT ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION rt_test_refuse()"
        )
    try:
        with pytest.raises(DatabaseError, match="outbox refused by the test"):
            pay.apply((61,), {"outcome": "timeout"}, task_id="pay-61", throw=True)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER rt_test_refuse ON {table}")
            cursor.execute("DROP FUNCTION rt_test_refuse()")
    assert not TaskAttempt.objects.exists()
    assert not OutboxMessage.objects.exists()
    assert not DeadTask.objects.exists()


def test_only_the_latest_attempts_are_kept() -> None:
    with override_settings(RELIABLE_TASKS_MAX_RECORDED_ATTEMPTS=2):
        pay.delay(21, outcome="timeout")
        with pytest.raises(Exception, match="timed out"):
            testing.run_enqueued()
    assert list(TaskAttempt.objects.values_list("number", flat=True)) == [2, 3]
    dead_task = DeadTask.objects.get()
    assert [a["number"] for a in dead_task.attempts] == [2, 3]
    # The counts and times are the task's own, not those of the attempts kept on record.
    assert dead_task.attempt_count == 3
    kept_first = min(a.started_at for a in TaskAttempt.objects.all())
    assert dead_task.first_failed_at < kept_first


def test_prune_removes_acted_on_dead_tasks_and_old_attempts_but_keeps_dead_ones() -> None:
    acted, untouched = _dead_pay(31), _dead_pay(32)
    dead.discard(acted)
    long_ago = timezone.now() - dt.timedelta(days=31)
    DeadTask.objects.update(status_changed_at=long_ago, last_failed_at=long_ago)
    TaskAttempt.objects.update(ended_at=long_ago)
    assert dead.prune(limit=100) == 1 + 6
    assert list(DeadTask.objects.values_list("pk", flat=True)) == [untouched.pk]
    assert not TaskAttempt.objects.exists()


def test_one_grep_for_the_task_id_follows_its_attempts_and_its_death(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="reliable_tasks")
    pay.delay(41, outcome="timeout")
    task_id = OutboxMessage.objects.get().task_id
    with pytest.raises(Exception, match="timed out"):
        testing.run_enqueued()
    lines = [r.getMessage() for r in caplog.records if f"id={task_id}" in r.getMessage()]
    assert [line.split(" | ")[0] for line in lines[:2]] == [
        f"task={pay.name} id={task_id} key={task_id} attempt=1",
        f"task={pay.name} id={task_id} key={task_id} attempt=2",
    ]
    assert "attempt failed (GatewayTimeout: gateway timed out for order 41); retry in" in lines[0]
    assert lines[-1].startswith(f"task={pay.name} id={task_id} key={task_id} dead_task=")
    assert "dead task: retries exhausted" in lines[-1]
    # Its requeue too, under the key it runs with.
    dead.requeue(DeadTask.objects.get(), user="ops")
    requeued = [r.getMessage() for r in caplog.records if f"id={task_id}" in r.getMessage()][-1]
    assert requeued.startswith(f"task={pay.name} id={task_id} key={task_id} dead_task=")
    assert requeued.endswith("| dead task requeued through the outbox by ops")


def test_celery_self_retry_is_durable_even_in_atomic_mode() -> None:
    outcome = celery_style_retry.apply(("r",), task_id="cr")
    assert outcome.state == "RETRY"
    # The attempt's writes rolled back; the retry row and the attempt's record did not.
    assert not Effect.objects.exists()
    [row] = OutboxMessage.objects.all()
    assert 4 < (row.due_at - timezone.now()).total_seconds() <= 5
    [attempt] = TaskAttempt.objects.all()
    assert attempt.exc_type == "tests.testapp.tasks.GatewayTimeout"
    assert testing.run_enqueued() == ["r"]
    assert list(Effect.objects.values_list("key", flat=True)) == ["r:attempt1"]


def test_autoretry_for_goes_through_the_retry_policy_to_a_dead_task() -> None:
    autoretrying.delay("a")
    with pytest.raises(Exception, match="always slow"):
        testing.run_enqueued()
    task = DeadTask.objects.get()
    assert (task.reason, task.attempt_count, task.exc_type) == (
        "exhausted",
        5,
        "tests.testapp.tasks.GatewayTimeout",
    )


def test_positional_and_keyword_arguments_are_the_same_call_for_a_key() -> None:
    charge.apply((15,), {"amount": 3})
    again = charge.apply((15, 3))
    assert again.successful()
    assert Effect.objects.filter(key="charge:15").count() == 1
    assert not DeadTask.objects.exists()


def test_a_duplicate_does_not_send_link_callbacks_again() -> None:
    record.apply_async(("parent",), link=record.si("callback"), task_id="with-link")
    testing.run_enqueued()
    OutboxMessage.objects.filter(task_id="with-link").update(status="pending")
    testing.run_enqueued()
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["callback", "parent"]
    assert OutboxMessage.objects.filter(task_name=record.name).count() == 2


@pytest.mark.postgres
def test_a_task_whose_own_query_fails_is_retried_not_requeued() -> None:
    outcome = slow_query.apply(("q",))
    assert outcome.state == "RETRY"
    [attempt] = TaskAttempt.objects.all()
    assert attempt.exc_type == "django.db.utils.OperationalError"
    assert "statement timeout" in attempt.message


def test_give_up_on_wins_over_autoretry_for() -> None:
    declines_through_autoretry.apply((51,))
    task = DeadTask.objects.get()
    assert (task.reason, task.exc_type) == ("give_up", "tests.testapp.tasks.CardDeclined")


def test_self_retry_with_new_arguments_runs_the_next_attempt_with_them() -> None:
    retries_with_other_args.delay("n")
    testing.run_enqueued()
    assert list(Effect.objects.values_list("key", flat=True)) == ["n:step1"]


def test_a_requeued_task_starts_its_attempt_count_afresh() -> None:
    task = _dead_pay(61)
    assert TaskAttempt.objects.filter(task_id=task.task_id).count() == 3
    dead.requeue(task, kwargs={"outcome": "ok"})
    assert not TaskAttempt.objects.filter(task_id=task.task_id).exists()
    assert len(DeadTask.objects.get(pk=task.pk).attempts) == 3
    assert testing.run_enqueued() == ["paid 61"]


def test_a_lease_mode_retry_with_other_arguments_is_not_refused_as_a_reused_key() -> None:
    leased_retry_with_other_args.delay("lr")
    testing.run_enqueued()
    assert list(Effect.objects.values_list("key", flat=True)) == ["lr:step1"]
    assert not DeadTask.objects.exists()


def test_follow_ups_that_cannot_be_sent_keep_the_attempt_failed_and_the_callback_for_the_retry() -> (
    None
):
    outcome = returns_a_set.apply(("with-callback",), link=record.s(), task_id="set-1")
    assert outcome.state == "RETRY"
    assert not Effect.objects.exists()  # the task's write rolled back with its failed follow-up
    [retry] = OutboxMessage.objects.all()
    assert '"callbacks": [' in retry.body
    assert "tests.testapp.tasks.record" in retry.body


def redeliver(task_id: str) -> None:
    """Run ``write_then_fail`` as a worker would run a message RabbitMQ delivered again."""
    write_then_fail.push_request(
        id=task_id, called_directly=False, args=(task_id,), kwargs={}, retries=0,
        hostname="test", delivery_info={"redelivered": True},
    )  # fmt: skip
    try:
        with contextlib.suppress(Exception):  # the retry or the dead task Celery is told of
            write_then_fail(task_id)
    finally:
        write_then_fail.pop_request()


@override_settings(RELIABLE_TASKS_MAX_DELIVERIES=1)
def test_redeliveries_count_towards_a_crash_loop_with_a_mark_at_once_without_one_at_3x() -> None:
    """A redelivery whose earlier delivery left its started mark counts against the limit; one
    without a mark (the cache is never the truth) against three times the limit."""
    # A worker that died running it left its mark: the first redelivery reaches the limit.
    ledger.done_cache.start(write_then_fail.name, "marked", ledger.CacheWrites(task_id="marked"))
    redeliver("marked")
    assert DeadTask.objects.get(task_id="marked").reason == "crash_loop"
    # No mark: recorded each time, dead on the third.
    for expected_dead in (False, False, True):
        redeliver("unmarked")
        assert DeadTask.objects.filter(task_id="unmarked").exists() is expected_dead
    outcomes = TaskAttempt.objects.filter(task_id="unmarked").values_list("outcome", flat=True)
    assert list(outcomes).count("redelivered") == 3
    assert DeadTask.objects.get(task_id="unmarked").reason == "crash_loop"


@override_settings(RELIABLE_TASKS_MAX_DELIVERIES=1)
def test_a_task_dead_for_a_crash_loop_is_not_made_dead_again_by_another_copy() -> None:
    """Two copies of one message (a relay that died before marking its row published it
    twice), or a delivery whose acknowledgement died with its worker: one dead task."""
    ledger.done_cache.start(write_then_fail.name, "twice", ledger.CacheWrites(task_id="twice"))
    redeliver("twice")
    assert DeadTask.objects.filter(task_id="twice").count() == 1
    ledger.done_cache.start(write_then_fail.name, "twice", ledger.CacheWrites(task_id="twice"))
    attempts = TaskAttempt.objects.filter(task_id="twice").count()
    redeliver("twice")  # the other copy, after another crash
    assert DeadTask.objects.filter(task_id="twice").count() == 1
    assert TaskAttempt.objects.filter(task_id="twice").count() == attempts  # nor counted
    assert not Effect.objects.filter(key="twice").exists()  # nor run


def test_a_crash_is_counted_once_and_a_later_redelivery_without_a_new_crash_is_unmarked() -> None:
    """The mark a dead execution left goes once it was counted: it cannot make every later
    redelivery of the task id look like another crash."""
    ledger.done_cache.start(write_then_fail.name, "once", ledger.CacheWrites(task_id="once"))
    redeliver("once")  # the execution that died is counted
    redeliver("once")  # stranded in a prefetch, say: no execution died since
    outcomes = TaskAttempt.objects.filter(task_id="once").values_list("outcome", flat=True)
    assert sorted(set(outcomes) - {"failed"}) == ["lost", "redelivered"]
    assert list(outcomes).count("lost") == 1
    assert not DeadTask.objects.exists()
