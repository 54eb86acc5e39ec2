"""Celery worker bootsteps: capture the messages Celery would discard, host a relay.

Install both in your Celery module, beside the app::

    import reliable_tasks.worker

    reliable_tasks.worker.install(app)

``DeadLetterStep`` turns a message that names no registered task, has no task header, or
cannot be decoded into a dead task (with the raw message) instead of Celery's "discarded".
``RelayStep`` runs a relay thread in each worker when ``RELIABLE_TASKS_RELAY_IN_WORKER`` is
True (small deployments; on PostgreSQL several such relays share the outbox safely). This
module imports no models, so the Celery module may import it before Django is set up.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from celery import bootsteps
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from celery.worker.request import Request

if TYPE_CHECKING:
    from .relay import Relay

logger = logging.getLogger("reliable_tasks.worker")

# A message that cannot be stored as a dead task while the database is down goes back to the
# queue after this pause, rather than being discarded.
DATABASE_DOWN_PAUSE = 1.0


class ReliableRequest(Request):
    """A reliable task's request in the worker: a hard time limit puts the message back.

    Celery, past a task's hard time limit, reports it failed (the result backend's FAILURE, a
    chord's part counted, the chain failed, ``link_error`` callbacks, ``task_failure``), then
    ends its process and, with ``acks_on_timeout = False``, puts the message back: the task
    would run again after everything was told it failed. Here the message only goes back, with
    the execution marked as started and not ended (the SIGTERM before the SIGKILL lets it clear
    its own mark): the redelivery counts the kill as a lost delivery, and a task that always
    runs over its limit ends as a dead task.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        # A body of three items that are not [args, kwargs, embed] passes Celery's consumer and
        # fails in the pool, where Celery reports the task failed and acknowledges the message:
        # refused here instead, the consumer hands it to DeadLetterStep, a dead task.
        this = cast(Any, self)  # Celery's Request keeps these without type hints
        payload = this._body if this._decoded else message.payload
        embed = payload[2] if isinstance(payload, list | tuple) and len(payload) == 3 else None
        args, kwargs = this._args, this._kwargs
        if not (
            isinstance(args, list | tuple)
            and isinstance(kwargs, dict)
            and (embed is None or isinstance(embed, dict))
        ):
            raise InvalidTaskError(
                "the body is no [args, kwargs, embed] task message: args is a "
                f"{type(args).__name__}, kwargs a {type(kwargs).__name__}, embed a "
                f"{type(embed).__name__}"
            )

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft or worker_state.should_terminate:
            super().on_timeout(soft, timeout)
            return
        from .ledger import done_cache

        done_cache.mark_lost(self.id)
        worker_state.task_ready(self)
        logger.error(
            "Hard time limit (%ss) exceeded for %s[%s]; its process is ended and the message "
            "goes back to the queue",
            timeout, self.name, self.id,
        )  # fmt: skip
        self.reject(requeue=True)


def install(app: Any) -> None:
    """Add reliable_tasks' bootsteps to a Celery app's workers."""
    app.steps["worker"].add(RelayStep)
    app.steps["consumer"].add(DeadLetterStep)


class RelayStep(bootsteps.StartStopStep):
    """Runs ``Relay.run()`` in a thread for the worker's lifetime when the setting says so."""

    label = "reliable_tasks relay"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.relay: Relay | None = None
        self.thread: threading.Thread | None = None

    def include_if(self, worker: Any) -> bool:
        from .conf import conf

        return bool(conf.RELAY_IN_WORKER)

    def start(self, worker: Any) -> None:
        from .relay import Relay

        self.relay = Relay(app=worker.app, name=f"{worker.hostname}:relay")
        self.thread = threading.Thread(target=self._run, name="reliable_tasks-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from django.db import connections

        assert self.relay is not None
        try:
            self.relay.run()
        except Exception:
            logger.exception(
                "the relay thread of this worker died; committed tasks wait for another relay"
            )
        finally:
            connections.close_all()

    def stop(self, worker: Any) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)

    shutdown = stop


class DeadLetterStep(bootsteps.StartStopStep):
    """Keeps what Celery's consumer would discard: each such message becomes a dead task.

    Celery logs and drops a message for an unknown task, one without a task header, and one it
    cannot decode. This step wraps the consumer's handlers for those cases: the message is
    stored first (with its raw body), and only then acknowledged or rejected as before.
    """

    label = "reliable_tasks dead letters"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        # The task handler reads these attributes when the consumer starts: patch them now.
        unknown_message, unknown_task = c.on_unknown_message, c.on_unknown_task
        invalid_task, decode_error = c.on_invalid_task, c.on_decode_error

        def on_unknown_message(body: Any, message: Any) -> None:
            if _keep(
                message,
                "undecodable",
                "the message has no task header: it is no Celery task message",
            ):
                unknown_message(body, message)

        def on_unknown_task(body: Any, message: Any, exc: BaseException) -> None:
            name = (message.headers or {}).get("task")
            if _keep(
                message,
                "unregistered",
                f"no task named {name!r} is registered in this worker ({exc!r})",
            ):
                unknown_task(body, message, exc)

        def on_invalid_task(body: Any, message: Any, exc: BaseException) -> None:
            if _keep(message, "undecodable", f"the message is not a valid task message: {exc!r}"):
                invalid_task(body, message, exc)

        def on_decode_error(message: Any, exc: BaseException) -> None:
            if _keep(message, "undecodable", f"the body cannot be decoded: {exc!r}"):
                decode_error(message, exc)

        c.on_unknown_message = on_unknown_message
        c.on_unknown_task = on_unknown_task
        c.on_invalid_task = on_invalid_task
        c.on_decode_error = on_decode_error

        # Celery's task handler sends only some malformed messages to the handlers above: a
        # body that is JSON but no task message (null, an object, a list of two), a task header
        # that is a list, raise out of it, and the consumer stops the worker ("Unrecoverable
        # error") with the message unacknowledged, for the next worker to die on in turn.
        create_task_handler = c.create_task_handler
        transport_errors = tuple(c.connection_errors) + tuple(c.channel_errors)

        def create_guarded_task_handler(*args: Any, **kwargs: Any) -> Any:
            handler = create_task_handler(*args, **kwargs)

            def on_task_received(message: Any) -> Any:
                try:
                    return handler(message)
                except transport_errors:
                    raise
                except Exception as exc:
                    if message.acknowledged:
                        # Celery settled it (kept by a handler above, then a result backend
                        # failed, say): nothing of it is left to keep.
                        logger.exception("error after the message was settled; worker goes on")
                        return None
                    if _keep(message, "undecodable", f"the message is no task message: {exc!r}"):
                        message.ack_log_error(logger, transport_errors)
                    return None

            return on_task_received

        c.create_task_handler = create_guarded_task_handler


def _keep(message: Any, reason: str, error: str) -> bool:
    """Store ``message`` as a dead task; False (and the message requeued) if that failed."""
    from django.db import Error, close_old_connections

    from . import dead

    info = message.delivery_info or {}
    raw = dead.RawMessage(
        headers=dict(message.headers or {}),
        properties={
            k: v for k, v in (message.properties or {}).items() if k != "application_headers"
        },
        body=message.body,
        content_type=message.content_type or "",
        content_encoding=message.content_encoding or "",
        exchange=str(info.get("exchange") or ""),
        routing_key=str(info.get("routing_key") or ""),
    )
    # This runs in the consumer's own process, whose connection Celery's Django fixup never
    # checks or closes (it does so around tasks, in the pool). As around a web request: one the
    # database dropped, or past CONN_MAX_AGE, is closed here, and the capture connects afresh.
    close_old_connections()
    try:
        dead.capture_raw(raw, reason=reason, error=error, queue=str(info.get("routing_key") or ""))
    except Error:  # DatabaseError, or InterfaceError for a connection already closed
        logger.exception(
            "could not store a %s message as a dead task; it goes back to the queue", reason
        )
        time.sleep(DATABASE_DOWN_PAUSE)
        message.reject(requeue=True)
        return False
    finally:
        close_old_connections()
    return True
