"""``ReliableTask``, the Celery base class, and the ``@reliable_task`` decorator.

Enqueue goes to the outbox (``outbox.py``). Execution runs under an idempotency key held in
the ledger (``ledger.py``): in atomic mode the task body and the key's "done" commit in one
transaction; in lease mode the key is held under a lease while the body runs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, cast

from celery import Task, shared_task, signature, states
from celery import signals as celery_signals
from celery.backends.rpc import RPCBackend
from celery.concurrency import get_implementation as get_pool_implementation
from celery.exceptions import BackendError, Ignore, Reject, SoftTimeLimitExceeded
from celery.exceptions import Retry as CeleryRetry
from celery.result import AsyncResult
from celery.utils.time import maybe_make_aware
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction
from django.db.models import Count
from django.db.transaction import TransactionManagementError
from django.utils import timezone
from redis import exceptions as redis_exceptions

from . import log, outbox, signals
from .conf import conf
from .exceptions import (
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    LeaseLost,
    ReliableTasksError,
    UnsupportedOption,
)
from .exceptions import Retry as RetryRequest
from .outbox import ENQUEUED_AT_HEADER, FIRST_ATTEMPT_HEADER, KEY_HEADER, PREVIOUS_DELAY_HEADER
from .retry import Decision, RetryPolicy

if TYPE_CHECKING:
    from .ledger import CacheWrites, Claim

logger = logging.getLogger("reliable_tasks.task")

# Celery's own control flow passes through untouched: deferral, requeue, retry.
_CONTROL_FLOW = (Ignore, Reject, CeleryRetry)

try:
    from psycopg.pq import TransactionStatus

    _IN_ERROR: Any = TransactionStatus.INERROR
except ImportError:  # no psycopg 3: no PostgreSQL connection to ask
    _IN_ERROR = object()

# The ledger is imported inside the functions that run tasks: it imports the models, and this
# module is imported by the package itself, before Django's app registry is ready.

MAX_KEY_LENGTH = 255
# Redeliveries without the cache's mark of a started execution count towards a crash loop too,
# against this many times RELIABLE_TASKS_MAX_DELIVERIES: a backstop that does not trust the cache.
UNMARKED_REDELIVERIES_FACTOR = 3
# A delivery that finds the database down is put back after this pause, not spun on.
DATABASE_DOWN_PAUSE = 1.0
# How long a duplicate of a chord's member waits for the result of the execution that
# completed its key to be stored, before it counts towards the chord itself.
CHORD_RESULT_WAIT = 1.0

KeyFunc = Callable[..., Any]

#: Celery options a reliable task keeps, whatever sets them: with another value, a worker that
#: dies or a hard time limit would acknowledge a message whose task did not run.
KEPT_OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "acks_on_timeout": False}


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
    # A hard time limit kills the process: the message goes back, like a worker lost, and
    # counts towards a crash loop, without the task being reported failed first (the worker's
    # request of reliable tasks).
    acks_on_timeout = False
    Request = "reliable_tasks.worker:ReliableRequest"
    serializer = outbox.SERIALIZER
    atomic: bool = True
    lease: float | None = None
    key_func: KeyFunc | None = None
    retry_policy: RetryPolicy | None = None
    _signature: inspect.Signature | None = None
    #: The names of the parameters, when all can be given by position and there are no
    #: ``*args`` or ``**kwargs``: a call with one positional argument for each binds to them as
    #: they come. None otherwise.
    _positional_names: tuple[str, ...] | None = None
    #: The defaults the fingerprint fills in (``_fingerprinted_defaults``), once computed.
    _defaults: list[tuple[str, Any]] | None = None
    #: The last plain call's message, to build the next one's from (``outbox.Template``).
    _template: outbox.Template | None = None

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
        policy = cls.__dict__.get("retry")
        if isinstance(policy, RetryPolicy | dict):
            # ``retry=`` names the policy in the decorator; the attribute stays Celery's method.
            cls.retry_policy = policy if isinstance(policy, RetryPolicy) else RetryPolicy(**policy)
            delattr(cls, "retry")
        for option, kept in KEPT_OPTIONS.items():
            value = cls.__dict__.get(option)
            if value is not None and bool(value) is not kept:
                raise ImproperlyConfigured(
                    f"task {cls.__dict__.get('name', cls.__name__)!r} sets {option}={value!r}; reliable tasks "
                    "always acknowledge late and put the message back on worker loss and on a hard time "
                    "limit, or a crash or a timeout would lose them. Remove the option."
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
        if (
            isinstance(self.backend, RPCBackend)
            and not options.get("ignore_result", self.ignore_result)
            and not self.app.conf.task_always_eager
        ):
            raise UnsupportedOption(
                f"task {self.name!r}: the rpc:// result backend replies over the caller's broker "
                "channel, and enqueueing through the outbox opens none. Use another result backend "
                "(redis, a database) or ignore_result=True."
            )
        plain = not options and link is None and link_error is None and shadow is None
        template = self._template
        if plain and template is not None and template.usable(self.app):
            result, message = template.build(self, args, kwargs, task_id)
            outbox.write(message)
            return result
        # Celery's own apply_async decides: with task_always_eager it runs the task inline and
        # publishes nothing; otherwise the capturing producer keeps the message.
        result, capture = self._build(
            args, kwargs, task_id=task_id, link=link, link_error=link_error, shadow=shadow,
            **options,
        )  # fmt: skip
        if capture.message is None:
            if self.app.conf.task_always_eager:
                return result
            raise self._nothing_built()
        if plain:
            self._template = outbox.Template.of(self, capture)
        outbox.write(capture.message)
        return result

    def _capture(
        self, args: Any, kwargs: Any, **options: Any
    ) -> tuple[AsyncResult[Any], outbox.CapturedMessage]:
        """The message Celery's ``apply_async`` would publish, built but not sent."""
        result, capture = self._build(args, kwargs, **options)
        if capture.message is None:
            raise self._nothing_built()
        return result, capture.message

    def _build(
        self, args: Any, kwargs: Any, **options: Any
    ) -> tuple[AsyncResult[Any], outbox.CapturingProducer]:
        """Celery's ``apply_async`` with a producer that keeps the message (its ``message``
        is None if Celery sent none). A countdown or an eta is kept out of Celery's build and
        given to the message as its ``eta`` header (``outbox.eta_header``); headers the call
        names itself win, as in Celery."""
        eta = outbox.eta_header(self.app, options.pop("countdown", None), options.pop("eta", None))
        if eta is not None:
            options["headers"] = {"eta": eta, **(options.get("headers") or {})}
        capture = outbox.CapturingProducer(self.name)
        result: AsyncResult[Any] = super().apply_async(
            args, kwargs, producer=cast(Any, capture), **options
        )
        return result, capture

    def _nothing_built(self) -> ReliableTasksError:
        return ReliableTasksError(
            f"Celery built no message for task {self.name!r}; nothing was enqueued"
        )

    # -- execution ---------------------------------------------------------------------------

    def key_for(self, args: Any, kwargs: Any) -> str:
        """The idempotency key of an execution with these arguments."""
        return self._key_for(self.request, args, kwargs)

    def _key_for(self, request: Any, args: Any, kwargs: Any) -> str:
        chosen = _header(request, KEY_HEADER)
        if chosen:
            # A requeue that renewed the key: it replaces the computed one.
            return str(chosen)
        if self.key_func is None:
            return str(request.id)
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

    def on_replace(self, sig: Any) -> Any:
        """Celery's ``replace()`` has moved the callbacks and the rest of the chain into
        ``sig``. Run eagerly (``apply()``, ``testing.run_enqueued()``), the replacement runs
        them, then returns: left on this request too, they would be sent a second time."""
        if self.request.is_eager:
            request = cast(Any, self.request)
            request.callbacks = request.chain = None
        return super().on_replace(sig)

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

    def fingerprint(self, args: Any, kwargs: Any) -> str:
        """The digest a key's arguments are compared by, however they were passed.

        Arguments are bound to the task's signature first, so ``charge(5, amount=1)`` and
        ``charge(5, 1)`` are the same call.
        """
        from . import ledger

        if self._signature is None:
            signature = inspect.signature(self.run)
            parameters = signature.parameters.values()
            if all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters):
                self._positional_names = tuple(p.name for p in parameters)
            self._signature = signature
        names = self._positional_names
        if names is not None and not kwargs and len(args or ()) == len(names):
            # What binding gives, without its cost on every execution.
            return ledger.fingerprint((), dict(zip(names, args, strict=True)))
        try:
            bound = self._signature.bind(*(args or ()), **(kwargs or {}))
        except TypeError:
            return ledger.fingerprint(args, kwargs)  # the call will fail on its own
        arguments = dict(bound.arguments)
        for name, default in self._fingerprinted_defaults():
            arguments.setdefault(name, default)
        return ledger.fingerprint((), arguments)

    def _fingerprinted_defaults(self) -> list[tuple[str, Any]]:
        """What ``BoundArguments.apply_defaults()`` fills in, less the defaults that JSON cannot
        carry (a sentinel ``object()``, a set): no message carries those, so every call that
        leaves them out is the same call, and the digest leaves them out too."""
        if self._defaults is None:
            from kombu.utils import json as kombu_json

            assert self._signature is not None
            defaults: list[tuple[str, Any]] = []
            for parameter in self._signature.parameters.values():
                if parameter.kind is parameter.VAR_POSITIONAL:
                    defaults.append((parameter.name, ()))
                elif parameter.kind is parameter.VAR_KEYWORD:
                    defaults.append((parameter.name, {}))
                elif parameter.default is not parameter.empty:
                    try:
                        kombu_json.dumps(parameter.default)
                    except (TypeError, ValueError):
                        continue
                    defaults.append((parameter.name, parameter.default))
            self._defaults = defaults
        return self._defaults

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> NoReturn:
        """Celery's ``self.retry()``, made durable: the retry policy schedules the next attempt.

        The next attempt is written to the outbox with the failed attempt's record, after
        ``countdown`` (or until ``eta``) when given, else after the policy's backoff, with
        ``args`` / ``kwargs`` when given. Celery's ``max_retries``, ``default_retry_delay`` and
        routing options give way to the policy and the original routing. ``autoretry_for``
        works through this too.
        """
        if self.request.called_directly:
            super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        if args is not None or kwargs is not None:
            # The next attempt runs with these arguments instead.
            cast(Any, self.request).reliable_retry_call = (
                args if args is not None else self.request.args,
                kwargs if kwargs is not None else self.request.kwargs,
            )
        delay: float | None = None
        if countdown is not None:
            delay = max(0.0, float(countdown))  # as Celery: a countdown in the past is now
        elif eta is not None:
            delay = max(0.0, (maybe_make_aware(eta) - timezone.now()).total_seconds())
        raise RetryRequest(delay, cause=exc)

    def _lease_seconds(self) -> float:
        return float(self.lease or conf.LEASE_SECONDS)

    def _retry_policy(self) -> RetryPolicy:
        return self.retry_policy or conf.retry_policy()


def _execute(task: ReliableTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from . import ledger

    started_at = timezone.now()
    # Celery's request is a lookup in a thread-local stack: taken once, then passed along.
    request = cast(Any, task.request)
    request.reliable_started = time.monotonic()
    writes = request.reliable_cache_writes = ledger.CacheWrites(task_id=str(request.id))
    succeeded = False
    try:
        result = _execute_keyed(task, request, args, kwargs, started_at, writes)
        succeeded = True
        return result
    finally:
        # Best effort, and never in the way of the task's own outcome.
        try:
            _record_timings(request, started_at, writes)
        except Exception:  # noqa: BLE001 - a metric failure must not replace the outcome
            log.for_task(logger, task).warning("timings not recorded", exc_info=True)
        try:
            ledger.done_cache.finish(writes, wait=not succeeded)
        except Exception:  # noqa: BLE001 - a cache failure must not replace the outcome
            log.for_task(logger, task).warning("cache writes at the end failed", exc_info=True)


def _record_timings(request: Any, started_at: datetime, writes: CacheWrites) -> None:
    """Latency (enqueue to start, first attempts only) and duration, into the last writes."""
    from . import metrics

    writes.add(metrics.observation("duration", (timezone.now() - started_at).total_seconds()))
    enqueued = _header(request, ENQUEUED_AT_HEADER)
    if enqueued and not request.retries:
        # Retries would count their backoff. A header that is not a time is not counted: this
        # runs as the task ends, and must not change its outcome.
        with contextlib.suppress(TypeError, ValueError):
            latency = (started_at - datetime.fromisoformat(enqueued)).total_seconds()
            writes.add(metrics.observation("latency", latency))


def _execute_keyed(
    task: ReliableTask,
    request: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    started_at: datetime,
    writes: CacheWrites,
) -> Any:
    from . import ledger

    key = ""
    try:
        key = task._key_for(request, args, kwargs)
        fingerprint = task.fingerprint(args, kwargs)
        # Celery's request context takes any attribute; the task reads the key back from it.
        request.idempotency_key = key
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        hit, interrupted = ledger.done_cache.start(task.name, key, writes, redelivered=redelivered)
        if hit is not None:
            stored_fingerprint, stored = hit
            return _duplicate(
                task,
                key,
                fingerprint,
                stored_fingerprint,
                ledger.decode_result(stored),
                cached=True,
            )
        # Only a redelivery pays for crash-loop counting: a first delivery costs nothing extra.
        if redelivered and _crash_loop(task, key, args, kwargs, interrupted, writes):
            raise Ignore(f"dead task: delivered {conf.MAX_DELIVERIES} times without an outcome")
        return _claim_and_run(task, request, key, fingerprint, args, kwargs, writes)
    except _CONTROL_FLOW:
        raise
    except (OperationalError, InterfaceError) as exc:
        try:
            reachable = _database_reachable()  # and a lost connection is made again
        except SoftTimeLimitExceeded:
            _soft_limit_reached(task, exc)
        if reachable and getattr(request, "reliable_in_body", False):
            # The database answers: this was the task's own query failing (a deadlock, a
            # statement timeout), an error like any other for the retry policy.
            _failed(task, exc, started_at, args, kwargs, key)
        # The ledger's own statements (the claim, the result, the commit) failed, or the
        # database is gone: not the task's failure. A connection lost and found again (a
        # failover, a killed session), SQLite's lock held elsewhere: the message goes back.
        if reachable and not _sqlite_busy(exc):
            _record_requeue(task, request, exc, started_at, key)
        _database_down(task, exc, reachable=reachable, started_at=started_at, key=key)
    except Exception as exc:  # noqa: BLE001 - every task error is recorded, then raised again
        _failed(task, exc, started_at, args, kwargs, key)
    raise AssertionError("not reached: the handlers above raise")  # pragma: no cover


def _record_requeue(
    task: ReliableTask, request: Any, exc: Exception, started_at: datetime, key: str
) -> None:
    """The database answers, yet a statement of the ledger failed: record why the message goes
    back. The record is what keeps its redelivery from counting towards a crash loop: an error
    that persists (a lock the claim times out on) puts the message back until it goes."""
    from . import dead
    from .models import TaskAttempt

    number = int(request.retries or 0) + 1
    try:
        _record_attempt(task, request, key, number, TaskAttempt.Outcome.REQUEUED, exc, started_at)
        # A lock held for an hour puts the message back thousands of times: the latest are kept.
        dead.trim_attempts(str(request.id), newest=None)
    except (DatabaseError, InterfaceError):  # the requeue goes ahead: the error is in the log
        log.for_task(logger, task, key).warning("could not record the requeue", exc_info=True)
    except SoftTimeLimitExceeded:
        _soft_limit_reached(task, exc)


def _sqlite_busy(exc: Exception) -> bool:
    """SQLite's write lock held by another process: recording the requeue would wait for the
    same lock (the busy timeout) and fail as well."""
    return connections[conf.DATABASE].vendor == "sqlite" and "locked" in str(exc)


def _record_attempt(
    task: ReliableTask,
    request: Any,
    key: str,
    number: int,
    outcome: str,
    exc: BaseException,
    started_at: datetime,
) -> None:
    """Store an attempt that did not succeed, with the error being handled and its traceback."""
    from . import dead
    from .models import TaskAttempt

    TaskAttempt.objects.using(conf.DATABASE).create(
        task_id=str(request.id), task_name=task.name, idempotency_key=key, number=number,
        outcome=outcome, exc_type=dead.qualname(exc),
        message=dead.truncate(str(exc), dead.MAX_MESSAGE),
        traceback=dead.truncate(traceback.format_exc(), dead.MAX_TRACEBACK),
        worker=request.hostname or socket.gethostname(), started_at=started_at,
    )  # fmt: skip


def _database_down(
    task: ReliableTask,
    exc: Exception,
    *,
    reachable: bool | None = None,
    started_at: datetime | None = None,
    key: str = "",
) -> NoReturn:
    """The database is the ledger: without it nothing may run or be recorded.

    In atomic mode whatever ran was rolled back; in lease mode the lease runs out. The message
    goes back to the queue, after a pause, and runs again when the database is back. While it
    does not answer, the worker holds the message instead (``_Hold``), and puts it back once
    it answers: an outage returns the message once, not once a pause, and each return counts
    against a quorum queue's delivery limit. Once it answers the requeue is recorded
    (``started_at``, ``key``), so that the redelivery does not count towards a crash loop.
    ``reachable``: whether the database answered just now, if that is known. An eager call
    (``apply()``) neither pauses nor holds.
    """
    request = cast(Any, task.request)
    if request.is_eager:
        raise Reject(exc, requeue=True) from exc
    try:
        if _database_reachable() if reachable is None else reachable:
            _put_back(task, exc, "database")
        hold, asked = _Hold(task, "database"), time.monotonic()
        while True:
            hold.wait(exc, asked)
            asked = time.monotonic()
            if _database_reachable():
                log.for_task(logger, task).info("database answers again; message requeued")
                if started_at is not None:
                    _record_requeue(task, request, exc, started_at, key)
                break
    except SoftTimeLimitExceeded:
        _soft_limit_reached(task, exc)
    raise Reject(exc, requeue=True) from exc


def _put_back(task: ReliableTask, exc: Exception, what: str) -> NoReturn:
    """``what`` (a service) failed and the message is not held: it goes back to the queue
    after a pause (an eager call, which has no message, at once)."""
    if cast(Any, task.request).is_eager:
        raise Reject(exc, requeue=True) from exc
    log.for_task(logger, task).warning("%s unavailable (%s); message requeued", what, exc)
    try:
        time.sleep(_hold_and_pause(task)[1])
    except SoftTimeLimitExceeded:
        _soft_limit_reached(task, exc, f"while the {what} was unavailable")
    raise Reject(exc, requeue=True) from exc


class _Hold:
    """One execution's hold of its message while a service (``what``: the database, the
    result backend) does not answer, asking it again each pause.

    The hold is one for the execution, however often the service comes and goes: it ends after
    ``RELIABLE_TASKS_DATABASE_DOWN_HOLD``, and before the task's first time limit, counting the
    time a question takes; then the message goes back. Put back at each failure, it would spend
    a quorum queue's delivery limit in as many pauses.
    """

    def __init__(self, task: ReliableTask, what: str) -> None:
        self.task, self.what = task, what
        self.hold, self.pause = 0.0, DATABASE_DOWN_PAUSE
        self.until: float | None = None
        self.down = False

    def wait(self, exc: Exception, asked: float) -> None:
        """The service did not answer the question asked at ``asked`` (``time.monotonic()``):
        pause before the next, or put the message back once the hold is spent (or is none)."""
        task, what = self.task, self.what
        task_log = log.for_task(logger, task)
        took = time.monotonic() - asked
        if self.until is None:
            self.hold, self.pause = _hold_and_pause(task)
            if self.hold <= 0:
                _put_back(task, exc, what)
            self.until = time.monotonic() + self.hold
            task_log.warning(
                "%s unavailable (%s); holding the message until it answers (%g s at most)",
                what,
                exc,
                self.hold,
            )
        elif not self.down:
            task_log.warning("%s unavailable again (%s)", what, exc)
        self.down = True
        # The next question, as long as this one took, must end with the hold (a time limit
        # may follow it).
        left = self.until - time.monotonic() - took
        if left <= 0:
            task_log.warning("%s still unavailable after %g s; message requeued", what, self.hold)
            raise Reject(exc, requeue=True) from exc
        try:
            time.sleep(min(self.pause, left))
        except SoftTimeLimitExceeded:
            _soft_limit_reached(task, exc, f"while the {what} was unavailable")

    def answers(self) -> bool:
        """The service answered: True if it had not."""
        down, self.down = self.down, False
        return down


def _hold_and_pause(task: ReliableTask) -> tuple[float, float]:
    """How long the execution in hand may hold its message while a service does not answer
    (``RELIABLE_TASKS_DATABASE_DOWN_HOLD``, ending two pauses before its first time limit),
    and the pause between two questions (shorter when the limit is that close). An eager call
    (``apply()``), which has no message, neither holds nor pauses."""
    if cast(Any, task.request).is_eager:
        return 0.0, 0.0
    hold = float(conf.DATABASE_DOWN_HOLD)
    left = _time_left(task)
    if left is None:
        return hold, DATABASE_DOWN_PAUSE
    return min(hold, left - 2 * DATABASE_DOWN_PAUSE), min(DATABASE_DOWN_PAUSE, left / 2)


def _soft_limit_reached(
    task: ReliableTask, exc: Exception, when: str = "while the database was unavailable"
) -> NoReturn:
    """The soft time limit came while the message was on its way back (a database error) or
    its failure was being recorded: it goes back all the same (failing the task for it would
    acknowledge a message whose task never ran, or whose retry was never written)."""
    log.for_task(logger, task).warning("soft time limit reached %s; message requeued", when)
    raise Reject(exc, requeue=True) from exc


#: The time limits the worker was started with (``--time-limit``, ``--soft-time-limit``, or
#: Celery's settings), set in its main process before the pool's processes are made.
_worker_time_limits: tuple[float | None, float | None] = (None, None)
#: Whether the worker's pool enforces a hard and a soft time limit, set with the limits.
#: Outside a worker, and for pools not known here, both are taken as enforced.
_limits_enforced: tuple[bool, bool] = (True, True)
#: Celery's pools by module: prefork enforces both limits, gevent the hard one only (a
#: timeout on the greenlet), eventlet, threads and solo neither.
_POOL_LIMITS = {
    "celery.concurrency.prefork": (True, True),
    "celery.concurrency.gevent": (True, False),
    "celery.concurrency.eventlet": (False, False),
    "celery.concurrency.thread": (False, False),
    "celery.concurrency.solo": (False, False),
}


def _remember_worker_time_limits(sender: Any = None, **kwargs: Any) -> None:
    global _worker_time_limits, _limits_enforced
    _worker_time_limits = (
        getattr(sender, "time_limit", None),
        getattr(sender, "soft_time_limit", None),
    )
    _limits_enforced = _pool_limits(getattr(sender, "pool_cls", None))


def _pool_limits(pool: Any) -> tuple[bool, bool]:
    """Which time limits (hard, soft) the worker pool ``pool`` (an alias such as "solo", or a
    class) enforces."""
    try:
        pool_cls = get_pool_implementation(pool) if pool else None
    except Exception:  # noqa: BLE001 - a pool not known here is taken to enforce both
        return True, True
    return _POOL_LIMITS.get(getattr(pool_cls, "__module__", ""), (True, True))


celery_signals.worker_init.connect(
    _remember_worker_time_limits, weak=False, dispatch_uid="rt-worker-time-limits"
)


def _time_left(task: ReliableTask) -> float | None:
    """Seconds before the first time limit of the execution in hand, if it has one: the
    message's own, else the task's, else the worker's; only limits the worker's pool enforces
    (under the solo or threads pool, none)."""
    request = cast(Any, task.request)
    started = getattr(request, "reliable_started", None)
    if started is None:
        return None
    hard, soft = getattr(request, "timelimit", None) or (None, None)
    app_conf = task.app.conf
    worker_hard, worker_soft = _worker_time_limits
    limits = [
        limit
        for limit, enforced in zip(
            (
                hard or task.time_limit or worker_hard or app_conf.task_time_limit,
                soft or task.soft_time_limit or worker_soft or app_conf.task_soft_time_limit,
            ),
            _limits_enforced,
            strict=True,
        )
        if limit and enforced
    ]
    if not limits:
        return None
    return max(0.0, float(min(limits)) - (time.monotonic() - float(started)))


def _database_reachable() -> bool:
    """Does the database answer? A task's own failed query leaves it answering."""
    connection = connections[conf.DATABASE]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            return False  # an enclosing transaction (a test's) cannot be reconnected under
        try:
            connection.close()
            connection.ensure_connection()
        except (OperationalError, InterfaceError):
            return False
    return True


def _policy_of(task: ReliableTask) -> RetryPolicy:
    """The task's policy; a broken project default is logged and replaced, never fatal here."""
    try:
        return task._retry_policy()
    except ImproperlyConfigured as exc:
        log.for_task(logger, task).error("%s; using RetryPolicy() meanwhile", exc)
        return RetryPolicy()


def _failed(
    task: ReliableTask, exc: Exception, started_at: datetime, args: Any, kwargs: Any, key: str
) -> NoReturn:
    """Record the failed attempt and schedule the next one, or make the task dead.

    The attempt's record and the retry's outbox row (or the dead task) commit together; only
    then does the worker acknowledge the message in hand.
    """
    from . import dead
    from .models import DeadReason, IdempotencyKey, LedgerState, TaskAttempt

    request = task.request
    if task.app.conf.task_always_eager:
        raise exc  # eager mode runs inline with Celery's semantics: the error is the caller's
    attempt = int(request.retries or 0) + 1
    first = _first_attempt(request) or started_at
    previous = _header(request, PREVIOUS_DELAY_HEADER)
    # A retry the task asked for records the error that led to it, when it named one.
    cause: Exception = exc
    if isinstance(exc, RetryRequest) and isinstance(exc.cause, Exception):
        cause = exc.cause
    if isinstance(exc, IdempotencyKeyReused):
        decision = Decision(retry=False, reason=DeadReason.KEY_REUSED, delay=0.0)
    else:
        decision = _policy_of(task).decide(
            cause,
            attempt=attempt,
            elapsed=(timezone.now() - first).total_seconds(),
            previous_delay=float(previous) if previous is not None else None,
            requested_delay=exc.delay if isinstance(exc, RetryRequest) else None,
            requested=isinstance(exc, RetryRequest),
        )
    new_call = getattr(request, "reliable_retry_call", None)
    retry_args, retry_kwargs = new_call or (args, kwargs)
    try:
        with transaction.atomic(using=conf.DATABASE):
            _lock_task_id(str(request.id))
            _unless_failure_recorded(task, key)
            _record_attempt(
                task, request, key, attempt, TaskAttempt.Outcome.FAILED, cause, started_at
            )
            dead.trim_attempts(str(request.id), newest=attempt)
            claim = getattr(request, "reliable_claim", None)
            if new_call is not None and decision.retry and claim is not None:
                # Other arguments make another call: a lease-mode key released by this attempt
                # must not refuse the next one as a reuse. (Atomic mode's claim rolled back.)
                # Only this execution's hold goes: another delivery may have taken the key
                # since its release.
                IdempotencyKey.objects.using(conf.DATABASE).filter(
                    task_name=task.name, key=key, state=LedgerState.RUNNING, token=claim.token
                ).delete()
            headers = _carried_headers(request, {FIRST_ATTEMPT_HEADER: first.isoformat()})
            if decision.retry:
                headers[PREVIOUS_DELAY_HEADER] = decision.delay
                task.signature_from_request(
                    request,
                    tuple(retry_args),
                    dict(retry_kwargs),
                    countdown=decision.delay,
                    retries=attempt,
                    headers=headers,
                ).apply_async()
            else:
                replay_args, replay_kwargs, options = _replay_call(
                    task, request, args, kwargs, headers
                )
                _, message = task._capture(replay_args, replay_kwargs, **options)
                dead.capture(
                    message,
                    reason=decision.reason,
                    args=args,
                    kwargs=kwargs,
                    idempotency_key=key,
                    exc=cause,
                    attempt_count=attempt,
                    first_failed_at=first,
                )
    except (OperationalError, InterfaceError) as db_exc:
        # Once the database answers again, the requeue is recorded: the redelivery is not
        # counted towards a crash loop (the failure itself is recorded when it runs again).
        _database_down(task, db_exc, started_at=started_at, key=key)
    except SoftTimeLimitExceeded:
        # Nothing of the record or the retry committed: failing the task for it would
        # acknowledge a message whose retry was never written.
        _soft_limit_reached(task, cause, "while its failure was recorded")
    except _CONTROL_FLOW:
        raise  # this copy's attempt was recorded already (_unless_failure_recorded)
    except Exception as unrecorded:  # noqa: BLE001 - acknowledged unrecorded, the task is lost
        _unrecorded(task, key, attempt, cause, unrecorded)
    if decision.retry:
        log.for_task(logger, task, key).warning(
            "attempt failed (%s: %s); retry in %.1f s", type(cause).__name__, cause, decision.delay
        )
        signals.task_retried.send(
            sender=task.__class__,
            task=task,
            task_id=str(request.id),
            attempt=attempt,
            delay=decision.delay,
            exc=cause,
        )
        raise CeleryRetry(
            f"attempt {attempt} failed: {cause!r}", exc=cause, when=cast(Any, decision.delay)
        ) from exc
    raise cause


def _unless_failure_recorded(task: ReliableTask, key: str) -> None:
    """Acknowledge this copy of the message, without running it or recording anything, if the
    attempt it carries already failed and was recorded: its retry or its dead task was written
    with that record, and only the acknowledgement was lost (the worker or the broker's
    connection died right after the commit), or a relay published the message twice. Running it
    again would write a second retry, and two chains of attempts would follow."""
    from .models import TaskAttempt

    request = task.request
    enqueued = _header(request, ENQUEUED_AT_HEADER)
    if request.is_eager or not enqueued:
        return  # no message to have come twice; or not one the outbox wrote
    attempt = int(request.retries or 0) + 1
    recorded = TaskAttempt.objects.using(conf.DATABASE).filter(
        task_id=str(request.id), task_name=task.name, idempotency_key=key, number=attempt,
        outcome=TaskAttempt.Outcome.FAILED,
    )  # fmt: skip
    try:
        # Failed after this message was enqueued: a failure of this message, not of an earlier
        # one under the same task id (a call that reused it, a requeued dead task, a task's
        # replacement, which Celery gives the replaced task's id).
        recorded = recorded.filter(ended_at__gte=datetime.fromisoformat(enqueued))
    except (TypeError, ValueError):
        return  # a header that is not a time: nothing to tell the copies apart by
    if recorded.exists():
        log.for_task(logger, task, key).info(
            "attempt %d already failed and was recorded, its retry or dead task written; this "
            "copy of the message is acknowledged without running",
            attempt,
        )
        raise Ignore(f"attempt {attempt} already failed and was recorded")


def _lock_task_id(task_id: str) -> None:
    """Two copies of one message failing at once record one failure: on PostgreSQL, the
    second waits here for the first's transaction, then finds its record. (Under READ
    COMMITTED, PostgreSQL's default: a stricter isolation level takes the transaction's
    snapshot before the wait. On SQLite, the embedded default, two copies failing in the same
    instant may still both write.)"""
    connection = connections[conf.DATABASE]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [task_id])


def _unrecorded(
    task: ReliableTask, key: str, attempt: int, cause: Exception, exc: Exception
) -> NoReturn:
    """The failure could not be recorded (a value the database refuses, retry arguments JSON
    cannot carry): nothing of it committed. Failing the task would acknowledge a message whose
    retry or dead task was never written, so it goes back to the queue instead; should the
    failure persist, crash-loop counting makes it a dead task. An eager call gets the error."""
    if cast(Any, task.request).is_eager:
        raise exc
    log.for_task(logger, task, key).error(
        "attempt %d failed (%s: %s), and its failure could not be recorded (%s: %s); message "
        "requeued",
        attempt, type(cause).__name__, cause, type(exc).__name__, exc,
        exc_info=exc,
    )  # fmt: skip
    try:
        time.sleep(_hold_and_pause(task)[1])
    except SoftTimeLimitExceeded:
        _soft_limit_reached(task, exc, "while its failure was recorded")
    raise Reject(exc, requeue=True) from exc


def _replay_call(
    task: ReliableTask, request: Any, args: Any, kwargs: Any, headers: dict[str, Any]
) -> tuple[Any, ...]:
    """``(args, kwargs, options)`` that rebuild the message in hand, for a dead task's record."""
    signature = task.signature_from_request(
        request, tuple(args), dict(kwargs), retries=0, headers=headers
    )
    options = dict(signature.options)
    options.pop("redelivered", None)
    return signature.args, signature.kwargs, options


def _crash_loop(
    task: ReliableTask,
    key: str,
    args: Any,
    kwargs: Any,
    interrupted: bool | None,
    writes: CacheWrites,
) -> bool:
    """A redelivery: count the deliveries that ended without an outcome; dead after too many.

    ``interrupted`` says whether an earlier delivery started and did not end (the cache's mark;
    None when the cache cannot say). Such a redelivery is recorded as ``lost``, and
    ``RELIABLE_TASKS_MAX_DELIVERIES`` of them make the task dead. A redelivery without a mark
    (the worker that died had only prefetched it, or it died after the execution ended) is
    recorded as ``redelivered``; the cache is never the truth, so these count too, against
    ``UNMARKED_REDELIVERIES_FACTOR`` times the limit. Each ``requeued`` record (a delivery that
    put the message back because a statement of the ledger failed, or the database was down,
    and said so) pays for one of them: a lock held for an hour is no crash loop, and the
    backstop still ends a loop that goes on beyond the requeues. Where the cache cannot say,
    the redelivery right after a requeue is taken as that requeue's, not as a lost one.
    """
    request = task.request
    from . import dead
    from .models import DeadReason, DeadStatus, DeadTask, IdempotencyKey, LedgerState, TaskAttempt

    if (
        IdempotencyKey.objects.using(conf.DATABASE)
        .filter(task_name=task.name, key=key, state=LedgerState.DONE)
        .exists()
    ):
        return False  # it finished, only its acknowledgement was lost: the duplicate path answers
    if (
        DeadTask.objects.using(conf.DATABASE)
        .filter(task_id=str(request.id), reason=DeadReason.CRASH_LOOP, status=DeadStatus.DEAD)
        .exists()
    ):
        # Dead already: another copy of the message (a relay that died before marking its
        # row published it twice) or a delivery whose acknowledgement died with its worker.
        return True
    _unless_failure_recorded(task, key)
    Outcome = TaskAttempt.Outcome
    attempts = TaskAttempt.objects.using(conf.DATABASE)
    if interrupted is None:
        last = attempts.filter(task_id=str(request.id)).order_by("-id").values_list("outcome")
        if last.first() == (Outcome.REQUEUED,):
            # The delivery before this one put the message back, recorded: without the
            # cache's word, this is its redelivery.
            interrupted = False
    marked = interrupted is not False
    if interrupted:
        # The marks found were left by executions that died: counted now, so they go with this
        # execution's own, and a later redelivery is judged by its own predecessor only.
        writes.stale = list(writes.seen)
    with transaction.atomic(using=conf.DATABASE):
        attempts.create(
            task_id=str(request.id), task_name=task.name, idempotency_key=key,
            number=int(request.retries or 0) + 1,
            outcome=Outcome.LOST if marked else Outcome.REDELIVERED,
            message="an earlier delivery of this message ended without an outcome "
            "(worker killed, out of memory, or its connection lost)" if marked else
            "delivered again, with no sign that an earlier delivery ran (a worker that died "
            "had only prefetched it, or died after the execution ended)",
            worker=request.hostname or socket.gethostname(),
        )  # fmt: skip
        counted = [Outcome.LOST, Outcome.REDELIVERED, Outcome.REQUEUED]
        counts = dict(
            attempts.filter(task_id=str(request.id), outcome__in=counted)
            .values_list("outcome")
            .annotate(n=Count("id"))
        )  # fmt: skip
        lost = counts.get(Outcome.LOST, 0)
        # Each delivery that put the message back, recorded, explains one redelivery.
        unmarked = max(0, counts.get(Outcome.REDELIVERED, 0) - counts.get(Outcome.REQUEUED, 0))
        limit = conf.MAX_DELIVERIES
        if lost < limit and lost + unmarked < limit * UNMARKED_REDELIVERIES_FACTOR:
            return False
        headers = _carried_headers(request, {})
        replay_args, replay_kwargs, options = _replay_call(task, request, args, kwargs, headers)
        _, message = task._capture(replay_args, replay_kwargs, **options)
        dead.capture(
            message, reason=DeadReason.CRASH_LOOP, args=args, kwargs=kwargs, idempotency_key=key,
            attempt_count=int(request.retries or 0) + 1, first_failed_at=_first_attempt(request),
        )  # fmt: skip
    return True


def _first_attempt(request: Any) -> datetime | None:
    """When the first attempt of this run of retries started, from its header."""
    first = _header(request, FIRST_ATTEMPT_HEADER)
    return datetime.fromisoformat(first) if first else None


def _header(request: Any, name: str) -> Any:
    """A custom message header: an attribute of the worker's request, or in eager ``headers``."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _carried_headers(request: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Headers a retry or a dead task's message keeps from the message in hand."""
    headers = {
        name: _header(request, name) for name in (KEY_HEADER,) if _header(request, name) is not None
    }
    headers.update(extra)
    return headers


def _claim_and_run(
    task: ReliableTask,
    request: Any,
    key: str,
    fingerprint: str,
    args: Any,
    kwargs: Any,
    writes: CacheWrites,
) -> Any:
    from . import ledger

    worker = request.hostname or socket.gethostname()
    task_id = str(request.id)
    lease = task._lease_seconds()
    # The task's transaction is the outermost one (not a caller's or a test's): its last
    # statement may carry the COMMIT.
    connection = connections[conf.DATABASE]
    outermost = connection.get_autocommit() and not connection.in_atomic_block
    # One cursor carries the ledger's statements of the execution: the claim and, in atomic
    # mode, the result (the task's own statements use cursors of their own).
    outcome: Any = None
    with (
        _follow_ups_kept(request),
        transaction.atomic(using=conf.DATABASE),
        connection.cursor() as cursor,
    ):
        claim = ledger.claim(
            task.name, key, fingerprint, task_id=task_id, worker=worker, lease_seconds=lease,
            atomic=task.atomic, cursor=cursor,
        )  # fmt: skip
        if claim.owned and task.atomic:
            outcome = _run_atomic(
                task, request, claim, fingerprint, args, kwargs, writes, cursor, last=outermost
            )
    if isinstance(outcome, _Ended):
        raise outcome.signal  # after the commit: what the body did stands
    if claim.owned and task.atomic:
        return outcome
    if not claim.owned:
        return _not_owned(task, claim, fingerprint, writes)
    return _run_leased(task, request, claim, fingerprint, args, kwargs, writes)


def _run_atomic(
    task: ReliableTask,
    request: Any,
    claim: Claim,
    fingerprint: str,
    args: Any,
    kwargs: Any,
    writes: CacheWrites,
    cursor: Any,
    *,
    last: bool,
) -> Any:
    """Run the task in the claim's transaction; ``last``: nothing follows but its commit.

    A body that ends itself with Celery's ``Ignore`` (``self.replace()`` enqueues the
    replacement, then raises it) has its writes, the replacement's outbox row and the key's
    "done" committed, with no result: the message is acknowledged, and a duplicate must not
    run it again. The ``Ignore`` is returned wrapped, and raised once the transaction commits.
    """
    from . import ledger

    ended: _Ended | None = None
    request.reliable_in_body = True  # an error raised from here on is the task's own
    try:
        result = task.run(*args, **kwargs)
    except Ignore as signal:
        result, ended = None, _Ended(signal)
    request.reliable_in_body = False
    if connections[conf.DATABASE].needs_rollback or _transaction_aborted():
        # The body caught a database error inside the task's transaction (say an
        # IntegrityError around a create, as one may in autocommit): Django would roll the
        # transaction back as the block ends, the task's writes and its key with it, and the
        # task would count as a success. It fails instead, for the retry policy. Django marks
        # only its own writes' errors; PostgreSQL aborts the transaction on any (a read's
        # lock or statement timeout, a raw cursor's), and then answers its COMMIT with a
        # rollback that psycopg reports as no error.
        raise TransactionManagementError(
            f"task {task.name!r} caught a database error inside its transaction (atomic mode), "
            "which undoes every write of the task. Let the error propagate, or put the "
            "statement that may fail in a transaction.atomic() block of its own (a savepoint) "
            "and catch the error outside that block."
        )
    stored = ledger.encode_result(task.name, result)
    transaction.on_commit(
        lambda: ledger.done_cache.remember(writes, task.name, claim.key, fingerprint, stored),
        using=conf.DATABASE,
    )
    # The claim is "done" already, in this transaction. The result is stored before any
    # follow-up is sent (a plain Celery callback publishes at once); without follow-ups it is
    # the transaction's last statement, and may carry its COMMIT.
    follow_ups = bool(request.callbacks or request.chain)
    ledger.store_result(claim, stored, commit=last and not follow_ups, cursor=cursor)
    if ended is not None:
        return ended  # replaced or ignored: its own follow-ups are not this task's to send
    _send_follow_ups(task, request, result)
    return result


def _transaction_aborted() -> bool:
    """Has PostgreSQL aborted the transaction in hand (an error the body caught)? Asked of the
    driver's connection state, with no round trip."""
    raw = getattr(connections[conf.DATABASE], "connection", None)
    info = getattr(raw, "info", None)  # psycopg 3's ConnectionInfo (mysqlclient's is a method)
    return bool(getattr(info, "transaction_status", None) == _IN_ERROR)


class _Ended:
    """An ``Ignore`` the task's body raised, carried past its transaction's commit."""

    def __init__(self, signal: Ignore) -> None:
        self.signal = signal


def _run_leased(
    task: ReliableTask,
    request: Any,
    claim: Claim,
    fingerprint: str,
    args: Any,
    kwargs: Any,
    writes: CacheWrites,
) -> Any:
    from . import ledger

    request.reliable_claim = claim
    request.reliable_in_body = True  # an error raised from here on is the task's own
    try:
        result = task.run(*args, **kwargs)
    except Ignore:
        # The body ended itself (Celery's replace() enqueued its replacement): the message is
        # acknowledged, so the key is done, without a result, for duplicates not to run again.
        request.reliable_in_body = False
        with transaction.atomic(using=conf.DATABASE):
            if ledger.complete(claim, None):
                ledger.done_cache.remember(writes, task.name, claim.key, fingerprint, None)
        raise
    except BaseException:
        # Let the next delivery (a retry, a redelivery) take the key at once.
        try:
            ledger.release(claim)
        except (OperationalError, InterfaceError):
            log.for_task(logger, task, claim.key).warning(
                "could not release the key; its lease will expire"
            )
        raise
    request.reliable_in_body = False
    stored = ledger.encode_result(task.name, result)
    with _follow_ups_kept(request), transaction.atomic(using=conf.DATABASE):
        completed = ledger.complete(claim, stored)
        if completed:
            _send_follow_ups(task, request, result)
    if completed:
        ledger.done_cache.remember(writes, task.name, claim.key, fingerprint, stored)
    else:
        # The execution that took the key over sends them when it completes; left on the
        # request, Celery's tracer would send them too.
        request.callbacks = request.chain = None
        log.for_task(logger, task, claim.key).warning(
            "finished after losing the key to another execution; its result is not recorded "
            "and its follow-ups are not sent"
        )
    return result


@contextlib.contextmanager
def _follow_ups_kept(request: Any) -> Iterator[None]:
    """Around the transaction that sends the follow-ups: if it fails (its commit too, on a
    deferred constraint, say), they went with its rollback, and the request carries them again
    for the retry, or the dead task."""
    follow_ups = request.callbacks, request.chain
    try:
        yield
    except BaseException:
        request.callbacks, request.chain = follow_ups
        raise


def _send_follow_ups(task: ReliableTask, request: Any, result: Any) -> None:
    """Enqueue the task's ``link`` callbacks and its chain's next step, in the transaction that
    marks its key done: they are sent once, with the effect, or not at all.

    Celery would send them after the task returned, where a worker killed in between loses
    them; taking them off the request here stops Celery from sending them a second time.
    """
    callbacks, chain = request.callbacks, request.chain
    if not callbacks and not chain:
        return
    options: dict[str, Any] = {"parent_id": request.id, "root_id": request.root_id or request.id}
    if task.app.conf.task_inherit_parent_priority:
        options["priority"] = (request.delivery_info or {}).get("priority")
    for callback in callbacks or ():
        signature(callback, app=task.app).apply_async((result,), **options)
    if chain:
        signature(chain[-1], app=task.app).apply_async((result,), chain=chain[:-1], **options)
    # Sent: the request no longer carries them. (Had sending failed, a retry would keep them.)
    request.callbacks = request.chain = None


def _not_owned(task: ReliableTask, claim: Claim, fingerprint: str, writes: CacheWrites) -> Any:
    from . import ledger
    from .models import LedgerState

    if claim.state == LedgerState.DONE:
        result = _duplicate(
            task, claim.key, fingerprint, claim.fingerprint, claim.result, cached=False
        )
        ledger.done_cache.remember(
            writes,
            task.name,
            claim.key,
            claim.fingerprint,
            ledger.encode_result(task.name, claim.result),
            refill=True,
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
    log.for_task(logger, task, key).info(
        "key already done; not run again, stored result returned (%s)",
        "cache" if cached else "database",
    )
    request = cast(Any, task.request)
    # The first execution sent its callbacks and next chain step with its "done".
    request.callbacks = request.chain = None
    if request.chord and _counted_in_chord(task, request):
        # Celery would count this delivery as one more finished member of its chord: the count
        # would reach the end with a member still to run (django-celery-results then drops
        # the chord, its body never run; other backends may start the body early).
        request.chord = None
    signals.task_duplicate.send(
        sender=task.__class__, task=task, key=key, cached=cached, result=result
    )
    return result


def _counted_in_chord(task: ReliableTask, request: Any) -> bool:
    """Whether an earlier delivery of this message was counted as its chord's member.

    Celery stores a task's result right after the commit, then counts it towards its chord. A
    result stored under this task id says an execution of this message got that far. A copy
    that waited on the key's lock wakes at that commit, before the store: it waits for the
    result ``CHORD_RESULT_WAIT`` seconds. Still none, and the execution that completed the key
    died between its commit and the count (or was another message, a second enqueue of a
    business key): this delivery is the one that counts. A result backend that cannot say is
    asked again each pause while the message is held (as for a database that is down, up to
    ``RELIABLE_TASKS_DATABASE_DOWN_HOLD``), then the message goes back: counted twice or not at
    all, the chord would be lost. The wait for the result counts from when the backend answers.
    """
    deadline = time.monotonic() + CHORD_RESULT_WAIT
    hold = _Hold(task, "result backend")
    try:
        while True:
            asked = time.monotonic()
            try:
                status = task.backend.get_task_meta(request.id).get("status")
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the backend raises, it is held or goes back
                _result_backend_down(hold, exc, asked)
                continue
            if hold.answers():
                log.for_task(logger, task).info("result backend answers again")
                deadline = time.monotonic() + CHORD_RESULT_WAIT
            if status == states.SUCCESS:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    except SoftTimeLimitExceeded as exc:
        _soft_limit_reached(task, exc, "while the result backend was asked")


def _result_backend_down(hold: _Hold, exc: Exception, asked: float) -> None:
    """The result backend raised ``exc``: held while it cannot be reached; an error that says
    it is broken puts the message back at once, as waiting will not mend it."""
    if not _backend_unavailable(exc):
        _put_back(hold.task, exc, "result backend")
    if isinstance(exc, DatabaseError | InterfaceError):
        # A connection that broke stays broken until closed: the next question makes one.
        for connection in connections.all(initialized_only=True):
            if not connection.in_atomic_block:
                connection.close_if_unusable_or_obsolete()
    hold.wait(exc, asked)


def _backend_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the result backend cannot be reached (worth asking again), rather
    than that it is broken (a value it cannot decode, a wrong password, on PostgreSQL a missing
    table). Celery's own retries (``result_backend_always_retry``) give up with a
    ``BackendError`` caused by the last error, which is the one that tells."""
    if isinstance(exc, BackendError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, redis_exceptions.AuthenticationError):
        return False
    return isinstance(
        exc,
        OperationalError
        | InterfaceError
        | OSError
        | TimeoutError
        | redis_exceptions.ConnectionError
        | redis_exceptions.TimeoutError,
    )


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
    log.for_task(logger, task, claim.key).info(
        "key held by a live lease; deferred by %.1f s", delay
    )
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
