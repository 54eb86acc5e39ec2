"""The same task three ways: reliable, stock Celery confirmed, stock Celery unconfirmed.

Nothing executes them (no worker runs in the benchmark); what is measured is how they are
enqueued and published.
"""

from __future__ import annotations

from celery.contrib.django.task import DjangoTask

from benchmarks.celery_app import app, unconfirmed_app
from benchmarks.settings import CELERY_QUEUE
from reliable_tasks import ReliableTask


def _fulfil(order_id: int) -> int:
    return order_id


fulfil_order = app.task(base=ReliableTask, name="bench.fulfil_order")(_fulfil)
plain_fulfil_order = app.task(base=DjangoTask, name="bench.plain_fulfil_order", queue=CELERY_QUEUE)(
    _fulfil
)
unconfirmed_fulfil_order = unconfirmed_app.task(
    base=DjangoTask, name="bench.unconfirmed_fulfil_order", queue=CELERY_QUEUE
)(_fulfil)


# The worker benchmark: a task whose effect is one row, as a reliable task (atomic mode) and as
# a stock Celery task with acks_late, each on a queue of its own.
def _insert_order(number: int) -> int:
    from benchmarks.benchapp.models import Order

    Order.objects.create(customer=f"worker-{number}", amount_cents=number)
    return number


insert_order = app.task(
    base=ReliableTask, name="bench.insert_order", queue=CELERY_QUEUE + ".worker-reliable"
)(_insert_order)
plain_insert_order = app.task(
    base=DjangoTask,
    name="bench.plain_insert_order",
    acks_late=True,
    queue=CELERY_QUEUE + ".worker-plain",
)(_insert_order)
