"""``ReliableTask``, the Celery base class, and the ``@reliable_task`` decorator.

Enqueue goes to the outbox (``outbox.py``). Execution runs under an idempotency key held in
the ledger (``ledger.py``): in atomic mode the task body and the key's "done" commit in one
transaction; in lease mode the key is held under a lease while the body runs.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from celery import Task, shared_task
from celery.backends.rpc import RPCBackend
from celery.exceptions import Ignore, Reject
from celery.result import AsyncResult
from django.core.exceptions import ImproperlyConfigured
from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from . import outbox, signals
from .conf import conf
from .exceptions import (
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    LeaseLost,
    ReliableTasksError,
    UnsupportedOption,
)

if TYPE_CHECKING:
    from .ledger import Claim

logger = logging.getLogger("reliable_tasks.task")

# The ledger is imported inside the functions that run tasks: it imports the models, and this
# module is imported by the package itself, before Django's app registry is ready.

MAX_KEY_LENGTH = 255
# A delivery that finds the database down is put back after this pause, not spun on.
DATABASE_DOWN_PAUSE = 1.0

KeyFunc = Callable[..., Any]


class ReliableTask(Task[Any, Any]):
    """A Celery task that is enqueued through the outbox and runs once per idempotency key.

    Options (as ``@reliable_task(...)`` or ``@shared_task(base=ReliableTask, ...)`` keywords):

    - ``idempotency_key``: a callable over the task's arguments returning the key, e.g.
      ``lambda order_id: f"charge:{order_id}"``; by default the task id is the key.
    - ``atomic``: True (default) runs the body in one transaction with the key's "done";
      False runs it under a lease, for long tasks and calls to other systems.
    - ``lease``: seconds a lease-mode key is held without renewal (default
      ``RELIABLE_TASKS_LEASE_SECONDS``).
    """

    abstract = True
    # Acknowledge after the task ran, and put the message back if the worker dies: without
    # both, a crash loses the task. Idempotent execution makes the redelivery safe.
    acks_late = True
    reject_on_worker_lost = True
    serializer = outbox.SERIALIZER
    atomic: bool = True
    lease: float | None = None
    key_func: KeyFunc | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        key = cls.__dict__.get("idempotency_key")
        if key is not None and not isinstance(key, property):
            if not callable(key):
                raise ImproperlyConfigured(
                    f"idempotency_key of task {cls.__dict__.get('name', cls.__name__)!r} must be a callable over the "
                    f"task's arguments (e.g. lambda order_id: f'charge:{{order_id}}'), not {key!r}"
                )
            cls.key_func = staticmethod(key)
            delattr(cls, "idempotency_key")
        for option in ("acks_late", "reject_on_worker_lost"):
            if cls.__dict__.get(option) is False:
                raise ImproperlyConfigured(
                    f"task {cls.__dict__.get('name', cls.__name__)!r} sets {option}=False; reliable tasks always "
                    "acknowledge late and requeue on worker loss, or a crash would lose them. Remove the option."
                )

    @property
    def idempotency_key(self) -> str | None:
        """The key of the execution in progress (hand it to other systems), or None outside one."""
        return getattr(self.request, "idempotency_key", None)

    # -- enqueue -----------------------------------------------------------------------------

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
    ) -> AsyncResult[Any]:
        """Write the task to the outbox in the current transaction; return its result handle.

        Takes the same arguments as Celery's ``apply_async``. ``producer`` is ignored: the relay
        publishes. With ``task_always_eager`` the task runs inline, as Celery does.
        """
        if self.key_func is not None:
            # Fail at the call site, not on a worker later.
            self.key_for(args or (), kwargs or {})
        if self.app.conf.task_always_eager:
            return super().apply_async(
                args, kwargs, task_id=task_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **options,
            )  # fmt: skip
        if isinstance(self.backend, RPCBackend) and not options.get(
            "ignore_result", self.ignore_result
        ):
            raise UnsupportedOption(
                f"task {self.name!r}: the rpc:// result backend replies over the caller's broker "
                "channel, and enqueueing through the outbox opens none. Use another result backend "
                "(redis, a database) or ignore_result=True."
            )
        capture = outbox.CapturingProducer(self.name)
        result: AsyncResult[Any] = super().apply_async(
            args, kwargs, task_id=task_id, producer=cast(Any, capture), link=link,
            link_error=link_error, shadow=shadow, **options,
        )  # fmt: skip
        if capture.message is None:
            raise ReliableTasksError(
                f"Celery built no message for task {self.name!r}; nothing was enqueued"
            )
        outbox.write(capture.message)
        return result

    # -- execution ---------------------------------------------------------------------------

    def key_for(self, args: Any, kwargs: Any) -> str:
        """The idempotency key of an execution with these arguments."""
        if self.key_func is None:
            return str(self.request.id)
        try:
            key = self.key_func(*args, **kwargs)
        except Exception as exc:
            raise InvalidIdempotencyKey(
                f"the idempotency_key callable of task {self.name!r} failed on args={args!r} "
                f"kwargs={kwargs!r}: {exc!r}. It must accept the task's arguments."
            ) from exc
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidIdempotencyKey(
                f"the idempotency_key callable of task {self.name!r} returned {key!r}; it must return a "
                f"non-empty str of at most {MAX_KEY_LENGTH} characters."
            )
        return key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            # A plain function call (``task(1)``), not an execution: no key, no ledger.
            return super().__call__(*args, **kwargs)
        return _execute(self, args, kwargs)

    def renew_lease(self, seconds: float | None = None) -> None:
        """Extend this lease-mode execution's hold on its key; call it from long tasks.

        Raises:
            LeaseLost: the lease had expired and another execution took the key over.
        """
        from . import ledger

        claim = getattr(self.request, "reliable_claim", None)
        if claim is None:
            raise ReliableTasksError(
                "renew_lease() is for lease-mode tasks (atomic=False) while they run"
            )
        if not ledger.renew(claim, seconds or self._lease_seconds()):
            raise LeaseLost(
                f"task {self.name!r} lost idempotency key {claim.key!r}: its lease expired and another execution took over"
            )

    def _lease_seconds(self) -> float:
        return float(self.lease or conf.LEASE_SECONDS)


def _execute(task: ReliableTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from . import ledger

    name = task.name
    key = task.key_for(args, kwargs)
    fingerprint = ledger.fingerprint(args, kwargs)
    # Celery's request context takes any attribute; the task reads the key back from it.
    cast(Any, task.request).idempotency_key = key
    hit = ledger.done_cache.get(name, key)
    if hit is not None:
        stored_fingerprint, stored = hit
        return _duplicate(
            task, key, fingerprint, stored_fingerprint, ledger.decode_result(stored), cached=True
        )
    worker = task.request.hostname or socket.gethostname()
    task_id = str(task.request.id)
    lease = task._lease_seconds()
    try:
        if task.atomic:
            with transaction.atomic(using=conf.DATABASE):
                claim = ledger.claim(
                    name, key, fingerprint, task_id=task_id, worker=worker, lease_seconds=lease
                )
                if claim.owned:
                    return _run_atomic(task, claim, fingerprint, args, kwargs)
        else:
            with transaction.atomic(using=conf.DATABASE):
                claim = ledger.claim(
                    name, key, fingerprint, task_id=task_id, worker=worker, lease_seconds=lease
                )
    except (OperationalError, InterfaceError) as exc:
        # The database is the ledger: without it nothing may run, and in atomic mode whatever
        # ran was rolled back. Put the message back for when the database returns.
        logger.warning(
            "task %s[%s]: database unavailable (%s); message requeued", name, task.request.id, exc
        )
        time.sleep(DATABASE_DOWN_PAUSE)
        raise Reject(exc, requeue=True) from exc
    if not claim.owned:
        return _not_owned(task, claim, fingerprint)
    return _run_leased(task, claim, fingerprint, args, kwargs)


def _run_atomic(task: ReliableTask, claim: Claim, fingerprint: str, args: Any, kwargs: Any) -> Any:
    from . import ledger

    result = task.run(*args, **kwargs)
    stored = ledger.encode_result(task.name, result)
    ledger.complete(claim, stored)
    transaction.on_commit(
        lambda: ledger.done_cache.set(task.name, claim.key, fingerprint, stored),
        using=conf.DATABASE,
    )
    return result


def _run_leased(task: ReliableTask, claim: Claim, fingerprint: str, args: Any, kwargs: Any) -> Any:
    from . import ledger

    cast(Any, task.request).reliable_claim = claim
    try:
        result = task.run(*args, **kwargs)
    except BaseException:
        # Let the next delivery (a retry, a redelivery) take the key at once.
        try:
            ledger.release(claim)
        except (OperationalError, InterfaceError):
            logger.warning(
                "task %s: could not release key %r; its lease will expire", task.name, claim.key
            )
        raise
    stored = ledger.encode_result(task.name, result)
    if ledger.complete(claim, stored):
        ledger.done_cache.set(task.name, claim.key, fingerprint, stored)
    else:
        logger.warning(
            "task %s[%s] finished after losing key %r to another execution; its result is not recorded",
            task.name, task.request.id, claim.key,
        )  # fmt: skip
    return result


def _not_owned(task: ReliableTask, claim: Claim, fingerprint: str) -> Any:
    from . import ledger
    from .models import LedgerState

    if claim.state == LedgerState.DONE:
        result = _duplicate(
            task, claim.key, fingerprint, claim.fingerprint, claim.result, cached=False
        )
        ledger.done_cache.set(
            task.name, claim.key, claim.fingerprint, ledger.encode_result(task.name, claim.result)
        )
        return result
    if claim.fingerprint != fingerprint:
        raise _reused(task, claim.key, claim.fingerprint, fingerprint)
    _defer(task, claim)
    return None  # not reached: _defer raises


def _duplicate(
    task: ReliableTask,
    key: str,
    fingerprint: str,
    stored_fingerprint: str,
    result: Any,
    *,
    cached: bool,
) -> Any:
    if stored_fingerprint != fingerprint:
        raise _reused(task, key, stored_fingerprint, fingerprint)
    logger.info(
        "task %s[%s]: key %r already done; not run again, stored result returned",
        task.name,
        task.request.id,
        key,
    )
    signals.task_duplicate.send(
        sender=task.__class__, task=task, key=key, cached=cached, result=result
    )
    return result


def _reused(task: ReliableTask, key: str, first: str, now: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"task {task.name!r}: idempotency key {key!r} was first used with other arguments "
        f"(fingerprint {first[:12]}, now {now[:12]}). A key must name exactly one action: put what "
        "differs into the key, or use a new one. The task did not run."
    )


def _defer(task: ReliableTask, claim: Claim) -> None:
    """Another execution holds a live lease: come back when it ends, without holding the message."""
    remaining = 1.0
    if claim.lease_expires_at is not None:
        remaining = max(1.0, (claim.lease_expires_at - timezone.now()).total_seconds())
    # A little jitter keeps a crowd of deferred duplicates from arriving at one instant.
    delay = remaining + random.uniform(0, 1)
    logger.info(
        "task %s[%s]: key %r is held by a live lease; deferred by %.1f s",
        task.name, task.request.id, claim.key, delay,
    )  # fmt: skip
    signals.task_deferred.send(sender=task.__class__, task=task, key=claim.key, delay=delay)
    request = task.request
    task.signature_from_request(
        request, tuple(request.args or ()), dict(request.kwargs or {}), countdown=delay
    ).apply_async()
    raise Ignore(f"deferred: key {claim.key!r} is held by another execution")


def reliable_task(*args: Any, **options: Any) -> Any:
    """Declare a reliable task: ``@shared_task(base=ReliableTask, ...)``.

    Use it bare (``@reliable_task``) or with options (``@reliable_task(idempotency_key=...)``).
    """
    options.setdefault("base", ReliableTask)
    if len(args) == 1 and callable(args[0]) and not options.keys() - {"base"}:
        func: Callable[..., Any] = args[0]
        return shared_task(**options)(func)
    return shared_task(*args, **options)
