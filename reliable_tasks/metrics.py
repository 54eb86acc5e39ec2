"""Metrics: one snapshot of the pipeline's state, and counters that worker processes share.

``snapshot()`` reads the database with queries that stay cheap on tables with millions of
rows: counts run over the small partial indexes (pending rows, recent dispatches, dead tasks
nobody acted on) and the ledger's size is PostgreSQL's own estimate. Counters that only
workers see (duplicate hits, deferrals, retries, latency and duration histograms) live in the
Django cache (``RELIABLE_TASKS_CACHE_ALIAS``), so every process adds to the same numbers; they
are best effort: a cache outage loses increments, never tasks.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import caches
from django.db import connections
from django.db.models import Count, Min
from django.utils import timezone

from .conf import conf
from .models import (
    DeadStatus,
    DeadTask,
    IdempotencyKey,
    OutboxMessage,
    OutboxStatus,
    RelayHeartbeat,
)

logger = logging.getLogger("reliable_tasks.metrics")

#: Upper bounds (seconds) of the latency and duration histograms' buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
COUNTERS = ("duplicate_hits", "deferrals", "retries", "dead_tasks")
HISTOGRAMS = ("latency", "duration")
_PREFIX = "reliable_tasks:metric:"


@dataclass(frozen=True)
class Relay:
    name: str
    hostname: str
    pid: int
    last_seen_at: datetime
    seconds_since_seen: float
    stopped: bool
    dispatched_total: int


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (as Prometheus wants them), their sum and count."""

    buckets: dict[str, int]
    sum: float
    count: int


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    outbox_pending: int
    outbox_due: int
    oldest_due_age_seconds: float | None
    #: Pending rows whose last publish the broker refused (or that could not be built).
    outbox_failing: int
    #: How long ago the broker first refused the one refused longest.
    oldest_failing_age_seconds: float | None
    dispatched_last_minute: int
    retries_scheduled: int
    relays: list[Relay]
    dead_by_reason: dict[str, int]
    dead_by_task: dict[str, int]
    ledger_keys: int
    ledger_keys_estimated: bool
    counters: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    @property
    def dead_total(self) -> int:
        return sum(self.dead_by_reason.values())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["taken_at"] = self.taken_at.isoformat()
        data["dead_total"] = self.dead_total
        for relay in data["relays"]:
            relay["last_seen_at"] = relay["last_seen_at"].isoformat()
        return data


def snapshot(*, now: datetime | None = None) -> Snapshot:
    """The pipeline's state now: backlog, refused rows, dispatch rate, relays, retries, dead
    tasks, ledger."""
    now = now or timezone.now()
    outbox = OutboxMessage.objects.using(conf.DATABASE)
    pending = outbox.filter(status=OutboxStatus.PENDING)
    due = pending.filter(due_at__lte=now)
    oldest = due.aggregate(oldest=Min("due_at"))["oldest"]
    # The relay sets a refused row aside with a backoff (its due_at moves ahead each time), so
    # the due age stays low while the broker refuses everything; how long it has been refused
    # does not. (A small partial index holds only the refused pending rows.)
    failing = pending.filter(failing_since__isnull=False).aggregate(
        n=Count("pk"), oldest=Min("failing_since")
    )
    dead = DeadTask.objects.using(conf.DATABASE).filter(status=DeadStatus.DEAD)
    keys, estimated = _ledger_size()
    return Snapshot(
        taken_at=now,
        outbox_pending=pending.count(),
        outbox_due=due.count(),
        oldest_due_age_seconds=(now - oldest).total_seconds() if oldest else None,
        outbox_failing=failing["n"],
        oldest_failing_age_seconds=(
            (now - failing["oldest"]).total_seconds() if failing["oldest"] else None
        ),
        dispatched_last_minute=outbox.filter(
            status=OutboxStatus.DISPATCHED, dispatched_at__gte=now - timedelta(minutes=1)
        ).count(),
        retries_scheduled=pending.filter(retries__gt=0).count(),
        relays=[
            Relay(
                name=h.name,
                hostname=h.hostname,
                pid=h.pid,
                last_seen_at=h.last_seen_at,
                seconds_since_seen=(now - h.last_seen_at).total_seconds(),
                stopped=h.stopped_at is not None,
                dispatched_total=h.dispatched_total,
            )
            for h in RelayHeartbeat.objects.using(conf.DATABASE).order_by("name")
        ],
        dead_by_reason=dict(dead.values_list("reason").annotate(n=Count("id")).order_by()),
        dead_by_task=dict(dead.values_list("task_name").annotate(n=Count("id")).order_by()),
        ledger_keys=keys,
        ledger_keys_estimated=estimated,
        counters={name: _read(name) for name in COUNTERS},
        histograms={name: _histogram(name) for name in HISTOGRAMS},
    )


def _ledger_size() -> tuple[int, bool]:
    """Rows in the ledger: PostgreSQL's planner estimate (no scan), an exact count elsewhere."""
    connection = connections[conf.DATABASE]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                [IdempotencyKey._meta.db_table],
            )
            row = cursor.fetchone()
        # -1 means the table was never analyzed; fall back to counting.
        if row is not None and row[0] >= 0:
            return int(row[0]), True
    return IdempotencyKey.objects.using(conf.DATABASE).count(), False


# --------------------------------------------------------------------------------------------
# Shared counters and histograms


def increment(name: str, amount: int = 1) -> None:
    """Add to a shared counter (best effort)."""
    add({f"{_PREFIX}{name}": amount})


def observation(name: str, seconds: float) -> dict[str, int]:
    """The increments that record one observation of histogram ``name``."""
    seconds = max(0.0, seconds)
    bucket = next((b for b in BUCKETS if seconds <= b), None)
    return {
        f"{_PREFIX}{name}:bucket:{bucket if bucket is not None else 'inf'}": 1,
        f"{_PREFIX}{name}:count": 1,
        # Sums are kept in microseconds: cache increments are integers.
        f"{_PREFIX}{name}:sum_us": int(seconds * 1_000_000),
    }


def add(amounts: dict[str, int]) -> None:
    """Add to shared counters, given by their full cache key (best effort)."""
    if not amounts:
        return
    alias = conf.CACHE_ALIAS
    if alias is None:
        return
    try:
        cache = caches[alias]
        from .ledger import redis_client

        client = redis_client(cache)
        if client is not None:
            # django-redis: one round trip for all of them (it stores integers as plain
            # numbers, so INCRBY and the cache's own get() agree).
            pipe = client.pipeline(transaction=False)
            for key, amount in amounts.items():
                pipe.incrby(cache.make_key(key), amount)
            pipe.execute()
            return
        for key, amount in amounts.items():
            try:
                cache.incr(key, amount)
            except ValueError:
                # incr() refuses a missing key; add() makes it, unless another process just did.
                if not cache.add(key, amount, timeout=None):
                    cache.incr(key, amount)
    except Exception:  # metrics must never fail a task
        logger.debug("metrics %s not recorded", ", ".join(amounts), exc_info=True)


def _read_many(keys: list[str]) -> dict[str, int]:
    alias = conf.CACHE_ALIAS
    if alias is None:
        return {}
    try:
        values = caches[alias].get_many(keys)
    except Exception:  # a cache outage shows as zeros, not as an error page
        logger.debug("metrics unreadable", exc_info=True)
        return {}
    return {k: int(v) for k, v in values.items()}


def _read(name: str) -> int:
    key = f"{_PREFIX}{name}"
    return _read_many([key]).get(key, 0)


def _histogram(name: str) -> Histogram:
    labels = [*(str(b) for b in BUCKETS), "inf"]
    keys = [f"{_PREFIX}{name}:bucket:{label}" for label in labels]
    values = _read_many([*keys, f"{_PREFIX}{name}:count", f"{_PREFIX}{name}:sum_us"])
    cumulative: dict[str, int] = {}
    running = 0
    for label, key in zip(labels, keys, strict=True):
        running += values.get(key, 0)
        cumulative["+Inf" if label == "inf" else label] = running
    return Histogram(
        buckets=cumulative,
        sum=values.get(f"{_PREFIX}{name}:sum_us", 0) / 1_000_000,
        count=values.get(f"{_PREFIX}{name}:count", 0),
    )


# --------------------------------------------------------------------------------------------
# What workers report


def connect() -> None:
    """Count what workers see: duplicates, deferrals, retries, dead tasks.

    Latency and duration are recorded by the task itself as it ends, with its last cache writes
    (``ledger.CacheWrites``); so are these counts when the signal comes from an execution in
    progress, so that counting costs no round trip of its own.
    """
    from . import signals

    signals.task_duplicate.connect(
        _count("duplicate_hits"), weak=False, dispatch_uid="rt-metrics-duplicate"
    )
    signals.task_deferred.connect(
        _count("deferrals"), weak=False, dispatch_uid="rt-metrics-deferred"
    )
    signals.task_retried.connect(_count("retries"), weak=False, dispatch_uid="rt-metrics-retried")
    signals.task_dead.connect(_count("dead_tasks"), weak=False, dispatch_uid="rt-metrics-dead")


def _count(name: str) -> Any:
    key = f"{_PREFIX}{name}"

    def handler(task: Any = None, **kwargs: Any) -> None:
        writes = getattr(getattr(task, "request", None), "reliable_cache_writes", None)
        if writes is not None and writes.open:
            writes.add({key: 1})
        else:
            increment(name)

    return handler
