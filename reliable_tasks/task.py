"""``ReliableTask``, the Celery base class, and the ``@reliable_task`` decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from celery.result import AsyncResult

from . import outbox


class ReliableTask(Task):  # type: ignore[misc]  # celery-types leaves Task's base untyped
    """A Celery task whose ``apply_async`` writes to the outbox instead of the broker.

    The message is published by a relay once the caller's transaction commits. On the worker
    the message is acknowledged only after the task ran, and redelivered if the worker dies.
    """

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    serializer = outbox.SERIALIZER

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Write the task to the outbox in the current transaction; return its result handle.

        Takes the same arguments as Celery's ``apply_async``. ``producer`` is ignored: the relay
        publishes. With ``task_always_eager`` the task runs inline, as Celery does.
        """
        if self.app.conf.task_always_eager:
            return super().apply_async(
                args, kwargs, task_id=task_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **options,
            )  # fmt: skip
        capture = outbox.CapturingProducer(self.name)
        result: AsyncResult = super().apply_async(
            args, kwargs, task_id=task_id, producer=capture, link=link,
            link_error=link_error, shadow=shadow, **options,
        )  # fmt: skip
        assert capture.message is not None, "Celery's send_task published nothing"
        outbox.write(capture.message)
        return result


def reliable_task(*args: Any, **options: Any) -> Any:
    """Declare a reliable task: ``@shared_task(base=ReliableTask, ...)``.

    Use it bare (``@reliable_task``) or with Celery's task options (``@reliable_task(queue="x")``).
    """
    options.setdefault("base", ReliableTask)
    if len(args) == 1 and callable(args[0]) and not options.keys() - {"base"}:
        func: Callable[..., Any] = args[0]
        return shared_task(**options)(func)
    return shared_task(*args, **options)
