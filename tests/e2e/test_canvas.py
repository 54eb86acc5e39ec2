"""Chains and callbacks continue through the outbox when a worker runs them."""

from __future__ import annotations

import pytest
from celery import chain

from reliable_tasks.models import IdempotencyKey, OutboxMessage
from tests.support import Broker, ProcessFactory, effects, wait_for
from tests.testapp.tasks import record, replaced, replaced_in_lease_mode

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
