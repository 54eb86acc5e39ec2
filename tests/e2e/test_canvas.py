"""Chains and callbacks continue through the outbox when a worker runs them."""

from __future__ import annotations

import pytest
from celery import chain, chord
from django_celery_results.models import TaskResult

from reliable_tasks.models import IdempotencyKey, OutboxMessage
from reliable_tasks.relay import Relay
from tests.celery_app import app
from tests.support import QUEUE, Broker, ProcessFactory, effects, wait_for
from tests.testapp.models import Effect, Observed
from tests.testapp.tasks import (
    collect,
    dies_after_its_commit,
    record,
    replaced,
    replaced_in_lease_mode,
    routed,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_a_chain_and_a_link_callback_run_every_step_through_the_outbox(
    broker: Broker, processes: ProcessFactory
) -> None:
    processes.relay()
    processes.worker()
    chain(record.si("step-1"), record.si("step-2"), record.si("step-3")).delay()
    record.apply_async(("parent",), link=record.si("callback"))
    wait_for(lambda: len(effects()) == 5, timeout=60, what="every step and the callback")
    assert sorted(effects()) == ["callback", "parent", "step-1", "step-2", "step-3"]
    # Each step after the first was enqueued by the worker, through the outbox.
    assert OutboxMessage.objects.count() == 5


def test_a_task_replaced_with_celery_replace_hands_over_in_atomic_and_in_lease_mode(
    broker: Broker, processes: ProcessFactory
) -> None:
    """replace() enqueues the replacement, then ends the task with Ignore: the replacement's
    outbox row and the task's writes stand, and the task's key is done."""
    processes.relay()
    processes.worker()
    first = replaced.delay("atomic")
    second = replaced_in_lease_mode.delay("lease")
    expected = ["atomic:before", "atomic:replacement", "lease:before", "lease:replacement"]
    wait_for(lambda: sorted(effects()) == expected, timeout=60, what="both replacements")
    names = [replaced.name, replaced_in_lease_mode.name]
    done = IdempotencyKey.objects.filter(task_name__in=names, state="done")
    assert sorted(done.values_list("key", flat=True)) == sorted([first.id, second.id])
    # The replacement runs under the replaced task's id, as Celery freezes it, as a task of
    # its own name: its own key.
    assert IdempotencyKey.objects.filter(task_name=record.name, key=first.id).exists()


@pytest.fixture
def database_results(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """django-celery-results' backend, here (where a chord is applied, it writes the count of
    members to wait for) and in the workers started with the environment it returns."""
    from django_celery_results.backends.database import DatabaseBackend

    # Celery keeps the backend it made from its settings; this process's settings have none.
    monkeypatch.setattr(app, "_backend_cache", DatabaseBackend(app=app, url="django-db"))
    return {"RT_TEST_RESULT_BACKEND": "django-db"}


def test_a_chord_runs_its_body_once_when_a_member_is_delivered_twice(
    broker: Broker, relay: Relay, processes: ProcessFactory, database_results: dict[str, str]
) -> None:
    """The result backend counts the chord's members down as each one finishes. A duplicate of
    a member that finished must not count again: with a member still to run the count would
    reach zero, and django-celery-results would drop the chord, its body never run."""
    # The last member waits in a queue of its own until the duplicate has been delivered.
    chord([record.si("a"), record.si("b"), routed.si("c")])(collect.s("chord"))
    assert relay.drain() == 3
    processes.worker(env=database_results)
    wait_for(lambda: sorted(effects()) == ["a", "b"], timeout=60, what="the first two members")
    first = Effect.objects.get(key="a").task_id
    wait_for(
        lambda: TaskResult.objects.filter(task_id=first, status="SUCCESS").exists(),
        timeout=30,
        what="the first member's result",
    )
    # The first member's message again, as a relay that died before marking its row sends it.
    OutboxMessage.objects.filter(task_id=first).update(status="pending")
    assert relay.drain() == 1
    wait_for(
        lambda: Observed.objects.filter(kind="duplicate").exists(),
        timeout=60,
        what="the duplicate to be answered",
    )
    processes.worker(QUEUE + ".routed", env=database_results)
    # The body is enqueued by the worker that ran the last member, through the outbox.
    wait_for(lambda: relay.drain() >= 0 and bool(effects("chord")), timeout=60, what="the body")
    assert effects("chord") == ["chord:a,b,c"]
    assert sorted(effects()) == ["a", "b", "c", "chord:a,b,c"]


def test_a_chord_member_whose_worker_died_after_its_commit_counts_once_on_its_redelivery(
    broker: Broker, relay: Relay, processes: ProcessFactory, database_results: dict[str, str]
) -> None:
    """The first delivery committed, then its worker died before Celery counted it: the
    redelivery is a duplicate, and the one delivery that counts."""
    chord([dies_after_its_commit.si("a"), record.si("b")])(collect.s("chord"))
    assert relay.drain() == 2
    processes.worker(env=database_results)
    wait_for(lambda: relay.drain() >= 0 and bool(effects("chord")), timeout=60, what="the body")
    assert Observed.objects.filter(kind="duplicate").count() == 1
    assert sorted(effects()) == ["a", "b", "chord:a,b"]
