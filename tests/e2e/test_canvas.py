"""Chains and callbacks continue through the outbox when a worker runs them."""

from __future__ import annotations

import pytest
from celery import chain

from reliable_tasks.models import OutboxMessage
from tests.support import Broker, ProcessFactory, effects, wait_for
from tests.testapp.tasks import record

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
