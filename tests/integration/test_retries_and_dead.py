"""Retries are outbox rows written with the failed attempt; tasks that give up become dead."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import Ignore, Reject
from celery.exceptions import Retry as CeleryRetry
from django.test import override_settings
from django.utils import timezone

from reliable_tasks import dead, ledger, testing, worker
from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, TaskAttempt
from reliable_tasks.relay import Relay
from tests.support import QUEUE, Broker, make_dead_task, wait_for
from tests.testapp.models import Effect
from tests.testapp.tasks import (
    GatewayTimeout,
    autoretrying,
    calls_out_then_fails,
    catches_a_failed_read,
    celery_style_retry,
    charge,
    declines_through_autoretry,
    leased_retry_with_other_args,
    loses_its_lease,
    pay,
    puts_itself_back,
    record,
    retries_with_other_args,
    returns_a_set,
    slow_query,
    with_a_sentinel_default,
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


def dead_copy(row: OutboxMessage, args: list[Any], *, key: str) -> DeadTask:
    """A dead task (retries exhausted) holding the message of outbox row ``row``."""
    return DeadTask.objects.create(
        task_id=row.task_id, task_name=row.task_name, args=args, kwargs={}, idempotency_key=key,
        queue=row.queue, exchange=row.exchange, routing_key=row.routing_key, headers=row.headers,
        properties=row.properties, body=row.body, content_type=row.content_type,
        content_encoding=row.content_encoding, reason="exhausted",
    )  # fmt: skip


def test_requeue_with_a_renewed_key_runs_under_a_new_key_and_task_id() -> None:
    # A dead task whose key is done already would only be a duplicate; a renewed key runs.
    record.delay("again")
    row = OutboxMessage.objects.get(status="pending")
    source = dead_copy(row, ["again"], key=row.task_id)
    testing.run_enqueued()
    renewed = dead.requeue(source, renew_key=True)
    assert renewed.task_id != row.task_id
    assert renewed.headers["reliable_idempotency_key"].startswith(f"{row.task_id}:requeue:")
    testing.run_enqueued()
    assert Effect.objects.filter(key="again").count() == 2
    assert IdempotencyKey.objects.filter(
        key=renewed.headers["reliable_idempotency_key"], state="done"
    ).exists()


def test_a_renewed_key_keeps_within_the_ledgers_255_characters_however_often_it_is_renewed() -> (
    None
):
    """A renewal appends ':requeue:<8 characters>' to the key: a key renewed again drops its
    earlier renewal, and a key too long for the suffix is shortened with a digest of itself."""
    once = dead.renewed_key("charge:42", "aaaaaaaa-1111")
    assert once == "charge:42:requeue:aaaaaaaa"
    assert dead.renewed_key(once, "bbbbbbbb-2222") == "charge:42:requeue:bbbbbbbb"
    long_a, long_b = "k" * 250 + "a", "k" * 250 + "b"
    renewed_a, renewed_b = (dead.renewed_key(k, "cccccccc-3333") for k in (long_a, long_b))
    assert len(renewed_a) == len(renewed_b) == 255
    assert renewed_a != renewed_b
    assert renewed_a.endswith(":requeue:cccccccc")
    assert dead.renewed_key(renewed_a, "dddddddd-4444") == renewed_a.replace("cccccccc", "dddddddd")
    # Renewed for a requeue, the long key's task runs: the ledger takes the key.
    record.delay("long")
    row = OutboxMessage.objects.get(status="pending")
    source = dead_copy(row, ["long"], key=long_a)
    row.delete()
    renewed = dead.requeue(source, renew_key=True)
    testing.run_enqueued()
    key = renewed.headers["reliable_idempotency_key"]
    assert len(key) == 255
    assert IdempotencyKey.objects.filter(key=key, state="done").exists()


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


@contextlib.contextmanager
def outbox_refused() -> Iterator[None]:
    """PostgreSQL refuses every outbox row while this lasts (a trigger raises)."""
    from django.db import connection

    table = OutboxMessage._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION rt_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'outbox refused by the test'; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER rt_test_refuse BEFORE INSERT ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION rt_test_refuse()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER rt_test_refuse ON {table}")
            cursor.execute("DROP FUNCTION rt_test_refuse()")


@pytest.mark.postgres
def test_a_failed_attempt_whose_retry_cannot_be_written_leaves_no_record() -> None:
    """The attempt's record and the retry's outbox row commit together, or neither does."""
    from django.db import DatabaseError

    # The database refuses the retry's row: the attempt's record, written first in the same
    # transaction, must roll back with it. An eager call gets the error.
    with outbox_refused(), pytest.raises(DatabaseError, match="outbox refused by the test"):
        pay.apply((61,), {"outcome": "timeout"}, task_id="pay-61", throw=True)
    assert not TaskAttempt.objects.exists()
    assert not OutboxMessage.objects.exists()
    assert not DeadTask.objects.exists()


@pytest.mark.postgres
def test_a_failure_that_cannot_be_recorded_puts_the_message_back_instead_of_losing_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that cannot write the retry (nor so the attempt) must not fail the task, which
    Celery would acknowledge: the message goes back to the queue, and the log says why."""
    pay.push_request(
        id="pay-62", called_directly=False, args=(62,), kwargs={"outcome": "timeout"},
        retries=0, hostname="test", delivery_info={"redelivered": False}, is_eager=False,
    )  # fmt: skip
    try:
        with outbox_refused(), pytest.raises(Reject) as rejected:
            pay(62, outcome="timeout")
    finally:
        pay.pop_request()
    assert rejected.value.requeue
    assert (
        "attempt 1 failed (GatewayTimeout: gateway timed out for order 62), and its failure could "
        "not be recorded (ProgrammingError: outbox refused by the test" in caplog.text
    )
    assert not TaskAttempt.objects.exists()
    assert not OutboxMessage.objects.exists()
    assert not DeadTask.objects.exists()


def test_an_error_holding_a_nul_or_a_lone_surrogate_is_recorded_with_them_written_out() -> None:
    """A task's error may quote its arguments, which may hold what no database stores (a NUL
    character: PostgreSQL; a lone surrogate: any). The attempt and its retry, or the dead
    task, are written all the same: the task is neither lost nor acknowledged unrecorded."""
    outcome = pay.apply((7,), {"outcome": "odd-timeout"}, task_id="pay-odd")
    assert outcome.state == "RETRY"
    [attempt] = TaskAttempt.objects.all()
    assert attempt.message == "bad record: a\\x00b \\ud800"
    assert "GatewayTimeout: bad record: a\\x00b \\ud800" in attempt.traceback
    assert OutboxMessage.objects.get().task_id == "pay-odd"
    pay.apply((8,), {"outcome": "odd-declined"}, task_id="pay-odd-dead")
    task = DeadTask.objects.get()
    assert (task.task_id, task.reason) == ("pay-odd-dead", "give_up")
    assert task.exc_message == "bad record: a\\x00b \\ud800"


def test_a_negative_countdown_asks_for_the_retry_now() -> None:
    """As with Celery, a countdown already past (a Retry-After counted from an earlier time)
    means at once, not a ValueError that the retry policy would judge instead of the cause."""
    before = timezone.now()
    outcome = pay.apply((9,), {"outcome": "late-retry"}, task_id="pay-late")
    assert outcome.state == "RETRY"
    [attempt] = TaskAttempt.objects.all()
    assert attempt.exc_type == "tests.testapp.tasks.GatewayTimeout"
    [retry] = OutboxMessage.objects.all()
    assert before <= retry.due_at <= timezone.now()


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
    """Run ``puts_itself_back`` as a worker would run a message RabbitMQ delivered again: each
    delivery ends without an outcome, as one whose worker died does."""
    puts_itself_back.push_request(
        id=task_id, called_directly=False, args=(task_id,), kwargs={}, retries=0,
        hostname="test", delivery_info={"redelivered": True},
    )  # fmt: skip
    try:
        with contextlib.suppress(Reject, Ignore):  # back to the queue, or dead
            puts_itself_back(task_id)
    finally:
        puts_itself_back.pop_request()


def runs(task_id: str, signals: Path) -> int:
    """How often ``puts_itself_back`` ran for ``task_id``."""
    ran = signals / f"ran-{task_id}"
    return len(ran.read_text().splitlines()) if ran.exists() else 0


def deliver(task: Any, task_id: str, *, redelivered: bool, enqueued_at: dt.datetime) -> None:
    """Run ``task`` (one argument: the task id) as a worker runs a message it was delivered,
    one the outbox wrote at ``enqueued_at``."""
    task.push_request(
        id=task_id, called_directly=False, args=(task_id,), kwargs={}, retries=0,
        hostname="test", delivery_info={"redelivered": redelivered}, is_eager=False,
        reliable_enqueued_at=enqueued_at.isoformat(),
    )  # fmt: skip
    try:
        task(task_id)
    finally:
        task.pop_request()


def test_a_redelivered_attempt_whose_failure_was_recorded_is_acknowledged_without_running(
    tmp_path: Path,
) -> None:
    """The worker died (or its connection) after the failure's record and retry committed, so
    the message comes back: the attempt is over, its retry written. It is not run again (here a
    call to another system in lease mode) and no second retry is written, which would start a
    second chain of attempts."""
    enqueued = timezone.now()
    with pytest.raises(CeleryRetry):
        deliver(calls_out_then_fails, "co-1", redelivered=False, enqueued_at=enqueued)
    with pytest.raises(Ignore, match="attempt 1 already failed and was recorded"):
        deliver(calls_out_then_fails, "co-1", redelivered=True, enqueued_at=enqueued)
    assert (tmp_path / "called-co-1").read_text() == "call\n"
    assert list(TaskAttempt.objects.values_list("number", "outcome")) == [(1, "failed")]
    assert OutboxMessage.objects.get().headers["retries"] == 1
    # A message enqueued after that failure under the same task id (a call that reused it, a
    # task's replacement, which takes the replaced task's id) is another message: it runs.
    with pytest.raises(CeleryRetry):
        deliver(calls_out_then_fails, "co-1", redelivered=True, enqueued_at=timezone.now())
    assert (tmp_path / "called-co-1").read_text() == "call\ncall\n"


def test_a_second_copy_of_an_attempt_that_failed_writes_no_second_retry() -> None:
    """A relay killed before marking its row publishes it twice, both copies first deliveries:
    the second runs (its writes roll back with its failure, atomic mode), finds the attempt's
    failure recorded, and is acknowledged with nothing more written."""
    enqueued = timezone.now()
    with pytest.raises(CeleryRetry):
        deliver(write_then_fail, "copy-1", redelivered=False, enqueued_at=enqueued)
    with pytest.raises(Ignore, match="attempt 1 already failed and was recorded"):
        deliver(write_then_fail, "copy-1", redelivered=False, enqueued_at=enqueued)
    assert list(TaskAttempt.objects.values_list("number", "outcome")) == [(1, "failed")]
    assert OutboxMessage.objects.count() == 1
    assert not Effect.objects.exists()


@override_settings(RELIABLE_TASKS_MAX_DELIVERIES=1)
def test_redeliveries_count_towards_a_crash_loop_with_a_mark_at_once_without_one_at_3x() -> None:
    """A redelivery whose earlier delivery left its started mark counts against the limit; one
    without a mark (the cache is never the truth) against three times the limit."""
    # A worker that died running it left its mark: the first redelivery reaches the limit.
    ledger.done_cache.start(puts_itself_back.name, "marked", ledger.CacheWrites(task_id="marked"))
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
def test_a_task_dead_for_a_crash_loop_is_not_made_dead_again_by_another_copy(
    tmp_path: Path,
) -> None:
    """Two copies of one message (a relay that died before marking its row published it
    twice), or a delivery whose acknowledgement died with its worker: one dead task."""
    ledger.done_cache.start(puts_itself_back.name, "twice", ledger.CacheWrites(task_id="twice"))
    redeliver("twice")
    assert DeadTask.objects.filter(task_id="twice").count() == 1
    ledger.done_cache.start(puts_itself_back.name, "twice", ledger.CacheWrites(task_id="twice"))
    attempts = TaskAttempt.objects.filter(task_id="twice").count()
    redeliver("twice")  # the other copy, after another crash
    assert DeadTask.objects.filter(task_id="twice").count() == 1
    assert TaskAttempt.objects.filter(task_id="twice").count() == attempts  # nor counted
    assert runs("twice", tmp_path) == 0  # nor run


def test_a_crash_is_counted_once_and_a_later_redelivery_without_a_new_crash_is_unmarked() -> None:
    """The mark a dead execution left goes once it was counted: it cannot make every later
    redelivery of the task id look like another crash."""
    ledger.done_cache.start(puts_itself_back.name, "once", ledger.CacheWrites(task_id="once"))
    redeliver("once")  # the execution that died is counted
    redeliver("once")  # stranded in a prefetch, say: no execution died since
    outcomes = TaskAttempt.objects.filter(task_id="once").values_list("outcome", flat=True)
    assert sorted(set(outcomes) - {"failed"}) == ["lost", "redelivered"]
    assert list(outcomes).count("lost") == 1
    assert not DeadTask.objects.exists()


def record_requeue(task_id: str) -> None:
    """What a delivery leaves that put its message back because a ledger statement failed."""
    TaskAttempt.objects.create(
        task_id=task_id, task_name=puts_itself_back.name, number=1,
        outcome=TaskAttempt.Outcome.REQUEUED, message="canceling statement due to lock timeout",
    )  # fmt: skip


def crash_outcomes(task_id: str) -> list[str]:
    attempts = TaskAttempt.objects.filter(task_id=task_id, outcome__in=["lost", "redelivered"])
    return list(attempts.values_list("outcome", flat=True))


@override_settings(RELIABLE_TASKS_MAX_DELIVERIES=1)
def test_each_recorded_requeue_pays_for_one_unmarked_redelivery() -> None:
    """A delivery that put its message back (recorded, with why) ended: the redelivery after it
    is recorded but not counted, however often the two alternate. A mark says a delivery after
    it started and died: counted. The requeue pays for one redelivery only: unmarked ones that
    follow count towards the backstop (three times the limit) as before."""
    for _ in range(5):  # beyond the limit and the backstop's (3)
        record_requeue("requeued")
        redeliver("requeued")
    assert crash_outcomes("requeued") == ["redelivered"] * 5
    assert not DeadTask.objects.exists()

    record_requeue("then-died")
    ledger.done_cache.start(
        puts_itself_back.name, "then-died", ledger.CacheWrites(task_id="then-died")
    )
    redeliver("then-died")
    assert crash_outcomes("then-died") == ["lost"]
    assert DeadTask.objects.get(task_id="then-died").reason == "crash_loop"

    record_requeue("then-looped")
    for expected_dead in (False, False, False, True):  # the first is paid for
        redeliver("then-looped")
        assert DeadTask.objects.filter(task_id="then-looped").exists() is expected_dead

    with override_settings(RELIABLE_TASKS_CACHE_ALIAS=None):  # no marks: the records decide
        for _ in range(5):
            record_requeue("no-cache")
            redeliver("no-cache")
        assert crash_outcomes("no-cache") == ["redelivered"] * 5
        assert not DeadTask.objects.filter(task_id="no-cache").exists()
        redeliver("no-cache")  # no requeue before it: the cache cannot say, so it counts as lost
        assert crash_outcomes("no-cache")[-1] == "lost"
        assert DeadTask.objects.get(task_id="no-cache").reason == "crash_loop"


def test_a_requeued_dead_task_whose_expires_passed_is_sent_without_it_and_one_still_ahead_keeps_it(
    broker: Broker, relay: Relay
) -> None:
    """Sent with an 'expires' already past, the broker would drop the requeued message (or the
    worker discard it): the operator's replay would run nowhere and leave no trace."""
    past, ahead = timezone.now() - dt.timedelta(hours=1), timezone.now() + dt.timedelta(hours=1)
    expired, pending = make_dead_task(record, "expired"), make_dead_task(record, "ahead")
    for task, expires in ((expired, past), (pending, ahead)):
        task.headers["expires"] = expires.isoformat()
        # As a message captured on delivery keeps it: the TTL its first publish was given.
        task.properties["expiration"] = "0"
        task.save()
    assert dead.requeue(expired).headers["expires"] is None
    assert dead.requeue(pending).headers["expires"] == ahead.isoformat()
    OutboxMessage.objects.exclude(task_id__in=[expired.task_id, pending.task_id]).delete()
    assert relay.drain() == 2
    received = {m.headers["id"]: m for m in broker.get_all(expect=2)}
    assert set(received) == {expired.task_id, pending.task_id}
    assert received[expired.task_id].headers["expires"] is None
    assert "expiration" not in received[expired.task_id].properties
    assert 3500_000 < int(received[pending.task_id].properties["expiration"]) <= 3600_000


def receive(
    broker: Broker, body: bytes, headers: dict[str, object], content_type: str | None = None
) -> Any:
    """A message published as it is (no content encoding), as a worker receives it."""
    channel = broker.channel
    channel.basic_publish(
        channel.prepare_message(body, content_type=content_type, headers=headers),
        exchange="",
        routing_key=QUEUE,
    )
    return take(broker)


def take(broker: Broker) -> Any:
    """The next message of the queue, unacknowledged, as kombu gives it to a worker."""
    raw = wait_for(
        lambda: broker.channel.basic_get(QUEUE, no_ack=False), timeout=10, what="a message"
    )
    return broker.channel.message_to_python(raw)


def test_raw_messages_the_database_would_refuse_as_they_are_still_become_dead_tasks(
    broker: Broker,
) -> None:
    """Refused, the message would go back to the queue and come back forever, stalling the
    consumer a second each time: a NUL in a body that is valid UTF-8 (a small protobuf), ids,
    names and a content type longer than their columns."""
    protobuf = b"\x08\x00\x10\x01"
    long_id, long_name = "i" * 300, "tests.no_such_task." + "n" * 300
    long_type = "application/" + "x" * 200
    messages = [
        receive(broker, protobuf, {"id": "protobuf", "task": "tests.no_such_task"}),
        receive(
            broker, b"[[], {}, {}]", {"id": long_id, "task": long_name}, content_type=long_type
        ),
    ]
    for message in messages:
        assert worker._keep(message, "unregistered", "no such task") is True
        message.ack()
    kept = DeadTask.objects.get(task_id="protobuf")
    assert kept.content_encoding == "base64"
    assert base64.b64decode(kept.body) == protobuf
    long_one = DeadTask.objects.get(headers__id=long_id)
    assert (long_one.task_id, long_one.task_name) == (long_id[:255], long_name[:255])
    assert long_one.content_type == long_type[:100]
    assert long_one.properties["content_type"] == long_type  # whole, for the record
    assert broker.depth() == 0


def test_a_raw_message_with_nan_or_infinity_in_its_headers_becomes_a_dead_task() -> None:
    """JSON columns refuse NaN and the infinities. RabbitMQ cannot deliver them, but kombu's
    other transports (Redis, in memory) carry headers as JSON, which allows them."""
    headers = {"id": "not-finite", "task": "tests.no_such_task"}
    message = dead.RawMessage(
        headers={**headers, "nan": float("nan"), "limits": [float("inf"), float("-inf")]},
        properties={"priority": float("nan")},
        body=b"[[], {}, {}]",
        content_type="application/json",
        content_encoding="utf-8",
    )
    kept = dead.capture_raw(message, reason="unregistered", error="no such task")
    kept.refresh_from_db()
    assert (kept.headers["nan"], kept.headers["limits"]) == ("NaN", ["Infinity", "-Infinity"])
    assert kept.properties == {"priority": "NaN"}


@pytest.mark.postgres
def test_a_capture_after_the_database_dropped_a_persistent_connection_connects_afresh(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer keeps its connection (CONN_MAX_AGE=None here) and PostgreSQL drops it (a
    restart, pg_terminate_backend): one capture may fail and put its message back, the next
    connects afresh, instead of failing with "connection already closed" until a restart."""
    from django.db import connection, connections

    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    connection.close()
    first = receive(broker, b"[[], {}, {}]", {"id": "before", "task": "tests.no_such_task"})
    assert worker._keep(first, "unregistered", "no such task")
    first.ack()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        other.close()
    message = receive(broker, b"[[], {}, {}]", {"id": "after", "task": "tests.no_such_task"})
    if not worker._keep(message, "unregistered", "no such task"):
        message = take(broker)  # put back: the next delivery
        assert worker._keep(message, "unregistered", "no such task")
    message.ack()
    assert DeadTask.objects.filter(task_id="after").exists()


@pytest.mark.postgres  # SQLite does not abort a transaction on an error
def test_a_body_that_catches_a_failed_query_fails_instead_of_committing_nothing() -> None:
    """PostgreSQL aborted the transaction: its COMMIT would roll everything back, the key's
    "done" too, and psycopg reports no error, so the task would count as a success (and the
    cache remember it done) with none of its writes. It fails instead, for the retry policy."""
    outcome = catches_a_failed_read.apply(("aborted",), task_id="aborted-1")
    assert outcome.state == "RETRY"
    [attempt] = TaskAttempt.objects.all()
    assert attempt.exc_type == "django.db.transaction.TransactionManagementError"
    assert not Effect.objects.exists()
    assert not IdempotencyKey.objects.filter(key="aborted-1").exists()
    assert (
        ledger.done_cache.start(
            catches_a_failed_read.name, "aborted-1", ledger.CacheWrites(task_id="probe")
        )[0]
        is None
    )  # not remembered as done


def test_an_execution_that_lost_its_lease_sends_no_follow_ups() -> None:
    """The execution that took the key over sends the callbacks and the chain's next step when
    it completes; the one that lost it must not send them too."""
    outcome = loses_its_lease.apply(("lost",), link=record.s(), task_id="lost-1")
    assert outcome.state == "SUCCESS"
    assert Effect.objects.filter(key="lost").count() == 1
    assert not OutboxMessage.objects.filter(task_name=record.name).exists()
    # Kept, it sends them: the same call without the takeover.
    record.apply_async(("control",), link=record.s())
    testing.run_enqueued()
    assert Effect.objects.filter(key="control").count() == 2  # the task's, its callback's


def test_a_default_json_cannot_carry_leaves_the_fingerprint_alike_for_every_call() -> None:
    """A sentinel default made every execution fail as its fingerprint was computed; calls
    that leave it out are the same call, and a duplicate gets the stored result."""
    with_a_sentinel_default.delay("s1")
    with_a_sentinel_default.delay("s1")
    testing.run_enqueued()
    [effect] = Effect.objects.filter(key="s1")
    assert effect.payload == {"marker_given": False}
    assert not DeadTask.objects.exists()
