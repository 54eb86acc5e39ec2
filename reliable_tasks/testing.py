"""Helpers for your own tests: see what the outbox holds and run it inline, with no broker.

In a test with the database (``pytest.mark.django_db``, Django's ``TestCase`` or
``TransactionTestCase``: the helpers read the outbox on the test's own connection)::

    from reliable_tasks import testing

    def test_placing_an_order_sends_a_receipt():
        place_order(...)
        testing.assert_enqueued(send_receipt, args=(order.id,))
        testing.run_enqueued()
        assert Receipt.objects.count() == 1

``run_enqueued`` marks each pending row dispatched and runs it through the task's normal
execution (idempotency key, atomic or lease mode) in this process, until nothing is left.

Done keys are also remembered in the cache (``RELIABLE_TASKS_CACHE_ALIAS``), which a test
database's rollback does not clear: set ``RELIABLE_TASKS_CACHE_ALIAS = None`` in test settings,
or clear the cache between tests, or a business key done in one test is a duplicate in the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from billiard.einfo import (  # type: ignore[attr-defined]  # not in celery-types' stubs
    ExceptionInfo,
    ExceptionWithTraceback,
)
from celery import Task, signature
from celery.app import trace
from celery.exceptions import Retry as CeleryRetry
from celery.utils.nodenames import gethostname
from django.utils import timezone
from kombu import serialization

from .conf import conf
from .dead import decode_body
from .models import OutboxMessage, OutboxStatus
from .relay import get_celery_app
from .task import ReliableTask


@dataclass(frozen=True)
class Enqueued:
    """A pending outbox row, decoded."""

    id: int
    task_name: str
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    queue: str
    due_at: datetime
    embed: dict[str, Any]


def enqueued(task: Task[Any, Any] | str | None = None) -> list[Enqueued]:
    """Pending outbox rows in the order the relay would take them, optionally of one task."""
    rows = (
        OutboxMessage.objects.using(conf.DATABASE)
        .filter(status=OutboxStatus.PENDING)
        .order_by("due_at", "id")
    )
    if task is not None:
        rows = rows.filter(task_name=task if isinstance(task, str) else task.name)
    return [_decode(row) for row in rows]


def assert_enqueued(
    task: Task[Any, Any] | str,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    count: int | None = None,
) -> list[Enqueued]:
    """Assert that ``task`` is pending in the outbox (with these arguments, ``count`` times).

    Returns the matching rows. ``args`` and ``kwargs`` are compared after a JSON round trip,
    as the worker will see them (tuples become lists).
    """
    name = task if isinstance(task, str) else task.name
    found = enqueued(name)
    matching = [
        e
        for e in found
        if (args is None or list(e.args) == _round_trip(list(args)))
        and (kwargs is None or e.kwargs == _round_trip(kwargs))
    ]
    wanted = f"{name}(args={args!r}, kwargs={kwargs!r})"
    if count is None and not matching:
        raise AssertionError(
            f"{wanted} is not in the outbox; pending there: {_describe(enqueued())}"
        )
    if count is not None and len(matching) != count:
        raise AssertionError(
            f"{wanted} is in the outbox {len(matching)} times, not {count}; pending: {_describe(found)}"
        )
    return matching


def run_enqueued(*, include_future: bool = True, max_tasks: int = 1000) -> list[Any]:
    """Run pending outbox rows inline until none is left; return their results in order.

    Tasks that enqueue more tasks (chains, callbacks, your own ``delay()`` calls) have those
    run too. A failed attempt's retry runs at once, without its backoff, until the retry policy
    gives up; then the task's error is raised. Rows due later run as well unless ``include_future`` is False. A task that
    fails raises here, as a test would want. ``max_tasks`` stops a task that keeps
    enqueueing itself.
    """
    app = get_celery_app()
    results: list[Any] = []
    ran = 0
    while True:
        pending = enqueued()
        if not include_future:
            now = timezone.now()
            pending = [e for e in pending if e.due_at <= now]
        if not pending:
            return results
        for entry in pending:
            if ran >= max_tasks:
                raise AssertionError(
                    f"run_enqueued ran {max_tasks} tasks and the outbox is not empty yet"
                )
            ran += 1
            OutboxMessage.objects.using(conf.DATABASE).filter(pk=entry.id).update(
                status=OutboxStatus.DISPATCHED, dispatched_at=timezone.now()
            )
            task = app.tasks[entry.task_name]
            try:
                if isinstance(task, ReliableTask):
                    result = _run(task, entry)
                else:  # a plain task's dead message, requeued: Celery's own eager call
                    result = task.apply(
                        entry.args, entry.kwargs, task_id=entry.task_id, headers=entry.headers,
                        throw=True, retries=entry.headers.get("retries") or 0,
                        link=entry.embed.get("callbacks"), link_error=entry.embed.get("errbacks"),
                    ).result  # fmt: skip
                    _continue_chain(entry, result)
            except CeleryRetry:
                # The next attempt is in the outbox already; this loop runs it without waiting.
                continue
            results.append(result)


def _continue_chain(entry: Enqueued, result: Any) -> None:
    """Enqueue a plain task's next chain step, as a worker does after the step succeeds."""
    steps = entry.embed.get("chain")
    if steps:
        following = signature(steps[-1], app=get_celery_app())
        following.apply_async((result,), chain=steps[:-1])


def _run(task: Task[Any, Any], entry: Enqueued) -> Any:
    """Run one row in this process as a worker runs its message: Celery's tracer, with the
    request a worker makes of it, the chain's remaining steps included (``Task.apply()`` leaves
    them out, so a retry would lose them and a duplicate would still continue the chain).
    Raises the task's error, or Celery's ``Retry`` for a retry written to the outbox; a task
    that ended with ``Ignore`` or ``Reject`` (which the tracer returns) gives that, as
    ``Task.apply()`` does."""
    headers = entry.headers
    request = {
        "id": entry.task_id, "task": task.name, "retries": headers.get("retries") or 0,
        "parent_id": headers.get("parent_id"), "root_id": headers.get("root_id"),
        "is_eager": True, "hostname": gethostname(),
        "callbacks": entry.embed.get("callbacks"), "errbacks": entry.embed.get("errbacks"),
        "chain": entry.embed.get("chain"),
        "headers": headers, "timelimit": headers.get("timelimit"),
        "ignore_result": headers.get("ignore_result", task.ignore_result),
        "delivery_info": {"is_eager": True, "exchange": "", "routing_key": entry.queue},
    }  # fmt: skip
    # Looked up as it is called, as Task.apply() does: tracing tools (sentry-sdk) replace it.
    tracer = trace.build_tracer(task.name, task, eager=True, propagate=True, app=task.app)
    outcome = tracer(entry.task_id, list(entry.args), entry.kwargs, request)
    retval = outcome.retval
    if isinstance(retval, ExceptionInfo):  # Ignore and Reject, which the tracer does not raise
        retval = retval.exception
        if isinstance(retval, ExceptionWithTraceback):
            retval = retval.exc
    return retval


def _decode(row: OutboxMessage) -> Enqueued:
    args, kwargs, embed = decode_body(row.body, row.content_type, row.content_encoding)
    return Enqueued(
        id=row.id, task_name=row.task_name, task_id=row.task_id, args=tuple(args), kwargs=kwargs,
        headers=row.headers, queue=row.queue, due_at=row.due_at, embed=embed or {},
    )  # fmt: skip


def _round_trip(value: Any) -> Any:
    content_type, encoding, data = serialization.dumps(value, serializer="json")
    return serialization.loads(data, content_type, encoding, accept=[content_type])


def _describe(entries: list[Enqueued]) -> str:
    if not entries:
        return "nothing"
    return ", ".join(f"{e.task_name}(args={list(e.args)!r}, kwargs={e.kwargs!r})" for e in entries)
