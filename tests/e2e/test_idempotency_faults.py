"""Duplicate deliveries, killed workers and races, with real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from django.db import transaction
from django.utils import timezone

from reliable_tasks.models import IdempotencyKey, OutboxMessage
from reliable_tasks.relay import Relay
from tests.support import QUEUE, Broker, ProcessFactory, wait_for
from tests.testapp.models import Effect, Observed
from tests.testapp.tasks import charge, leased, race, record, two_steps

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def queue_counts(name: str = QUEUE) -> tuple[int, int]:
    """(ready, unacknowledged) messages of a queue, as RabbitMQ counts them."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {name} not found")


def drained() -> bool:
    return queue_counts() == (0, 0)


def republish(relay: Relay, task_id: str, times: int) -> None:
    """Publish the same message again: what a relay killed before marking would do."""
    for _ in range(times):
        OutboxMessage.objects.filter(task_id=task_id).update(status="pending")
        assert relay.drain() == 1


def observed(kind: str) -> list[Observed]:
    return list(Observed.objects.filter(kind=kind).order_by("id"))


@pytest.fixture
def signal_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def workers(processes: ProcessFactory, signal_dir: Path) -> ProcessFactory:
    """The process factory, with workers that leave their 'started' files in signal_dir."""
    original = processes.worker

    def worker(
        *queues: str, concurrency: int = 1, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return original(
            *queues,
            concurrency=concurrency,
            env={"RT_TEST_SIGNAL_DIR": str(signal_dir), **(env or {})},
        )

    processes.worker = worker  # type: ignore[method-assign]
    return processes


def pool_children(worker: subprocess.Popen[bytes]) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_one_message_delivered_five_times_has_one_effect_and_all_are_acknowledged(
    broker: Broker, relay: Relay, workers: ProcessFactory
) -> None:
    task_id = record.delay("five").id
    assert relay.drain() == 1
    republish(relay, task_id, 4)
    assert queue_counts() == (5, 0)
    workers.worker()
    wait_for(lambda: len(observed("duplicate")) == 4, timeout=60, what="four duplicates")
    wait_for(drained, timeout=30, what="every delivery to be acknowledged")
    assert Effect.objects.filter(key="five").count() == 1
    assert [o.result for o in observed("duplicate")] == ["five"] * 4


def test_three_enqueues_of_one_business_key_charge_once(
    broker: Broker, relay: Relay, workers: ProcessFactory
) -> None:
    with transaction.atomic():
        ids = {charge.delay(42, amount=99).id for _ in range(3)}
    assert len(ids) == 3
    relay.drain()
    workers.worker()
    wait_for(lambda: len(observed("duplicate")) == 2, timeout=60, what="two duplicates")
    assert Effect.objects.filter(key="charge:42").count() == 1
    stored = {"order": 42, "charged": 99, "key": "charge:42"}
    assert [o.result for o in observed("duplicate")] == [stored, stored]


def test_a_worker_killed_mid_atomic_task_reruns_it_on_clean_state(
    broker: Broker, relay: Relay, workers: ProcessFactory, signal_dir: Path
) -> None:
    task_id = two_steps.delay("atomic-kill", 3.0).id
    relay.drain()
    worker = workers.worker()
    wait_for(
        lambda: (signal_dir / f"started-atomic-kill-{task_id}").exists(),
        timeout=60,
        what="the task to start",
    )
    [child] = pool_children(worker)
    os.kill(child, signal.SIGKILL)  # the pool process dies mid-task; its part1 was never committed
    wait_for(
        lambda: Effect.objects.filter(key="atomic-kill:part2").exists(),
        timeout=60,
        what="the redelivery to finish",
    )
    wait_for(drained, timeout=30, what="the redelivered message to be acknowledged")
    keys = Counter(Effect.objects.values_list("key", flat=True))
    assert keys == {"atomic-kill:part1": 1, "atomic-kill:part2": 1}
    assert IdempotencyKey.objects.get(key=task_id).attempts == 1, (
        "the killed attempt left no key behind"
    )


def test_a_killed_lease_holder_is_taken_over_after_its_lease(
    broker: Broker, processes: ProcessFactory, workers: ProcessFactory, signal_dir: Path
) -> None:
    processes.relay()  # publishes the deferred duplicate when the lease ends
    first = leased.delay("crash", 30, then=0).id
    worker_a = workers.worker()
    wait_for(
        lambda: (signal_dir / f"started-crash-{first}").exists(),
        timeout=60,
        what="the holder to start",
    )
    workers.worker()  # a second worker, free to take the key over
    for child in pool_children(worker_a):
        os.kill(child, signal.SIGKILL)
    killed_at = time.monotonic()
    held = IdempotencyKey.objects.get(key="lease:crash")
    live_for = (held.lease_expires_at - timezone.now()).total_seconds()
    assert live_for > 0, "the lease must still be live when its holder dies"
    wait_for(
        lambda: Effect.objects.filter(key="lease:crash").exists(), timeout=60, what="the takeover"
    )
    # Nobody ran the key before the dead holder's lease ended.
    assert time.monotonic() - killed_at >= live_for - 0.5
    assert Effect.objects.filter(key="lease:crash").count() == 1
    key = IdempotencyKey.objects.get(key="lease:crash")
    assert key.state == "done"
    assert key.attempts == 2
    assert observed("deferred"), "the redelivery during the live lease should have been deferred"


def test_a_live_lease_defers_a_concurrent_duplicate(
    broker: Broker, processes: ProcessFactory, workers: ProcessFactory
) -> None:
    processes.relay()
    workers.worker(concurrency=2)
    leased.delay("busy", 2)
    wait_for(
        lambda: OutboxMessage.objects.filter(status="dispatched").count() == 1,
        timeout=30,
        what="the first message",
    )
    leased.delay("busy", 2)
    wait_for(
        lambda: observed("duplicate"),
        timeout=60,
        what="the deferred duplicate to find the key done",
    )
    assert Effect.objects.filter(key="lease:busy").count() == 1
    assert [o.key for o in observed("deferred")] == ["lease:busy"]


def test_a_long_task_that_renews_its_lease_is_not_taken_over(
    broker: Broker, processes: ProcessFactory, workers: ProcessFactory
) -> None:
    processes.relay()
    workers.worker(concurrency=2)
    leased.delay("renewing", 10, renew=True)
    time.sleep(7.5)  # past the 6 s lease it would have had without renewal
    leased.delay("renewing", 10, renew=True)
    wait_for(lambda: observed("duplicate"), timeout=60, what="the duplicate to find the key done")
    assert Effect.objects.filter(key="lease:renewing").count() == 1
    assert IdempotencyKey.objects.get(key="lease:renewing").attempts == 1
    assert observed("deferred")


@pytest.mark.postgres
def test_two_workers_racing_on_the_same_keys_run_each_once(
    broker: Broker, relay: Relay, workers: ProcessFactory
) -> None:
    rounds = 30
    with transaction.atomic():
        for i in range(rounds):
            race.delay(f"r{i}", hold=0.1)
            race.delay(f"r{i}", hold=0.1)
    relay.drain()
    workers.worker()
    workers.worker()
    wait_for(lambda: len(observed("duplicate")) == rounds, timeout=120, what="every duplicate")
    counts = Counter(Effect.objects.values_list("key", flat=True))
    assert counts == {f"race:r{i}": 1 for i in range(rounds)}


def test_with_redis_stopped_tasks_still_run_once_and_the_fast_path_returns_after(
    broker: Broker, relay: Relay, workers: ProcessFactory, service_outage: None
) -> None:
    subprocess.run(["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=30)
    wait_for(
        lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).returncode != 0,
        timeout=10,
        what="Redis to stop",
    )
    task_id = record.delay("no-redis").id
    relay.drain()
    republish(relay, task_id, 2)
    worker = workers.worker()
    wait_for(
        lambda: len(observed("duplicate")) == 2,
        timeout=60,
        what="duplicates answered by the database",
    )
    assert Effect.objects.filter(key="no-redis").count() == 1
    assert [o.cached for o in observed("duplicate")] == [False, False]
    subprocess.run(["scripts/ensure-services"], check=True, capture_output=True, timeout=180)
    republish(relay, task_id, 2)
    wait_for(
        lambda: len(observed("duplicate")) == 4, timeout=60, what="duplicates after Redis returned"
    )
    # Redis came back empty: the first duplicate refills it from the database, the next hits
    # it. (A write sent while Redis was down may land once it is back, redis-py retrying it with
    # a backoff: the first duplicate then hits already.)
    assert [o.cached for o in observed("duplicate")][2:] in ([False, True], [True, True])
    assert Effect.objects.filter(key="no-redis").count() == 1
    log = workers.log_of(worker)
    assert log.count("idempotency cache 'default' unavailable") == 1
    assert "idempotency cache 'default' is back" in log
