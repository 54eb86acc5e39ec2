"""Faults made to happen: the broker stops, relays are killed, two relays race."""

from __future__ import annotations

import collections
import datetime as dt
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from reliable_tasks.models import OutboxMessage, RelayHeartbeat
from reliable_tasks.relay import NOTIFY_CHANNEL, Relay
from tests.support import QUEUE, ROUTED_QUEUE, Broker, ProcessFactory, rabbitmqctl, wait_for
from tests.testapp.models import Effect
from tests.testapp.tasks import record, routed

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def enqueue_many(n: int, prefix: str, per_transaction: int = 500) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, per_transaction):
        with transaction.atomic():
            ids += [
                record.delay(f"{prefix}{i}").id
                for i in range(start, min(n, start + per_transaction))
            ]
    return ids


def dispatched() -> int:
    return OutboxMessage.objects.filter(status="dispatched").count()


def received_ids(broker: Broker, expect: int) -> collections.Counter[str]:
    return collections.Counter(m.headers["id"] for m in broker.get_all(expect=expect, timeout=30))


def test_commits_succeed_while_the_broker_is_down_and_rows_go_out_when_it_returns(
    broker: Broker, processes: ProcessFactory, service_outage: None
) -> None:
    relay = processes.relay()
    broker.close()
    rabbitmqctl("stop_app")
    # Producers never touch the broker: these commits succeed while it is down.
    ids = enqueue_many(200, "down-", per_transaction=20)
    time.sleep(2)  # the relay tries, fails and backs off meanwhile
    assert dispatched() == 0
    assert OutboxMessage.objects.filter(status="pending").count() == 200
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    wait_for(
        lambda: dispatched() == 200, timeout=60, what="every row to be dispatched after start_app"
    )
    fresh = Broker()
    try:
        got = received_ids(fresh, expect=200)
    finally:
        fresh.close()
    assert set(got) == set(ids)
    assert relay.poll() is None, processes.log_of(relay)
    assert "broker unavailable" in processes.log_of(relay)


def test_a_relay_killed_mid_batch_loses_nothing(broker: Broker, processes: ProcessFactory) -> None:
    ids = enqueue_many(6000, "kill-")
    env = {"RT_TEST_RELAY_BATCH_SIZE": "250"}
    first = processes.relay(env=env)
    wait_for(lambda: dispatched() >= 250, timeout=60, what="the first batches")
    processes.kill(first, signal.SIGKILL)
    done_before_kill = dispatched()
    assert done_before_kill < 6000, "the relay finished before it could be killed; enqueue more"
    processes.relay(env=env)
    wait_for(lambda: dispatched() == 6000, timeout=120, what="the second relay to finish")
    got = received_ids(broker, expect=6000)
    assert set(got) == set(ids), "a task was lost"
    duplicates = sum(c - 1 for c in got.values())
    # At most the batch in flight at the kill goes out twice.
    assert duplicates <= 250
    print(f"relay SIGKILL after {done_before_kill} rows: {duplicates} duplicate publishes")


@pytest.mark.postgres
def test_two_relays_on_postgresql_never_publish_a_row_twice(
    broker: Broker, processes: ProcessFactory
) -> None:
    assert connection.vendor == "postgresql"
    ids = enqueue_many(8000, "two-")
    env = {"RT_TEST_RELAY_BATCH_SIZE": "100"}
    processes.relay("--name", "relay-a", env=env)
    processes.relay("--name", "relay-b", env=env)
    wait_for(lambda: dispatched() == 8000, timeout=120, what="both relays to drain the outbox")
    got = received_ids(broker, expect=8000)
    assert set(got) == set(ids)
    assert max(got.values()) == 1, "a row was published twice"
    wait_for(
        lambda: (
            sum(dict(RelayHeartbeat.objects.values_list("name", "dispatched_total")).values())
            == 8000
        ),
        timeout=10,
        what="heartbeats to count every row",
    )
    shares = dict(RelayHeartbeat.objects.values_list("name", "dispatched_total"))
    assert shares["relay-a"] > 0
    assert shares["relay-b"] > 0


# tests/settings.py has the relay beat every second, and a heartbeat due ends an idle relay's
# wait as a poll does: a row would go out within a second with no notification at all. This
# relay beats and polls once a minute, so only a notification gets a row out within seconds.
QUIET_RELAY = {"RT_TEST_RELAY_POLL_INTERVAL": "60", "RT_TEST_RELAY_HEARTBEAT_INTERVAL": "60"}


@pytest.mark.postgres
def test_a_commit_wakes_the_relay_without_waiting_for_the_poll(
    broker: Broker, processes: ProcessFactory
) -> None:
    processes.relay(env=QUIET_RELAY)
    wait_for(lambda: RelayHeartbeat.objects.exists(), timeout=30, what="the relay to start")
    time.sleep(0.5)
    started = time.monotonic()
    record.delay("wake")
    wait_for(dispatched, timeout=10, interval=0.01, what="the notified relay")
    assert time.monotonic() - started < 2.0


def listening_backends() -> list[int]:
    """Backends of the test database LISTENing for the outbox's notifications, this one aside."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query = %s",
            [f"LISTEN {NOTIFY_CHANNEL}"],
        )
        return [pid for (pid,) in cursor.fetchall()]


def seconds_to_dispatch(name: str) -> float:
    """Commit one task; the seconds until the relay marked its row dispatched."""
    started = time.monotonic()
    task_id = record.delay(name).id
    wait_for(
        lambda: OutboxMessage.objects.filter(task_id=task_id, status="dispatched").exists(),
        timeout=10,
        interval=0.01,
        what=f"{name!r} to be dispatched",
    )
    return time.monotonic() - started


@pytest.mark.postgres
def test_a_relay_whose_listening_connection_is_lost_listens_again(
    broker: Broker, processes: ProcessFactory
) -> None:
    relay = processes.relay(env=QUIET_RELAY)
    [listener] = wait_for(listening_backends, timeout=30, what="the relay to LISTEN")
    assert seconds_to_dispatch("before") < 2.0

    # Only the listening connection goes: the relay's other connection, and the database, stay.
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [listener])
        assert cursor.fetchone() == (True,)
    # Committed as the relay loses its listener: the batch it runs as it reconnects takes it
    # (or, if it listens again first, a notification).
    assert seconds_to_dispatch("unheard") < 5.0
    [again] = wait_for(
        lambda: [pid for pid in listening_backends() if pid != listener],
        timeout=10,
        what="the relay to LISTEN on a new connection",
    )
    wait_for(lambda: listening_backends() == [again], timeout=5, what="one listener, the new one")
    assert "database unavailable" in processes.log_of(relay)

    # That batch is over, and the next poll and heartbeat a minute away: only a notification
    # on the new connection gets these out in time, the second after the first woke the relay.
    assert seconds_to_dispatch("after-1") < 2.0
    assert seconds_to_dispatch("after-2") < 2.0

    assert relay.poll() is None, processes.log_of(relay)
    assert dispatched() == 4
    assert received_ids(broker, expect=4) == dict.fromkeys(
        OutboxMessage.objects.values_list("task_id", flat=True), 1
    ), "a task was lost or published twice"


def test_sigterm_stops_the_relay_cleanly(broker: Broker, processes: ProcessFactory) -> None:
    relay = processes.relay("--name", "relay-term")
    wait_for(
        lambda: RelayHeartbeat.objects.filter(name="relay-term").exists(),
        timeout=30,
        what="the relay to start",
    )
    record.delay("before-term")
    wait_for(dispatched, timeout=10, what="the row to go out")
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(timeout=15) == 0, processes.log_of(relay)
    beat = RelayHeartbeat.objects.get(name="relay-term")
    assert beat.stopped_at is not None
    assert beat.dispatched_total == 1


@pytest.mark.postgres  # on SQLite a relay in every worker is what check W002 warns against
def test_a_worker_can_host_the_relay(broker: Broker, processes: ProcessFactory) -> None:
    worker = processes.worker(env={"RT_TEST_RELAY_IN_WORKER": "1"})
    with transaction.atomic():
        record.delay("hosted")
    wait_for(
        lambda: Effect.objects.filter(key="hosted").exists(),
        timeout=60,
        what="the worker's relay and pool to run it",
    )
    assert RelayHeartbeat.objects.get().name.endswith(":relay")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, processes.log_of(worker)
    assert RelayHeartbeat.objects.get().stopped_at is not None


@contextmanager
def confirms_held_back(queue: str) -> Iterator[None]:
    """RabbitMQ confirms no message routed to ``queue`` until the block ends, and the rest as
    usual: the queue's process is suspended, as a queue on a stalled disk would be. A message
    sent to it meanwhile is enqueued (and confirmed, to whoever still listens) after the block.

    Declaring the queue waits for its process too: declare it before the block.
    """
    lookup = (
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
        "Pid = amqqueue:get_pid(Q)"
    )
    rabbitmqctl("eval", f"{lookup}, sys:suspend(Pid).")
    try:
        yield
    finally:
        rabbitmqctl("eval", f"{lookup}, sys:resume(Pid).")


def test_rows_confirmed_before_a_confirm_timeout_are_marked_and_not_published_again(
    broker: Broker, relay: Relay
) -> None:
    """A broker slow to confirm part of a batch: the relay used to roll the whole claim back
    on the timeout, and publish the rows RabbitMQ had confirmed again after reconnecting (and
    again after each timeout while the broker stayed slow)."""
    # The relay declares each queue once per connection: a first batch declares both.
    record.delay("warm-up")
    routed.delay("warm-up")
    assert relay.run_once() == 2
    assert len(broker.get_all(QUEUE, expect=1)) == len(broker.get_all(ROUTED_QUEUE, expect=1)) == 1
    with transaction.atomic():
        confirmed = [record.delay(f"confirmed-{i}").id for i in range(2)]
        held_back = routed.delay("held back").id  # in the middle: acks come out of order
        confirmed += [record.delay(f"confirmed-{i}").id for i in range(2, 4)]
    with (
        override_settings(RELIABLE_TASKS_RELAY_CONFIRM_TIMEOUT=2.0),
        confirms_held_back(ROUTED_QUEUE),
    ):
        # Times out on one message of five, marks the four confirmed, then reconnects.
        started = timezone.now()
        dispatched_in_time = relay.run_once()
    waiting = list(OutboxMessage.objects.filter(status="pending"))
    # The broker's slowness over, the relay publishes the rest.
    OutboxMessage.objects.filter(status="pending").update(due_at=timezone.now())
    relay.drain(timeout=30)

    # Each confirmed row went out once.
    assert received_ids(broker, expect=len(confirmed)) == dict.fromkeys(confirmed, 1)
    # The held-back message is in its queue once the queue goes on, and the relay published
    # it a second time: at most twice, never lost.
    again = collections.Counter(m.headers["id"] for m in broker.get_all(ROUTED_QUEUE, expect=2))
    assert set(again) == {held_back}
    assert again[held_back] <= 2
    assert dispatched() == 7

    assert dispatched_in_time == 4
    [row] = waiting
    assert row.task_id == held_back
    assert row.last_error == "not confirmed by the broker within 2 s"
    assert row.publish_attempts == 1
    # The publish-retry backoff from the timeout on, as for a nack: at least 0.5 s the first time.
    assert row.due_at >= started + dt.timedelta(seconds=2.5)

    # Until batches are confirmed in time again, they are no larger than what the broker
    # confirmed before the timeout, doubling back to the batch size.
    with transaction.atomic():
        for i in range(6):
            record.delay(f"after-{i}")
    assert relay.run_once() == 4
    assert relay.run_once() == 2
