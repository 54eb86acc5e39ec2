"""Tasks the tests enqueue; each execution leaves one Effect row."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore, Reject
from django.db import IntegrityError, transaction
from django.dispatch import receiver

from reliable_tasks import ReliableTask, Retry, RetryPolicy, reliable_task
from reliable_tasks.signals import task_deferred, task_duplicate

from .models import Effect, GatewayCharge, GatewayRequest, Observed


@reliable_task(bind=True)
def record(self: ReliableTask, key: str, payload: Any = None) -> str:
    Effect.objects.create(key=key, task_id=self.request.id, payload=payload)
    return key


@reliable_task
def record_quietly(key: str) -> None:
    Effect.objects.create(key=key)


@reliable_task(bind=True)
def sees_its_own_mark(self: ReliableTask) -> bool:
    """Whether the cache shows this execution as started while it runs."""
    from reliable_tasks import ledger

    probe = ledger.CacheWrites(task_id=str(self.request.id))
    _, started = ledger.done_cache.start(self.name, "probe", probe)
    ledger.done_cache.finish(probe)  # the probe's own mark goes again
    return bool(started)


@shared_task(base=ReliableTask, bind=True)
def routed(self: ReliableTask, key: str) -> str:
    Effect.objects.create(key=key, task_id=self.request.id)
    return key


@reliable_task
def slow(key: str, seconds: float) -> str:
    time.sleep(seconds)
    Effect.objects.create(key=key)
    return key


@shared_task(bind=True, acks_late=True)
def plain_record(self: Any, key: str) -> str:
    Effect.objects.create(key=key, task_id=self.request.id)
    return key


# -- idempotency --------------------------------------------------------------------------------

SIGNAL_DIR = Path(os.environ.get("RT_TEST_SIGNAL_DIR", "/tmp"))


def announce(name: str) -> None:
    """Leave a file the test waits for: the task body has started (its writes are not visible yet)."""
    (SIGNAL_DIR / name).touch()


@reliable_task(bind=True, idempotency_key=lambda order_id, amount=0: f"charge:{order_id}")
def charge(self: ReliableTask, order_id: int, amount: int = 0) -> dict[str, Any]:
    Effect.objects.create(
        key=f"charge:{order_id}", task_id=self.request.id, payload={"amount": amount}
    )
    return {"order": order_id, "charged": amount, "key": self.idempotency_key}


@reliable_task(bind=True)
def two_steps(self: ReliableTask, key: str, pause: float) -> str:
    Effect.objects.create(key=f"{key}:part1")
    announce(f"started-{key}-{self.request.id}")
    time.sleep(pause)
    Effect.objects.create(key=f"{key}:part2")
    return key


@reliable_task(
    bind=True, atomic=False, lease=6, idempotency_key=lambda key, *args, **kwargs: f"lease:{key}"
)
def leased(
    self: ReliableTask, key: str, seconds: float, renew: bool = False, then: float | None = None
) -> str:
    """Works ``seconds`` on its first execution (of this key), ``then`` seconds on later ones."""
    marker = SIGNAL_DIR / f"ran-lease-{key}"
    later = marker.exists()
    marker.touch()
    announce(f"started-{key}-{self.request.id}")
    deadline = time.monotonic() + (then if later and then is not None else seconds)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        if renew:
            self.renew_lease()
    Effect.objects.create(
        key=f"lease:{key}", task_id=self.request.id, payload={"key": self.idempotency_key}
    )
    return key


@reliable_task(idempotency_key=lambda key, hold=0.0: f"race:{key}")
def race(key: str, hold: float = 0.0) -> str:
    Effect.objects.create(key=f"race:{key}")
    # Holding the transaction open makes a concurrent duplicate wait on the key.
    time.sleep(hold)
    return key


@receiver(task_duplicate)
def _seen_duplicate(
    sender: Any, task: Any, key: str, cached: bool, result: Any, **kwargs: Any
) -> None:
    Observed.objects.create(kind="duplicate", key=key, cached=cached, result=result)


@receiver(task_deferred)
def _seen_deferral(sender: Any, task: Any, key: str, delay: float, **kwargs: Any) -> None:
    Observed.objects.create(kind="deferred", key=key)


@reliable_task
def write_then_fail(key: str) -> None:
    Effect.objects.create(key=key)
    raise ValueError(f"{key} failed after its write")


@reliable_task
def puts_itself_back(key: str) -> None:
    """Ends each delivery with no outcome recorded, as a worker killed mid-task does: a line in
    a file per run, then the message goes back to the queue."""
    with (SIGNAL_DIR / f"ran-{key}").open("a") as runs:
        runs.write("run\n")
    raise Reject(f"{key}: back to the queue", requeue=True)


@reliable_task(atomic=False)
def calls_out_then_fails(key: str) -> None:
    """Lease mode: calls another system (a line in a file per call), then fails, for a retry."""
    with (SIGNAL_DIR / f"called-{key}").open("a") as calls:
        calls.write("call\n")
    raise GatewayTimeout(f"{key}: the other system timed out")


@reliable_task
def swallows_a_database_error(key: str) -> None:
    """Catches an IntegrityError as one may in autocommit, not inside a transaction."""
    Effect.objects.create(key=key)
    try:
        GatewayCharge.objects.create(idempotency_key=key, order=key, amount=1)
        GatewayCharge.objects.create(idempotency_key=key, order=key, amount=1)
    except IntegrityError:
        return  # the duplicate charge is taken as already made


@reliable_task(bind=True)
def replaced(self: ReliableTask, key: str) -> str:
    """Writes, then hands over to another task with Celery's replace()."""
    Effect.objects.create(key=f"{key}:before")
    return self.replace(record.si(f"{key}:replacement"))  # type: ignore[no-any-return]


@reliable_task
def ignores_itself(key: str) -> None:
    """Writes, then ends itself with Celery's Ignore (its writes and key commit, no result)."""
    Effect.objects.create(key=key)
    raise Ignore(f"{key} is done with")


@reliable_task(bind=True, atomic=False)
def replaced_in_lease_mode(self: ReliableTask, key: str) -> str:
    Effect.objects.create(key=f"{key}:before")
    return self.replace(record.si(f"{key}:replacement"))  # type: ignore[no-any-return]


# -- retries and dead tasks ---------------------------------------------------------------------


class GatewayTimeout(Exception):
    """A transient error of a payment gateway."""


class CardDeclined(Exception):
    """A final answer: retrying cannot help."""


@reliable_task(
    bind=True,
    retry=RetryPolicy(
        max_attempts=3, base=1.0, cap=10.0, retry_on=(GatewayTimeout,), give_up_on=(CardDeclined,)
    ),
)
def pay(self: ReliableTask, order_id: int, outcome: str = "ok") -> str:
    """Fails as told: 'timeout' always, 'declined', 'retry-after', or 'fail-once' (a marker file)."""
    if outcome == "timeout":
        raise GatewayTimeout(f"gateway timed out for order {order_id}")
    if outcome == "declined":
        raise CardDeclined(f"card declined for order {order_id}")
    if outcome == "bug":
        raise KeyError("a programming error, not worth a retry")
    if outcome == "huge-error":
        # A give-up error whose message, and so its traceback, is beyond what a record keeps.
        raise CardDeclined("declined: " + "x" * 20_000)
    if outcome.startswith("odd-"):
        # An error quoting an argument that holds a NUL character and a lone surrogate.
        error = GatewayTimeout if outcome == "odd-timeout" else CardDeclined
        raise error("bad record: a\x00b \ud800")
    if outcome == "late-retry":
        # A Retry-After counted from a time already past: a negative countdown.
        raise self.retry(exc=GatewayTimeout(f"late for order {order_id}"), countdown=-5)
    if outcome == "retry-after":
        raise Retry(delay=30, reason="the gateway said Retry-After: 30")
    if outcome == "fail-once":
        marker = SIGNAL_DIR / f"failed-once-{order_id}"
        if not marker.exists():
            marker.touch()
            raise GatewayTimeout(f"first attempt for order {order_id} timed out")
    Effect.objects.create(key=f"pay:{order_id}", task_id=self.request.id)
    return f"paid {order_id}"


@reliable_task(retry=RetryPolicy(max_attempts=2, base=0.2, cap=0.2, jitter="none"))
def send_receipt(key: str) -> str:
    """Fails while its cause is there (the marker file ``gateway-down``), then succeeds."""
    if (SIGNAL_DIR / "gateway-down").exists():
        raise GatewayTimeout(f"the mail gateway is down: receipt {key} not sent")
    Effect.objects.create(key=key)
    return key


@reliable_task(retry=RetryPolicy(max_attempts=50, base=5.0, cap=5.0, jitter="none", deadline=8.0))
def with_deadline(key: str) -> None:
    raise GatewayTimeout(f"{key} times out")


@reliable_task(bind=True)
def kill_own_worker(self: ReliableTask, key: str) -> None:
    """A poison task: it kills the process that runs it, every time."""
    announce(f"killing-{key}-{self.request.retries}")
    os.kill(os.getpid(), 9)


@reliable_task(retry=RetryPolicy(max_attempts=3, base=3.0, cap=3.0, jitter="none"))
def flaky(key: str) -> str:
    """Fails its first attempt (a marker file), then succeeds; the retry waits 3 s."""
    marker = SIGNAL_DIR / f"flaky-{key}"
    if not marker.exists():
        marker.touch()
        raise GatewayTimeout(f"{key}: first attempt fails")
    Effect.objects.create(key=f"flaky:{key}")
    return key


# -- the chaos suite (tests/chaos) --------------------------------------------------------------
# Each logical task leaves exactly one effect, whatever the faults: an Effect row keyed by the
# task's business id, or one charge at the fake payment gateway. Business ids carry the run's
# token, so that runs sharing a cache of done keys never answer each other's tasks.

CHAOS_RETRY = RetryPolicy(
    max_attempts=6, base=0.5, cap=2.0, retry_on=(GatewayTimeout,), give_up_on=(CardDeclined,)
)


@reliable_task(bind=True)
def chaos_record(self: ReliableTask, key: str) -> str:
    """Atomic mode, keyed by the task id: the plain case."""
    Effect.objects.create(key=key, task_id=self.request.id)
    return key


@reliable_task(bind=True, idempotency_key=lambda order: f"chaos-order:{order}")
def chaos_order(self: ReliableTask, order: str) -> str:
    """Atomic mode, keyed by the order: enqueued twice, it must run once."""
    Effect.objects.create(key=f"chaos:order:{order}", task_id=self.request.id)
    return order


@reliable_task(bind=True, retry=CHAOS_RETRY)
def chaos_flaky(self: ReliableTask, key: str) -> str:
    """Writes its effect, then fails its first attempt: the retry must find clean state."""
    Effect.objects.create(key=key, task_id=self.request.id)
    if not self.request.retries:
        raise GatewayTimeout(f"{key}: the first attempt times out after its write")
    return key


def gateway_charge(idempotency_key: str, order: str, amount: int) -> dict[str, Any]:
    """A fake payment API that honours idempotency keys: a known key returns the first charge."""
    with transaction.atomic():
        charge, created = GatewayCharge.objects.get_or_create(
            idempotency_key=idempotency_key, defaults={"order": order, "amount": amount}
        )
        GatewayRequest.objects.create(
            idempotency_key=idempotency_key, order=order, replayed=not created
        )
    return {"charge": charge.pk, "amount": charge.amount}


@reliable_task(
    bind=True,
    atomic=False,
    lease=5,
    idempotency_key=lambda order, amount, lose_response=False: f"chaos-pay:{order}",
    retry=CHAOS_RETRY,
)
def chaos_charge(
    self: ReliableTask, order: str, amount: int, lose_response: bool = False
) -> dict[str, Any]:
    """Lease mode against the gateway; with ``lose_response`` the first attempt's reply is lost."""
    time.sleep(0.01)  # the network
    assert self.idempotency_key is not None
    charge = gateway_charge(self.idempotency_key, order, amount)
    if lose_response and not self.request.retries:
        raise GatewayTimeout(f"order {order}: charged, but the response was lost")
    return charge


@reliable_task(retry=CHAOS_RETRY)
def chaos_declined(key: str) -> None:
    """Poison: a give-up exception on every attempt (dead reason: give_up)."""
    raise CardDeclined(f"{key}: card declined")


@reliable_task
def chaos_crash(key: str) -> None:
    """Poison: kills the process that runs it, every time (dead reason: crash_loop)."""
    os.kill(os.getpid(), signal.SIGKILL)


@reliable_task(bind=True)
def celery_style_retry(self: ReliableTask, key: str) -> str:
    """Uses Celery's own ``self.retry()`` on its first attempt."""
    Effect.objects.create(key=f"{key}:attempt{self.request.retries}")
    if not self.request.retries:
        try:
            raise GatewayTimeout(f"{key}: the gateway is slow")
        except GatewayTimeout as exc:
            raise self.retry(countdown=5, exc=exc) from exc
    return key


@reliable_task(autoretry_for=(GatewayTimeout,))
def autoretrying(key: str) -> None:
    raise GatewayTimeout(f"{key}: always slow")


@reliable_task
def slow_query(key: str) -> None:
    """The database answers, but this task's own statement times out."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = 10")
        cursor.execute("SELECT pg_sleep(1)")


@reliable_task(
    bind=True,
    retry=RetryPolicy(max_attempts=5, give_up_on=(CardDeclined,)),
    autoretry_for=(Exception,),
)
def declines_through_autoretry(self: ReliableTask, order_id: int) -> None:
    raise CardDeclined(f"card declined for order {order_id}")


@reliable_task(bind=True)
def retries_with_other_args(self: ReliableTask, key: str, step: int = 0) -> str:
    if step == 0:
        raise self.retry(countdown=0, kwargs={"step": 1})
    Effect.objects.create(key=f"{key}:step{step}")
    return key


@reliable_task(bind=True, atomic=False, lease=6)
def leased_retry_with_other_args(self: ReliableTask, key: str, step: int = 0) -> str:
    if step == 0:
        raise self.retry(countdown=0, kwargs={"step": 1})
    Effect.objects.create(key=f"{key}:step{step}")
    return key


@reliable_task
def returns_a_set(key: str) -> object:
    Effect.objects.create(key=key)
    return {1, 2}  # JSON cannot carry a set: a link callback cannot take it as its argument


@reliable_task(time_limit=30, soft_time_limit=20, ignore_result=True)
def with_options(key: str, *, note: str = "") -> str:
    """Options (its own, and a priority from task_routes) Celery writes into its every message."""
    Effect.objects.create(key=key)
    return key


@reliable_task
def collect(results: list[str], key: str) -> str:
    """A chord's body: records the header's results it was given, in their order."""
    effect = f"{key}:{','.join(results)}"
    Effect.objects.create(key=effect)
    return effect


@reliable_task(bind=True)
def dies_after_its_commit(self: ReliableTask, key: str) -> str:
    """Writes its effect, then kills the process that runs it as soon as its transaction (the
    effect, the key's "done", the follow-ups' outbox rows) commits: before the worker can
    acknowledge the message. Only on the first delivery, so that the redelivery can end."""
    Effect.objects.create(key=key, task_id=self.request.id)
    if not (self.request.delivery_info or {}).get("redelivered"):
        transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
    return key


@reliable_task
def catches_a_failed_read(key: str) -> None:
    """Writes, then catches the error of a raw query (not one of Django's writes, which Django
    would mark for rollback): PostgreSQL has aborted the transaction all the same."""
    from django.db import DatabaseError, connection

    Effect.objects.create(key=key)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")
    except DatabaseError:
        pass


@reliable_task(bind=True, atomic=False)
def loses_its_lease(self: ReliableTask, key: str) -> str:
    """Lease mode: another execution takes the key over while this one works (as once its lease
    expired), so its completion finds the key no longer its own."""
    from reliable_tasks.models import IdempotencyKey

    IdempotencyKey.objects.filter(task_name=self.name, key=self.idempotency_key).update(
        token="taken-over"
    )
    Effect.objects.create(key=key)
    return key


_UNSET = object()


@reliable_task(idempotency_key=lambda key, marker=_UNSET: f"sentinel:{key}")
def with_a_sentinel_default(key: str, marker: object = _UNSET) -> str:
    """A default no message can carry (a sentinel object): calls that leave it out are alike."""
    Effect.objects.create(key=key, payload={"marker_given": marker is not _UNSET})
    return key
