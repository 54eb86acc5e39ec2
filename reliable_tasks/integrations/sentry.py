"""Sentry integration: dead tasks as events with stable fingerprints, retries as breadcrumbs.

Connected in ``AppConfig.ready()``; it does nothing without sentry-sdk (the ``sentry`` extra)
or without a configured client, and each handler first asks whether a client is active.

Trace context: sentry-sdk's ``CeleryIntegration`` wraps Celery's ``Task.apply_async`` and
``Celery.send_task`` to add ``sentry-trace`` and ``baggage`` headers; ``ReliableTask.apply_async``
builds its message through that same ``Task.apply_async`` (with a capturing producer), so the
headers are stored in the outbox row. With tracing on, the relay publishes each such row in a
``queue.publish`` transaction of its own, the producer's span its parent (``Publishing``), and
the message carries the relay's span on, so the task's transaction is its child: producer,
relay and task in one trace.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from reliable_tasks import signals
from reliable_tasks.dead import qualname

#: The oldest sentry-sdk the integration is tested with (the ``sentry`` extra's floor).
MINIMUM_SENTRY_SDK = "2.12"
#: Why an installed sentry-sdk cannot be used (it lacks what the integration imports), or "".
UNUSABLE_SENTRY_SDK = ""

try:
    import sentry_sdk
except ImportError:  # the "sentry" extra is not installed: connect() does nothing
    HAVE_SENTRY = False
else:
    try:
        from sentry_sdk.integrations.logging import ignore_logger
        from sentry_sdk.tracing import BAGGAGE_HEADER_NAME, SENTRY_TRACE_HEADER_NAME, Transaction
        from sentry_sdk.tracing_utils import PropagationContext, has_tracing_enabled
        from sentry_sdk.utils import event_from_exception
    except ImportError as exc:  # an older sentry-sdk: said by check W008 and a log line
        HAVE_SENTRY = False
        UNUSABLE_SENTRY_SDK = (
            f"sentry-sdk {getattr(sentry_sdk, 'VERSION', '')} is installed, but {exc}"
        )
    else:
        HAVE_SENTRY = True

if TYPE_CHECKING:
    from reliable_tasks.models import DeadTask
    from reliable_tasks.relay import BatchOutcome, Row

logger = logging.getLogger("reliable_tasks.sentry")

#: Breadcrumb category and prefix of tag names.
CATEGORY = "reliable_tasks"
#: Name of the event context that describes the dead task.
CONTEXT = "reliable_tasks"
#: Attempts listed in the context (newest last); a dead task may have many.
MAX_ATTEMPTS_SHOWN = 10
#: Sentry cuts tag values at 200 characters.
MAX_TAG = 200
#: The logger that announces each dead task; its ERROR record would be a second event.
DEAD_LOGGER = "reliable_tasks.dead"

_UID = "reliable_tasks.integrations.sentry"


def connect() -> None:
    """Connect the signal handlers when sentry-sdk is installed (calling it again is harmless)."""
    if UNUSABLE_SENTRY_SDK:
        # Workers run no system checks: they say it here, once per process.
        logger.warning("%s", unusable_message())
    if not HAVE_SENTRY:
        return
    # The event of a dead task is sent here, with its fingerprint; sentry-sdk's logging
    # integration would turn the same ERROR log line into another event, grouped by the
    # log template, so one issue would hold every kind of dead task.
    ignore_logger(DEAD_LOGGER)
    signals.task_dead.connect(_dead, dispatch_uid=f"{_UID}.dead")
    signals.task_retried.connect(_retried, dispatch_uid=f"{_UID}.retried")
    signals.task_deferred.connect(_deferred, dispatch_uid=f"{_UID}.deferred")
    signals.task_duplicate.connect(_duplicate, dispatch_uid=f"{_UID}.duplicate")
    signals.task_requeued.connect(_requeued, dispatch_uid=f"{_UID}.requeued")


def unusable_message() -> str:
    """What is wrong with the installed sentry-sdk, when it is too old to use."""
    return (
        f"{UNUSABLE_SENTRY_SDK}: reliable_tasks' Sentry integration needs sentry-sdk "
        f"{MINIMUM_SENTRY_SDK} or later and is off, so dead tasks are not reported to Sentry"
    )


# -- handlers ------------------------------------------------------------------------------------
# Each one returns at once when no client is active, and never raises: a report that fails
# must not change what happens to the task.


def _dead(sender: Any, dead_task: DeadTask, exc: BaseException | None = None, **_: Any) -> None:
    if not sentry_sdk.get_client().is_active():
        return
    try:
        report_dead_task(dead_task, exc if exc is not None else _exception_in_hand(dead_task))
    except Exception:  # reporting must never break the task's failure path
        logger.exception("could not report dead task %s to Sentry", dead_task.pk)


def _retried(
    sender: Any, task: Any, task_id: str, attempt: int, delay: float, exc: BaseException, **_: Any
) -> None:
    if not sentry_sdk.get_client().is_active():
        return
    _breadcrumb(
        f"{task.name}: attempt {attempt} failed ({type(exc).__name__}), retry in {delay:.2f} s",
        level="warning",
        task=task.name, task_id=task_id, attempt=attempt, delay=delay, exception=qualname(exc),
    )  # fmt: skip


def _deferred(sender: Any, task: Any, key: str, delay: float, **_: Any) -> None:
    if not sentry_sdk.get_client().is_active():
        return
    _breadcrumb(
        f"{task.name}: key held by another execution, deferred {delay:.2f} s",
        task=task.name, idempotency_key=key, delay=delay,
    )  # fmt: skip


def _duplicate(sender: Any, task: Any, key: str, cached: bool, **_: Any) -> None:
    if not sentry_sdk.get_client().is_active():
        return
    _breadcrumb(
        f"{task.name}: key done already, stored result returned",
        task=task.name, idempotency_key=key, cached=cached,
    )  # fmt: skip


def _requeued(sender: Any, dead_task: DeadTask, outbox_id: int, user: str = "", **_: Any) -> None:
    if not sentry_sdk.get_client().is_active():
        return
    _breadcrumb(
        f"dead task {dead_task.pk} ({dead_task.task_name}) requeued",
        dead_task_id=dead_task.pk, outbox_id=outbox_id, user=user,
    )  # fmt: skip


# -- the dead-task event -------------------------------------------------------------------------


def report_dead_task(dead_task: DeadTask, exc: BaseException | None = None) -> str | None:
    """Send one Sentry event for a dead task; return its event id (None if nothing was sent).

    The fingerprint is the task name and the exception class (the reason when there is no
    exception), so every dead task of one failure is one Sentry issue. Arguments are included
    only when the client allows it (``data_collection={"queues": True}``, or
    ``send_default_pii`` when ``data_collection`` is not set); otherwise the stack trace goes
    without its frames' local variables, where the arguments are too. With ``exc`` (the last
    attempt's exception) the event carries its stack trace; the stored traceback text of the
    last attempt is in the ``reliable_tasks`` context either way.
    """
    client = sentry_sdk.get_client()
    task_name = dead_task.task_name or "(unknown task)"
    with_arguments = _sends_arguments(client)
    with sentry_sdk.new_scope() as scope:
        scope.set_level("error")
        scope.fingerprint = [task_name, dead_task.exc_type or dead_task.reason]
        for name, value in _tags(dead_task, task_name).items():
            scope.set_tag(f"{CATEGORY}.{name}", value)
        scope.set_context(CONTEXT, _context(dead_task, with_arguments))
        if exc is not None:
            event, hint = event_from_exception(
                exc,
                client_options=client.options,
                mechanism={"type": "reliable_tasks", "handled": False},
            )
            if not with_arguments:
                # The task's frames hold its arguments as local variables: not sent either.
                for raised in event.get("exception", {}).get("values", []):
                    for frame in (raised.get("stacktrace") or {}).get("frames", []):
                        frame.pop("vars", None)
            return sentry_sdk.capture_event(event, hint=hint)
        message = f"dead task {task_name}: {dead_task.get_reason_display()}"
        if dead_task.exc_type:
            message += f": {dead_task.exc_type}"
        trace = _message_trace(dead_task)
        if trace is not None:
            scope.set_context("trace", trace)
        return sentry_sdk.capture_message(message, level="error")


def _tags(dead_task: DeadTask, task_name: str) -> dict[str, str]:
    tags = {
        "task": task_name,
        "reason": dead_task.reason,
        "attempts": str(dead_task.attempt_count),
        "dead_task_id": str(dead_task.pk),
    }
    if dead_task.idempotency_key:
        tags["idempotency_key"] = dead_task.idempotency_key
    if dead_task.task_id:
        tags["task_id"] = dead_task.task_id
    if dead_task.queue:
        tags["queue"] = dead_task.queue
    return {name: value[:MAX_TAG] for name, value in tags.items()}


def _context(dead_task: DeadTask, with_arguments: bool) -> dict[str, Any]:
    attempts = list(dead_task.attempts or [])
    last_traceback = next((a["traceback"] for a in reversed(attempts) if a.get("traceback")), "")
    context: dict[str, Any] = {
        "dead_task_id": dead_task.pk,
        "task_id": dead_task.task_id,
        "task_name": dead_task.task_name,
        "reason": dead_task.get_reason_display(),
        "idempotency_key": dead_task.idempotency_key,
        "queue": dead_task.queue,
        "exc_type": dead_task.exc_type,
        "exc_message": dead_task.exc_message,
        "attempt_count": dead_task.attempt_count,
        "first_failed_at": _iso(dead_task.first_failed_at),
        "last_failed_at": _iso(dead_task.last_failed_at),
        "last_traceback": last_traceback,
        "attempts": [
            {k: v for k, v in a.items() if k != "traceback"} for a in attempts[-MAX_ATTEMPTS_SHOWN:]
        ],
    }
    if with_arguments:
        context["args"] = dead_task.args
        context["kwargs"] = dead_task.kwargs
    return context


def _sends_arguments(client: Any) -> bool:
    """Whether task arguments may be sent, as sentry-sdk's Celery integration decides it."""
    data_collection = client.options.get("data_collection")
    if data_collection and data_collection.get("provided_by_user"):
        # sentry-sdk 2.x's newer option; it takes precedence over send_default_pii.
        return bool(data_collection.get("queues"))
    return bool(client.should_send_default_pii())


def _message_trace(dead_task: DeadTask) -> dict[str, Any] | None:
    """The producer's trace, from the message, for a dead task found outside a traced execution.

    A message for an unknown task, or one that cannot be decoded, becomes a dead task in the
    worker's consumer, where no transaction runs (an orphan span may: Django's integration
    wraps signal receivers in spans). Inside a task's execution the trace is already the
    producer's, continued by the Celery integration.
    """
    span = sentry_sdk.get_current_span()
    if span is not None and span.containing_transaction is not None:
        return None
    if not isinstance(dead_task.headers, dict) or not dead_task.headers.get("sentry-trace"):
        return None
    context = PropagationContext.from_incoming_data(dead_task.headers)
    return {
        "trace_id": context.trace_id,
        "span_id": context.span_id,
        "parent_span_id": context.parent_span_id,
    }


def _exception_in_hand(dead_task: DeadTask) -> BaseException | None:
    """The exception being handled, if it is the one that made this task dead.

    ``task_dead`` is sent when the dead task's transaction commits, which on a worker is
    still inside the ``except`` block that caught the last attempt's exception.
    """
    exc = sys.exc_info()[1]
    if exc is not None and dead_task.exc_type and qualname(exc) == dead_task.exc_type:
        return exc
    return None


def _iso(value: Any) -> str:
    # A dead task fresh from ``dead.capture`` may hold the ISO text it was created from.
    return value if isinstance(value, str) else str(value.isoformat())


def _breadcrumb(message: str, *, level: str = "info", **data: Any) -> None:
    sentry_sdk.add_breadcrumb(category=CATEGORY, message=message, level=level, data=data)


# -- the relay in the trace ----------------------------------------------------------------------


def publishing(rows: Sequence[Row]) -> Publishing | None:
    """The relay's transactions for a batch, or None when no client traces (the usual case,
    at the cost of one check per batch)."""
    if not HAVE_SENTRY:
        return None
    client = sentry_sdk.get_client()
    if not client.is_active() or not has_tracing_enabled(client.options):
        return None
    return Publishing(rows)


class Publishing:
    """One ``queue.publish`` transaction per row that carries a producer's trace.

    Each continues the producer's trace (its parent is the producer's ``queue.submit.celery``
    span, and it keeps the producer's sampling decision), and the row's message is published
    with the transaction's own ``sentry-trace`` and ``baggage``, at the top of the headers and
    in the nested ``headers`` the Celery integration reads on the worker. ``rows`` are the rows
    to publish in their place. ``finish()`` ends each transaction as the broker answered.
    """

    OP = "queue.publish"
    ORIGIN = "auto.queue.reliable_tasks"

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows: list[Row] = []
        self.transactions: dict[int, Any] = {}
        for row in rows:
            try:
                self.rows.append(self._traced(row))
            except Exception:  # tracing must never keep a row from the broker
                logger.debug("row %d published without a relay span", row.id, exc_info=True)
                self.rows.append(row)

    def _traced(self, row: Row) -> Row:
        headers = row.header_dict()
        inner = headers.get("headers")
        inner = inner if isinstance(inner, dict) else {}
        parent = inner.get(SENTRY_TRACE_HEADER_NAME) or headers.get(SENTRY_TRACE_HEADER_NAME)
        if not parent:
            return row
        incoming = {
            SENTRY_TRACE_HEADER_NAME: parent,
            BAGGAGE_HEADER_NAME: inner.get(BAGGAGE_HEADER_NAME)
            or headers.get(BAGGAGE_HEADER_NAME)
            or "",
        }
        # An isolation scope of its own: the relay's scope keeps no trace of any one row.
        with sentry_sdk.isolation_scope():
            continued = sentry_sdk.continue_trace(
                incoming, op=self.OP, name=row.task_name, source="task", origin=self.ORIGIN
            )
            transaction: Any = sentry_sdk.start_transaction(continued)
            if not isinstance(transaction, Transaction):
                # Another tracing setup (OpenTelemetry, streamed spans) gives no transaction to
                # hand on: the producer's headers go out as they are.
                return row
            # Entered as a context manager is, so that ending it also ends what sentry-sdk
            # started with it (a continuous profile, in "trace" lifecycle).
            transaction.__enter__()
        transaction.set_data("messaging.message.id", row.task_id)
        transaction.set_data("messaging.destination.name", row.routing_key or row.queue)
        transaction.set_data("reliable_tasks.outbox_id", row.id)
        transaction.set_data("messaging.message.retry.count", row.publish_attempts)
        carried = {SENTRY_TRACE_HEADER_NAME: transaction.to_traceparent()}
        baggage = transaction.to_baggage()
        if baggage is not None:
            carried[BAGGAGE_HEADER_NAME] = baggage.serialize()
        self.transactions[row.id] = transaction
        return replace(
            row, headers={**headers, **carried, "headers": {**inner, **carried}}, header_table=None
        )

    def finish(self, outcome: BatchOutcome | None, error: str = "") -> None:
        """End each transaction: ok when the broker confirmed its row, an error otherwise.
        Once only: a second call does nothing."""
        transactions, self.transactions = self.transactions, {}
        confirmed = set(outcome.confirmed) if outcome is not None else set()
        for row_id, transaction in transactions.items():
            try:
                if row_id in confirmed:
                    transaction.set_status("ok")
                else:
                    reason = outcome.failed.get(row_id, "") if outcome is not None else error
                    transaction.set_status("internal_error")
                    transaction.set_data("reliable_tasks.not_published", reason or "unknown")
                transaction.__exit__(None, None, None)
            except Exception:  # a report that fails changes nothing
                logger.debug("relay span of row %d not sent", row_id, exc_info=True)
