"""Faults at the worker: its database goes away mid-task; it dies right after a task's commit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from celery import chain
from django.db import connection

from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, TaskAttempt
from reliable_tasks.relay import Relay
from tests.e2e.test_idempotency_faults import drained, observed, queue_counts
from tests.support import Broker, ProcessFactory, TcpProxy, effects, wait_for
from tests.testapp.tasks import dies_after_its_commit, record, two_steps

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
def test_a_worker_that_loses_the_database_mid_task_puts_the_message_back_and_runs_it_once_after(
    broker: Broker, relay: Relay, processes: ProcessFactory, tmp_path: Path
) -> None:
    """Only the worker's way to PostgreSQL is cut (the test and the relay keep theirs), while
    the task's first write waits uncommitted. The worker neither acknowledges the message nor
    hands the outage to the retry policy: it puts the message back until the database answers."""
    database = connection.settings_dict
    proxy = TcpProxy(int(database["PORT"]), database["HOST"])
    try:
        task_id = two_steps.delay("outage", 3.0).id
        assert relay.drain() == 1
        worker = processes.worker(
            env={
                "PGHOST": "127.0.0.1",
                "PGPORT": str(proxy.port),
                "RT_TEST_SIGNAL_DIR": str(tmp_path),
            }
        )
        wait_for(
            lambda: (tmp_path / f"started-outage-{task_id}").exists(),
            timeout=60,
            what="the task to write its first part",
        )
        proxy.cut()
        # The interrupted execution and at least two deliveries after it found no database.
        wait_for(
            lambda: processes.log_of(worker).count("database unavailable") >= 3,
            timeout=30,
            what="the worker to put the message back three times",
        )
        assert sum(queue_counts()) == 1, "the message must stay in RabbitMQ during the outage"
        assert not effects("outage")
        proxy.restore()
        wait_for(lambda: effects("outage:part2"), timeout=60, what="the task to run after")
        wait_for(drained, timeout=30, what="the message to be acknowledged")
    finally:
        proxy.close()
    # The first part written before the cut was rolled back with the session, not kept.
    assert Counter(effects("outage")) == {"outage:part1": 1, "outage:part2": 1}
    key = IdempotencyKey.objects.get(task_name=two_steps.name, key=task_id)
    assert (key.state, key.attempts) == ("done", 1)
    # The outage was not the task's failure: no failed attempt, no retry, nothing dead.
    assert not TaskAttempt.objects.filter(outcome=TaskAttempt.Outcome.FAILED).exists()
    assert OutboxMessage.objects.count() == 1
    assert not DeadTask.objects.exists()
    assert worker.poll() is None


@pytest.mark.parametrize("follow_up", ["link", "chain"])
def test_a_worker_killed_right_after_a_commit_still_sends_the_follow_up_once(
    broker: Broker, processes: ProcessFactory, follow_up: str
) -> None:
    """The pool process dies between the commit of the task's transaction and the message's
    acknowledgement, where Celery alone would not yet have sent the callback or the next chain
    step. The follow-up went out with the commit; the redelivery is answered as a duplicate
    and sends nothing again."""
    processes.relay()
    worker = processes.worker()
    if follow_up == "link":
        dies_after_its_commit.apply_async(("after-commit",), link=record.si(follow_up))
    else:
        chain(dies_after_its_commit.si("after-commit"), record.si(follow_up)).delay()
    task_id = OutboxMessage.objects.get(task_name=dies_after_its_commit.name).task_id
    wait_for(
        lambda: task_id in [o.key for o in observed("duplicate")],
        timeout=60,
        what="the redelivery to be answered as a duplicate",
    )
    # Anything the redelivery enqueued is in the outbox before its acknowledgement: once the
    # queue and the outbox are both empty, no second follow-up can be on its way.
    wait_for(
        lambda: (
            drained()
            and not OutboxMessage.objects.filter(status="pending").exists()
            and effects(follow_up)
        ),
        timeout=60,
        what="the follow-up to run and every message to be acknowledged",
    )
    assert "signal 9 (SIGKILL)" in processes.log_of(worker), "the pool process was not killed"
    assert Counter(effects()) == {"after-commit": 1, follow_up: 1}
    # The redelivery was the only duplicate: no copy of the follow-up was sent to be refused.
    assert [o.key for o in observed("duplicate")] == [task_id]
    sent = Counter(OutboxMessage.objects.values_list("task_name", flat=True))
    assert sent == {dies_after_its_commit.name: 1, record.name: 1}
    key = IdempotencyKey.objects.get(task_name=dies_after_its_commit.name, key=task_id)
    assert (key.state, key.attempts) == ("done", 1)
    assert not DeadTask.objects.exists()
    assert worker.poll() is None
