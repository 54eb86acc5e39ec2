"""The execution ledger: claim an idempotency key, complete it, hold it under a lease, prune it.

A new key is claimed with one insert. A key that exists goes to an upsert, which takes over
a lease-mode key whose lease expired; when someone else holds the key, or it is done, the
upsert changes nothing and a read tells the caller what there is. In atomic mode the claim
writes the key "done" in the task's own transaction, which commits it with the task's writes
or rolls it back with them: a concurrent duplicate waits on the key's unique index, then finds
it done or claims it. The Django cache remembers done keys so that a duplicate usually costs no
database round trip; the database stays the truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import caches
from django.db import connections
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.utils import timezone
from django_redis.client import ShardClient
from kombu.utils import json as kombu_json
from redis import exceptions as redis_exceptions

from . import pruning
from .conf import conf
from .models import IdempotencyKey, KeyResult, LedgerState

_ClientCursor: Any = None
_IDLE: Any = None
try:
    from psycopg import ClientCursor as _ClientCursor
    from psycopg.pq import TransactionStatus

    _IDLE = TransactionStatus.IDLE
except ImportError:  # psycopg2, or no PostgreSQL driver
    pass

logger = logging.getLogger("reliable_tasks.ledger")


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a key.

    ``owned`` is True when this execution holds the key and must run the task. Otherwise
    ``state`` says why not: "done" (``result`` is the stored result) or "running" (another
    execution holds a live lease until ``lease_expires_at``).
    """

    task_name: str
    key: str
    token: str
    owned: bool
    state: str
    fingerprint: str
    result: Any = None
    lease_expires_at: datetime | None = None
    row_id: int | None = None  # the ledger row's primary key, when this execution owns it


def fingerprint(args: Any, kwargs: Any) -> str:
    """SHA-256 of the arguments, as canonical JSON (the same values give the same digest)."""
    data = kombu_json.dumps(
        [list(args or ()), dict(kwargs or {})], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(data.encode()).hexdigest()


def claim(
    task_name: str,
    key: str,
    fingerprint: str,
    *,
    task_id: str,
    worker: str,
    lease_seconds: float,
    atomic: bool = False,
    cursor: Any = None,
) -> Claim:
    """Claim ``key`` for one execution of ``task_name``.

    ``atomic=True`` is for a claim inside the task's own transaction: the key is written
    "done" at once, since it commits only together with the task's writes (a rollback takes
    it away). Only the result is then stored (``store_result``), in a table of its own.

    ``cursor``: a cursor of the ledger's database to run the statements on (the execution's,
    kept for its result too); by default one of its own.
    """
    connection = connections[conf.DATABASE]
    now = timezone.now()
    token = uuid.uuid4().hex
    lease_until = None if atomic else now + timedelta(seconds=lease_seconds)
    state = LedgerState.DONE if atomic else LedgerState.RUNNING
    stamp = connection.ops.adapt_datetimefield_value
    # Leases are timed by the database's clock where it has one to give (PostgreSQL): workers
    # on several machines agree on it, whatever their own clocks say. A worker whose clock ran
    # ahead would otherwise take over a live lease, and one whose clock lags would renew a
    # lease into the past.
    db_clock = _db_clock(connection)
    lease: Any = stamp(lease_until)
    insert, upsert = "insert", "claim"
    if db_clock:
        insert, upsert = (
            ("insert", "claim_db") if atomic else ("insert_leased_db", "claim_leased_db")
        )
        lease = None if atomic else lease_seconds
    params = [
        task_name, key, state, fingerprint, token, lease, task_id, worker,
        stamp(now), stamp(now), stamp(now) if atomic else None,
    ]  # fmt: skip
    with _cursor(connection, cursor) as cursor:
        # A new key, the usual case: a plain insert, which a new database session plans in
        # half the time of the upsert. A key that exists (or that a concurrent transaction
        # holds, whose end the insert waits for) is left alone, and the upsert below decides.
        _execute_first(connection, cursor, _statement(connection, insert), params)
        row = cursor.fetchone()
        if row is None:
            upsert_params = [*params, LedgerState.RUNNING] + ([] if db_clock else [stamp(now)])
            cursor.execute(_statement(connection, upsert), upsert_params)
            row = cursor.fetchone()
    if row is not None and row[0] == token:
        return Claim(task_name, key, token, True, state, fingerprint, None, lease_until, row[1])
    keys = IdempotencyKey.objects.using(conf.DATABASE).filter(task_name=task_name, key=key)
    fields = ["state", "fingerprint", "stored__result", "lease_expires_at"]
    if db_clock:
        keys, fields = keys.annotate(db_now=Now()), [*fields, "db_now"]
    existing = keys.values_list(*fields).get()
    held_state, stored_fingerprint, result, lease_expires_at = existing[:4]
    if db_clock and lease_expires_at is not None:
        # The lease keeps the database's time; a deferral counts in this worker's.
        lease_expires_at = now + (lease_expires_at - existing[4])
    return Claim(
        task_name,
        key,
        token,
        False,
        held_state,
        stored_fingerprint,
        decode_result(result),
        lease_expires_at,
    )


def complete(claim: Claim, stored_result: Any) -> bool:
    """Mark the claimed key done with its stored result (from ``encode_result``).

    Returns False if the claim was lost (its lease taken over by another execution).
    """
    connection = connections[conf.DATABASE]
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    with connection.cursor() as cursor:
        cursor.execute(
            _statement(connection, "complete"),
            [LedgerState.DONE, now, now, claim.task_name, claim.key, claim.token],
        )
        if cursor.rowcount != 1:
            return False
        store_result(claim, stored_result, cursor=cursor)
        return True


def store_result(
    claim: Claim, stored_result: Any, *, commit: bool = False, cursor: Any = None
) -> None:
    """Store the result of a claim this execution owns, in the transaction that makes its key
    "done" (atomic mode: the claim's own; lease mode: ``complete()``'s).

    The result goes into a table of its own (``KeyResult``) by an insert of two values,
    the ledger row's primary key and the result: a new database session, which Celery gives
    every task, runs it for less than any write to the ledger's row (an ``UPDATE``, planned like
    a query, or the claim's insert again with an ``ON CONFLICT`` that sets the result), and the
    client sends two values instead of twelve. A result of None stores nothing.

    ``commit=True`` says this is the last statement of an outermost transaction, committed
    right after. Where the driver sends it as plain text (psycopg 3's client-side binding,
    Django's default) the COMMIT travels with it, one round trip to the database instead of
    two; Django's own commit then finds nothing left to commit. An error in the statement
    leaves the transaction uncommitted, rolled back as usual.
    """
    if stored_result is None:
        return  # a key without a stored result gives None
    if claim.row_id is None:
        raise ValueError("store_result() takes the claim of the execution that owns the key")
    connection = connections[conf.DATABASE]
    with _cursor(connection, cursor) as cursor:
        sql = _statement(connection, "store_result")
        if commit and _commits_with_statement(cursor):
            sql += "; COMMIT"
        cursor.execute(
            sql, [claim.row_id, _RESULT_FIELD.get_db_prep_save(stored_result, connection)]
        )


def _cursor(connection: Any, cursor: Any) -> Any:
    """``cursor`` as a context manager that leaves it open, or a new cursor of ``connection``."""
    return connection.cursor() if cursor is None else contextlib.nullcontext(cursor)


def _commits_with_statement(cursor: Any) -> bool:
    """Can a statement on this cursor end with "; COMMIT"? Only psycopg 3's client-side
    binding cursors send several statements in one string (the simple query protocol), and
    psycopg 3 asks the server, not its own bookkeeping, whether a transaction is open."""
    return (
        cursor.db.vendor == "postgresql"
        and _ClientCursor is not None
        and isinstance(cursor.cursor, _ClientCursor)
    )


def _execute_first(connection: Any, cursor: Any, sql: str, params: list[Any]) -> None:
    """Execute the first statement of the transaction Django's ``atomic()`` just opened.

    psycopg 3 starts a transaction by sending its BEGIN on its own, one round trip, before
    the first statement. Where it can, this statement carries the BEGIN instead ("BEGIN ...;
    INSERT ...", psycopg's own BEGIN with its isolation level and access mode): a round trip
    less for every execution, whose connection is new when Celery closes it around each task.
    psycopg sends no BEGIN of its own while it counts as in autocommit, which it does for this
    one statement; then it is told again that it is not, as Django left it. Elsewhere (another
    driver, server-side binding, a transaction already under way) the statement goes as usual.
    """
    raw = connection.connection
    begin = _begin_statement(connection, cursor, raw)
    if begin is None:
        cursor.execute(sql, params)
        return
    raw.autocommit = True
    try:
        cursor.execute(f"{begin}; {sql}", params)
    finally:
        # The server has the transaction open now (or, if the statement failed, open and
        # failed, for Django's rollback): psycopg refuses to switch autocommit off in one,
        # so its flag is set back directly.
        raw._autocommit = False
    cursor.nextset()  # past BEGIN's empty result, to the statement's


def _begin_statement(connection: Any, cursor: Any, raw: Any) -> str | None:
    """psycopg's BEGIN for the transaction about to start on ``raw``, if this statement can
    carry it: a client-side binding cursor, an outermost ``atomic()`` with nothing sent yet."""
    if not (
        _commits_with_statement(cursor)
        and connection.in_atomic_block
        and not connection.savepoint_ids
        and raw.info.transaction_status == _IDLE
        and not raw.autocommit
        and hasattr(raw, "_autocommit")
        and hasattr(raw, "_get_tx_start_command")
    ):
        return None
    return str(raw._get_tx_start_command().decode())


def _statement(connection: Any, name: str) -> str:
    """The ledger's hot statements, built once per database vendor (plain SQL, no ORM)."""
    cache_key = (connection.vendor, name)
    if cache_key not in _STATEMENTS:
        q = connection.ops.quote_name
        table = q(IdempotencyKey._meta.db_table)
        _STATEMENTS[cache_key] = _BUILDERS[name](q, table)
    return _STATEMENTS[cache_key]


#: PostgreSQL's clock, for leases: the time of the statement, and a lease of %s seconds from it.
_DB_NOW = "statement_timestamp()"
_DB_LEASE = f"({_DB_NOW} + make_interval(secs => %s))"


def _db_clock(connection: Any) -> bool:
    """Whether leases on ``connection`` are timed by the database's clock (PostgreSQL's)."""
    return bool(connection.vendor == "postgresql")


def _insert_values(q: Any, table: str, lease: str = "%s") -> str:
    return f"""
        INSERT INTO {table} ({q("task_name")}, {q("key")}, {q("state")}, {q("fingerprint")}, {q("token")},
                             {q("lease_expires_at")}, {q("attempts")}, {q("task_id")}, {q("worker")},
                             {q("created_at")}, {q("updated_at")}, {q("completed_at")})
        VALUES (%s, %s, %s, %s, %s, {lease}, 1, %s, %s, %s, %s, %s)
        ON CONFLICT ({q("task_name")}, {q("key")})"""


def _insert_sql(q: Any, table: str, lease: str = "%s") -> str:
    return f"{_insert_values(q, table, lease)} DO NOTHING RETURNING {q('token')}, {q('id')}"


def _claim_sql(q: Any, table: str, lease: str = "%s", now: str = "%s") -> str:
    return f"""{_insert_values(q, table, lease)} DO UPDATE SET
            {q("state")} = EXCLUDED.{q("state")},
            {q("completed_at")} = EXCLUDED.{q("completed_at")},
            {q("token")} = EXCLUDED.{q("token")},
            {q("lease_expires_at")} = EXCLUDED.{q("lease_expires_at")},
            {q("attempts")} = {table}.{q("attempts")} + 1,
            {q("task_id")} = EXCLUDED.{q("task_id")},
            {q("worker")} = EXCLUDED.{q("worker")},
            {q("updated_at")} = EXCLUDED.{q("updated_at")}
        WHERE {table}.{q("state")} = %s
          AND {table}.{q("lease_expires_at")} <= {now}
          AND {table}.{q("fingerprint")} = EXCLUDED.{q("fingerprint")}
        RETURNING {q("token")}, {q("id")}
    """


def _complete_sql(q: Any, table: str) -> str:
    return (
        f"UPDATE {table} SET {q('state')} = %s, {q('completed_at')} = %s, "
        f"{q('updated_at')} = %s, {q('lease_expires_at')} = NULL "
        f"WHERE {q('task_name')} = %s AND {q('key')} = %s AND {q('token')} = %s"
    )


def _store_result_sql(q: Any, table: str) -> str:
    # Once per key: only the execution that owns it and finishes writes its result. A row there
    # already is one left by a key deleted outside pruning, whose id was given out again (a
    # sequence reset, a partial restore): the new key's result replaces it, and the task does
    # not fail on it (33 us more of a new session's CPU than the plain insert).
    results, ledger_id, result = q(KeyResult._meta.db_table), q("ledger_id"), q("result")
    return (
        f"INSERT INTO {results} ({ledger_id}, {result}) VALUES (%s, %s) "
        f"ON CONFLICT ({ledger_id}) DO UPDATE SET {result} = EXCLUDED.{result}"
    )


_BUILDERS: dict[str, Callable[[Any, str], str]] = {
    "insert": _insert_sql,
    "insert_leased_db": lambda q, table: _insert_sql(q, table, _DB_LEASE),
    "claim": _claim_sql,
    "claim_db": lambda q, table: _claim_sql(q, table, now=_DB_NOW),
    "claim_leased_db": lambda q, table: _claim_sql(q, table, _DB_LEASE, _DB_NOW),
    "complete": _complete_sql,
    "store_result": _store_result_sql,
}
_STATEMENTS: dict[tuple[str, str], str] = {}
_RESULT_FIELD = KeyResult._meta.get_field("result")


def renew(claim: Claim, lease_seconds: float) -> bool:
    """Extend a lease-mode claim by ``lease_seconds`` from now; False if it was lost."""
    now = timezone.now()
    until: Any = now + timedelta(seconds=lease_seconds)
    if _db_clock(connections[conf.DATABASE]):
        until = Now() + timedelta(seconds=lease_seconds)  # see claim()
    updated = (
        IdempotencyKey.objects.using(conf.DATABASE)
        .filter(
            task_name=claim.task_name, key=claim.key, token=claim.token, state=LedgerState.RUNNING
        )
        .update(lease_expires_at=until, updated_at=now)
    )
    return updated == 1


def release(claim: Claim) -> None:
    """End a lease-mode claim without completing it, so the next delivery may run at once."""
    now = timezone.now()
    IdempotencyKey.objects.using(conf.DATABASE).filter(
        task_name=claim.task_name, key=claim.key, token=claim.token, state=LedgerState.RUNNING
    ).update(
        lease_expires_at=Now() if _db_clock(connections[conf.DATABASE]) else now, updated_at=now
    )


def prune(*, limit: int, now: datetime | None = None) -> int:
    """Delete up to ``limit`` keys past ``RELIABLE_TASKS_IDEMPOTENCY_RETENTION``.

    Done keys count from their completion; abandoned running keys from their lease's end.
    """
    return pruning.delete_batch(_prunable(now), limit, dependents=_delete_results)


def _delete_results(key_ids: list[int]) -> None:
    """Delete the stored results of the keys about to be pruned (only done keys have one)."""
    KeyResult.objects.using(conf.DATABASE).filter(key_id__in=key_ids).delete()


def prunable(*, now: datetime | None = None) -> int:
    """How many keys ``prune`` would delete in all (counted over the ledger's indexes)."""
    return pruning.count(_prunable(now))


def _prunable(now: datetime | None) -> tuple[QuerySet[IdempotencyKey], QuerySet[IdempotencyKey]]:
    cutoff = (now or timezone.now()) - conf.IDEMPOTENCY_RETENTION
    keys = IdempotencyKey.objects.using(conf.DATABASE)
    return (
        keys.filter(state=LedgerState.DONE, completed_at__lt=cutoff),
        keys.filter(state=LedgerState.RUNNING, lease_expires_at__lt=cutoff),
    )


# --------------------------------------------------------------------------------------------
# Results


def encode_result(task_name: str, result: Any) -> Any:
    """The result as stored: kombu's JSON (datetimes, UUIDs, decimals survive), or None if too big."""
    if _small_scalar(result) and conf.MAX_RESULT_BYTES >= _SMALL_SCALAR_BYTES:
        return result  # what the round trip through JSON gives back, without it
    try:
        text = kombu_json.dumps(result)
    except (TypeError, ValueError):
        logger.warning(
            "task %s returned a %s, which JSON cannot encode; duplicates will get None",
            task_name,
            type(result).__name__,
        )
        return None
    if len(text.encode()) > conf.MAX_RESULT_BYTES:
        logger.warning(
            "task %s returned %d bytes, above RELIABLE_TASKS_MAX_RESULT_BYTES = %d; duplicates will get None",
            task_name, len(text.encode()), conf.MAX_RESULT_BYTES,
        )  # fmt: skip
        return None
    if "\\u0000" in text:
        logger.warning(
            "task %s returned a NUL character, which the database cannot store; duplicates will get None",
            task_name,
        )
        return None
    return json.loads(text)


#: JSON's longest text of a ``_small_scalar``: "false", or 18 digits and a sign.
_SMALL_SCALAR_BYTES = 19


def _small_scalar(result: Any) -> bool:
    """None, a bool, or an int of at most 18 digits: JSON gives it back as it was."""
    kind = type(result)
    return result is None or kind is bool or (kind is int and -(10**18) < result < 10**18)


def decode_result(stored: Any) -> Any:
    """The task's result from its stored form (see ``encode_result``)."""
    if stored is None:
        return None
    return kombu_json.loads(json.dumps(stored))


# --------------------------------------------------------------------------------------------
# The cache of done keys


@dataclass
class CacheWrites:
    """What one execution writes to the cache as it ends, sent together in one round trip.

    ``done`` is the key to remember as done (task name, key, fingerprint, stored result);
    ``increments`` are metric counters to add to.
    """

    task_id: str
    done: tuple[str, str, str, Any] | None = None
    increments: dict[str, int] = field(default_factory=dict)
    open: bool = True
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Marks of other executions of the task id found at the start; ``stale`` ones (left by
    #: executions that died, once counted) are removed with this execution's own.
    seen: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    #: The done key refills the cache from the database (a duplicate found it there): the
    #: duplicates right behind it need it, so it is sent before the execution ends.
    refill: bool = False

    def add(self, amounts: dict[str, int]) -> None:
        """Add to the metric counters this execution sends as it ends."""
        for name, amount in amounts.items():
            self.increments[name] = self.increments.get(name, 0) + amount


class DoneCache:
    """Remembers done keys in the Django cache; every failure falls back to the database.

    It also marks each execution as started until it ends (``reliable_tasks:started:<task id>``),
    so that a redelivered message tells whether an earlier delivery started and never finished
    (its worker died) or was only prefetched by a worker that died. The mark is read and set in
    the round trip that reads the done key, and cleared in the one that ends the execution. A
    cache each process keeps to itself (``LocMemCache``, ``DummyCache``) holds no marks: the
    process that dies takes them along.
    """

    #: Set in worker processes (``worker_init``): executions that succeed end without waiting.
    in_background = False

    def __init__(self) -> None:
        self._down = False
        #: Whether Redis runs the start script (False once it refused it).
        self._scripts = True
        self._background = BackgroundWrites(self.write)

    def _cache_key(self, task_name: str, key: str) -> str:
        digest = hashlib.sha256(f"{task_name}\0{key}".encode()).hexdigest()
        return f"reliable_tasks:done:{digest}"

    @staticmethod
    def _mark_key(task_id: str) -> str:
        return f"reliable_tasks:started:{task_id}"

    def get(self, task_name: str, key: str) -> tuple[str, Any] | None:
        """``(fingerprint, stored result)`` of a done key, or None when not known here."""
        alias = conf.CACHE_ALIAS
        if alias is None:
            return None
        try:
            value = caches[alias].get(self._cache_key(task_name, key))
        except Exception as exc:  # noqa: BLE001 - a cache outage must not fail the task
            self._failed(exc)
            return None
        self._recovered()
        return _done_value(value)

    def start(
        self, task_name: str, key: str, writes: CacheWrites, *, redelivered: bool = True
    ) -> tuple[tuple[str, Any] | None, bool | None]:
        """At an execution's start: the done key as ``get()`` gives it, and whether an earlier
        delivery of this task id started and did not end (None when the cache cannot say, or
        was not asked: a first delivery, ``redelivered=False``, has no earlier one to count).
        Marks this execution as started."""
        try:
            alias = conf.CACHE_ALIAS
            if alias is None:
                return None, None
            cache = caches[alias]
            if not shared(cache):
                # The process that died took its marks along: counting cannot tell.
                return self.get(task_name, key), None
            done_key, mark = self._cache_key(task_name, key), self._mark_key(writes.task_id)
            timeout = int(conf.IDEMPOTENCY_RETENTION.total_seconds())
            client = redis_client(cache)
            if client is not None:
                # A set of the executions in progress: one that ends removes only itself, and
                # Redis drops the set when it is empty.
                raw, others = self._start_in_redis(
                    client,
                    cache.make_key(done_key),
                    cache.make_key(mark),
                    writes.token,
                    timeout,
                    redelivered,
                )
                value = None if raw is None else cache.client.decode(raw)  # type: ignore[attr-defined]
                interrupted = None
                if redelivered:
                    others = others or []
                    writes.seen = [m.decode() if isinstance(m, bytes) else str(m) for m in others]
                    interrupted = bool(others)
            else:
                value = cache.get(done_key)
                interrupted = cache.get(mark) is not None if redelivered else None
                cache.set(mark, writes.token, timeout)
        except Exception as exc:  # noqa: BLE001 - a cache outage must not fail the task
            self._failed(exc)
            return None, None
        self._recovered()
        return _done_value(value), interrupted

    def _start_in_redis(
        self, client: Any, done: str, mark: str, token: str, timeout: int, redelivered: bool
    ) -> tuple[bytes | None, list[Any] | None]:
        """The done key's raw value and (``redelivered``) the marks found; adds this mark.

        One command, the start script, where Redis runs scripts; a server that refuses them
        (an ACL without ``@scripting``, EVALSHA renamed away) gets the same commands in a
        pipeline, from then on in this process.
        """
        if self._scripts:
            try:
                try:
                    done_value, others = client.evalsha(
                        _START_SHA, 2, done, mark, token, timeout, int(redelivered)
                    )
                except redis_exceptions.NoScriptError:
                    client.script_load(_START_SCRIPT)  # a restarted or flushed server
                    done_value, others = client.evalsha(
                        _START_SHA, 2, done, mark, token, timeout, int(redelivered)
                    )
                return done_value, others
            except redis_exceptions.ResponseError as exc:
                self._scripts = False
                logger.info(
                    "Redis refused the ledger's start script (%s); sending its commands in a "
                    "pipeline instead",
                    exc,
                )
        pipe = client.pipeline(transaction=False)
        pipe.get(done)
        if redelivered:
            pipe.smembers(mark)
        pipe.sadd(mark, token)
        pipe.expire(mark, timeout)
        done_value, *replies = pipe.execute()
        return done_value, replies[0] if redelivered else None

    def mark_lost(self, task_id: str) -> None:
        """Mark an execution of ``task_id`` as started and not ended, for one whose process is
        being ended under it (a hard time limit: SIGTERM, which lets it clear its own mark,
        then SIGKILL). Its redelivery then counts a lost delivery."""
        try:
            alias = conf.CACHE_ALIAS
            if alias is None:
                return
            cache = caches[alias]
            if not shared(cache):
                return  # a redelivery counts as lost without the cache's word anyway
            mark, token = self._mark_key(task_id), f"ended:{uuid.uuid4().hex}"
            timeout = int(conf.IDEMPOTENCY_RETENTION.total_seconds())
            client = redis_client(cache)
            if client is None:
                cache.set(mark, token, timeout)  # the execution's own clear then leaves it
            else:
                key = cache.make_key(mark)
                client.pipeline(transaction=False).sadd(key, token).expire(key, timeout).execute()
        except Exception as exc:  # noqa: BLE001 - a cache outage must not fail the worker
            self._failed(exc)
            return
        self._recovered()

    def remember(
        self,
        writes: CacheWrites | None,
        task_name: str,
        key: str,
        fingerprint: str,
        stored_result: Any,
        *,
        refill: bool = False,
    ) -> None:
        """Remember a done key: with the execution's last writes if it is still running.

        ``refill``: the key was found in the database by a duplicate; the writes go before the
        execution ends, even in a worker (``finish``)."""
        if writes is not None and writes.open:
            writes.done = (task_name, key, fingerprint, stored_result)
            writes.refill = writes.refill or refill
        else:
            self.set(task_name, key, fingerprint, stored_result)

    def finish(self, writes: CacheWrites, *, wait: bool = True) -> None:
        """End an execution: clear its started mark, remember its done key, add its metrics.

        ``wait=False`` (an execution that succeeded, in a worker process): the writes go from
        a thread of this process, so the task's end does not wait for the cache. A failed
        execution's writes are sent at once: its retry may start before a thread would have
        cleared its mark, and would count it as a crash.
        """
        writes.open = False
        if not wait and not writes.refill and self.in_background:
            self._background.put(writes)
        else:
            self.write([writes])

    def flush(self, timeout: float = 5.0) -> None:
        """Send every write ``finish()`` left to the thread, waiting ``timeout`` at most."""
        self._background.flush(timeout)

    def write(self, batch: list[CacheWrites]) -> None:
        """Send the end-of-execution writes of ``batch``, in one round trip with Redis."""
        try:
            alias = conf.CACHE_ALIAS
            if alias is None:
                return
            cache = caches[alias]
            timeout = int(conf.IDEMPOTENCY_RETENTION.total_seconds())
            increments: Counter[str] = Counter()
            for writes in batch:
                increments.update(writes.increments)
            client = redis_client(cache)
            if client is None:
                from . import metrics

                for writes in batch:
                    mark = self._mark_key(writes.task_id)
                    if shared(cache) and cache.get(mark) == writes.token:
                        cache.delete(mark)
                    if writes.done is not None:
                        self.set(*writes.done)
                metrics.add(dict(increments))
                return
            pipe = client.pipeline(transaction=False)
            for writes in batch:
                mark = cache.make_key(self._mark_key(writes.task_id))
                pipe.srem(mark, writes.token, *writes.stale)
                if writes.done is not None:
                    task_name, key, fingerprint, stored_result = writes.done
                    value = cache.client.encode((fingerprint, stored_result))  # type: ignore[attr-defined]
                    pipe.set(cache.make_key(self._cache_key(task_name, key)), value, ex=timeout)
            for name, amount in increments.items():
                pipe.incrby(cache.make_key(name), amount)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - a cache outage must not fail the task
            self._failed(exc)
            return
        self._recovered()

    def set(self, task_name: str, key: str, fingerprint: str, stored_result: Any) -> None:
        alias = conf.CACHE_ALIAS
        if alias is None:
            return
        timeout = conf.IDEMPOTENCY_RETENTION.total_seconds()
        try:
            caches[alias].set(
                self._cache_key(task_name, key), (fingerprint, stored_result), timeout
            )
        except Exception as exc:  # noqa: BLE001 - a cache outage must not fail the task
            self._failed(exc)
            return
        self._recovered()

    def _failed(self, exc: Exception) -> None:
        if not self._down:
            self._down = True
            logger.warning(
                "idempotency cache %r unavailable (%s); checking keys in the database until it returns",
                conf.CACHE_ALIAS, exc,
            )  # fmt: skip

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            logger.info("idempotency cache %r is back", conf.CACHE_ALIAS)


class BackgroundWrites:
    """A thread of this process that sends what ``finish()`` hands it, in batches.

    The cache is an accelerator: until a batch is sent, a duplicate of the key is answered by
    the database instead. A worker process that dies takes its unsent batch along; one that
    shuts down sends it (``flush``). Started on first use in each process, since a forked
    child (Celery's prefork pool) inherits no threads. The queue is a ``queue.Queue``, which
    eventlet and gevent make green; when it is full (the cache hangs) or no thread can start,
    the writes are sent at once, as without the thread.
    """

    #: Writes sent in one round trip at most.
    BATCH = 200
    #: How long the first write of a batch waits for others (seconds). A busy worker process
    #: ends several executions meanwhile: their metrics go as one increment each, not one per
    #: execution.
    LINGER = 0.1
    #: Writes waiting at most; beyond, an execution sends its own.
    QUEUED = 10_000

    def __init__(self, send: Callable[[list[CacheWrites]], None]) -> None:
        self._send = send
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """A new process (or a forked child) starts with nothing queued and no thread."""
        self._queue: queue.Queue[CacheWrites | None] = queue.Queue(self.QUEUED)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Ends the thread's linger early: a full batch waits, or a flush.
        self._wake = threading.Event()

    def put(self, writes: CacheWrites) -> None:
        with self._lock:
            try:
                if self._thread is None or not self._thread.is_alive():
                    thread = threading.Thread(
                        target=self._run, args=(self._queue, self._wake),
                        name="reliable_tasks-cache", daemon=True,
                    )  # fmt: skip
                    thread.start()
                    self._thread = thread
                self._queue.put_nowait(writes)
                if self._queue.qsize() >= self.BATCH:
                    self._wake.set()
                return
            except (RuntimeError, queue.Full):
                pass  # no thread (interpreter shutting down), or the cache is not keeping up
        self._send([writes])

    def flush(self, timeout: float) -> None:
        """Send what is queued and stop the thread (the next ``put`` starts another)."""
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            # The thread stops at the end of its queue; later writes go to a new one.
            stop, self._queue, self._thread = self._queue, queue.Queue(self.QUEUED), None
            wake, self._wake = self._wake, threading.Event()
        stop.put(None)
        wake.set()
        thread.join(timeout)

    def _run(self, pending: queue.Queue[CacheWrites | None], wake: threading.Event) -> None:
        while True:
            first = pending.get()
            stop = first is None
            batch = [] if first is None else [first]
            if not stop:
                stop = self._take(pending, batch)
            if not stop and len(batch) < self.BATCH:
                # The writes that come meanwhile join the batch. They are taken when the linger
                # ends, not one by one as they come: waking this thread for each would cost
                # the executions more than the batch saves them.
                wake.clear()
                wake.wait(self.LINGER)
                stop = self._take(pending, batch)
            if batch:
                self._send(batch)  # never raises: failures are logged as a cache outage
            if stop:
                return

    def _take(self, pending: queue.Queue[CacheWrites | None], batch: list[CacheWrites]) -> bool:
        """Move the queued writes into ``batch``, up to ``BATCH``; True at a flush's end mark."""
        while len(batch) < self.BATCH:
            try:
                writes = pending.get_nowait()
            except queue.Empty:
                return False
            if writes is None:
                return True
            batch.append(writes)
        return False


#: An execution's start in one round trip and one command: the done key, the marks of earlier
#: executions of the task id (only for a redelivery, ARGV[3] = 1), and this execution's mark
#: added to them with the set's expiry renewed. A nil GET comes back as nil.
_START_SCRIPT = """
local done = redis.call('GET', KEYS[1])
local seen = false
if ARGV[3] == '1' then seen = redis.call('SMEMBERS', KEYS[2]) end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {done, seen}
"""
_START_SHA = hashlib.sha1(_START_SCRIPT.encode(), usedforsecurity=False).hexdigest()


def _done_value(value: Any) -> tuple[str, Any] | None:
    """A done key's cached value, or None (a miss: the database answers) for one that is not
    the pair this version writes (an older format, another writer's)."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    stored_fingerprint, stored = value
    return stored_fingerprint, stored


#: Django's caches that each process keeps to itself: no use for what workers must share.
PER_PROCESS_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)


def shared(cache: Any) -> bool:
    """Whether every process sees the same cache (not one of ``PER_PROCESS_CACHES``)."""
    return f"{type(cache).__module__}.{type(cache).__qualname__}" not in PER_PROCESS_CACHES


def redis_client(cache: Any) -> Any:
    """The Redis client under a django-redis cache, for pipelines; None for other caches, and
    for django-redis's sharded client, whose keys live on several servers."""
    client = getattr(cache, "client", None)
    if client is None or isinstance(client, ShardClient) or not hasattr(client, "get_client"):
        return None
    return client.get_client(write=True)


done_cache = DoneCache()


def connect_worker_signals() -> None:
    """In Celery workers, executions that succeed end without waiting for the cache."""
    from celery import signals

    def in_worker(**kwargs: Any) -> None:
        done_cache.in_background = True

    def shutting_down(**kwargs: Any) -> None:
        done_cache.flush()

    signals.worker_init.connect(in_worker, weak=False, dispatch_uid="rt-cache-background")
    signals.worker_process_shutdown.connect(
        shutting_down, weak=False, dispatch_uid="rt-cache-flush-process"
    )
    signals.worker_shutdown.connect(shutting_down, weak=False, dispatch_uid="rt-cache-flush")
