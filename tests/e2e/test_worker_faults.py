"""Faults at the worker: its database goes away mid-task; it dies right after a task's commit."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from celery import chain
from django.db import connection
from kombu import Producer
from kombu.transport import native_delayed_delivery

from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, TaskAttempt
from reliable_tasks.relay import Relay
from reliable_tasks.topology import quorum_queue
from tests.e2e.test_idempotency_faults import drained, observed
from tests.e2e.test_poison_and_retries import held, wait_for_hold
from tests.support import Broker, ProcessFactory, TcpProxy, effects, wait_for
from tests.testapp.tasks import dies_after_its_commit, record, two_steps

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
def test_a_worker_that_loses_the_database_mid_task_puts_the_message_back_and_runs_it_once_after(
    broker: Broker, relay: Relay, processes: ProcessFactory, tmp_path: Path
) -> None:
    """Only the worker's way to PostgreSQL is cut (the test and the relay keep theirs), while
    the task's first write waits uncommitted. The worker neither acknowledges the message nor
    hands the outage to the retry policy: it holds the message until the database answers, then
    puts it back."""
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
        # The interrupted execution found no database: the worker holds the message.
        wait_for_hold(worker, processes, timeout=30)
        held(worker, processes, 3.0)
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


@pytest.mark.postgres  # the outage is a cut proxy in front of PostgreSQL
def test_a_database_outage_does_not_spend_a_quorum_queues_delivery_limit(
    broker: Broker, processes: ProcessFactory
) -> None:
    """A quorum queue counts every message put back against its delivery limit (here 1, as
    ``reliable_tasks.topology.quorum_queue`` builds it) and then dead-letters the message. A
    worker that put the message back once a second while the database is down would have it
    dead-lettered in two; held, it goes back once, when the database answers, and runs."""
    name = f"rt-tests-quorum-{uuid.uuid4().hex[:8]}"
    queue, dead_letters = quorum_queue(name, delivery_limit=1)
    queue(broker.channel).declare()
    dead_letters(broker.channel).declare()
    proxy = TcpProxy(int(os.environ.get("PGPORT", "5432")))
    worker = None
    try:
        proxy.cut()
        worker = processes.worker(
            name,
            env={
                "PGPORT": str(proxy.port),
                "RT_TEST_QUORUM_QUEUE": name,
                "RT_TEST_QUORUM_LIMIT": "1",
            },
        )
        Producer(broker.channel).publish(
            json.dumps([["through-quorum"], {}, {}]), routing_key=name, exchange=name,
            headers={"id": str(uuid.uuid4()), "task": record.name, "lang": "py", "retries": 0},
            content_type="application/json", content_encoding="utf-8", delivery_mode=2,
        )  # fmt: skip
        wait_for_hold(worker, processes)
        time.sleep(4.0)  # four times the pause after which the message used to go back
        assert broker.channel.queue_declare(dead_letters.name, passive=True).message_count == 0
        proxy.restore()
        wait_for(lambda: effects("through-quorum"), timeout=60, what="the task to run")
        assert effects("through-quorum") == ["through-quorum"]
        assert processes.log_of(worker).count("database unavailable") == 1
    finally:
        proxy.close()
        if worker is not None:
            processes.kill(worker)  # before the clean-up: it declares what goes
        broker.channel.queue_delete(name)
        broker.channel.queue_delete(dead_letters.name)
        remove_native_delayed_delivery(broker)


def remove_native_delayed_delivery(broker: Broker) -> None:
    """What Celery's worker declares when its configuration has a quorum queue (the exchanges
    and queues of its native delayed delivery), removed so that no later test's broker restart
    has them to recover."""
    for level in range(native_delayed_delivery.MAX_LEVEL + 1):
        broker.channel.queue_delete(native_delayed_delivery.level_name(level))
        broker.channel.exchange_delete(native_delayed_delivery.level_name(level))
    broker.channel.exchange_delete(native_delayed_delivery.CELERY_DELAYED_DELIVERY_EXCHANGE)


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
