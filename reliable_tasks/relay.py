"""The relay: claim due outbox rows, publish them with publisher confirms, mark them dispatched.

One batch is: claim up to ``RELIABLE_TASKS_RELAY_BATCH_SIZE`` due rows (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so several relays share the work), publish them all, wait once for
the broker's confirms of the whole batch, then mark the confirmed rows dispatched in one
statement. A row is marked only after RabbitMQ confirmed it; a nacked or returned message
stays pending and is tried again after a backoff. If the relay dies mid-batch, the claim's
transaction rolls back and the rows are published again: at least once, never lost.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, cast

import amqp
from celery import Celery
from django.db import DatabaseError, connections, transaction
from django.db.models import F, Min, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from kombu import Connection, Producer, Queue

from . import amqp_frames, dead, ledger, log, outbox
from .conf import conf
from .models import OutboxMessage, OutboxStatus, RelayHeartbeat
from .retry import backoff

logger = logging.getLogger("reliable_tasks.relay")

NOTIFY_CHANNEL = "reliable_tasks_outbox"
#: How ``last_error`` begins for a row the broker refused: a channel error as it was published,
#: a missing exchange, a queue the broker would not declare.
REFUSED = "refused by the broker: "
PERSISTENT = 2

_OUTBOX = OutboxMessage._meta.db_table
# The headers' 'expires', read by the database: a row with its header table needs nothing else
# of its headers, whose JSON then stays in the database (decoding it cost more than the claim).
_EXPIRES = {
    "postgresql": "headers->>'expires'",
    "sqlite": "json_extract(headers, '$.expires')",
}


def _claim_sql(skip_locked: bool, vendor: str) -> str:
    """Due pending rows in due order (the partial index ``rt_outbox_pending_due``), with the
    columns of ``Row`` in its order.

    On PostgreSQL the rows stay locked until the batch is marked, and SKIP LOCKED lets other
    relays take the next rows instead of waiting. SQLite has no row locks and one relay.
    """
    expires = _EXPIRES.get(vendor)
    headers = "headers" if expires is None else "CASE WHEN header_table IS NULL THEN headers END"
    columns = (
        "id", "task_id", "task_name", "queue", "exchange", "routing_key", headers,
        expires or "NULL", "properties", "body", "content_type", "content_encoding",
        # '%%': the driver's placeholders are %s, and a literal % is written twice.
        "publish_attempts", "header_table", f"last_error LIKE '{REFUSED}%%'",
    )  # fmt: skip
    sql = (
        f"SELECT {', '.join(columns)} FROM {_OUTBOX} WHERE status = %s AND due_at <= %s "
        "ORDER BY due_at, id LIMIT %s"
    )
    return sql + " FOR UPDATE SKIP LOCKED" if skip_locked else sql


_MARK_DISPATCHED_SQL = (
    f"UPDATE {_OUTBOX} SET status = '{OutboxStatus.DISPATCHED.value}', dispatched_at = %s, "
    "publish_attempts = publish_attempts + 1, last_error = '' WHERE id = ANY(%s)"
)


def _json(value: Any) -> Any:
    # Django's database backends hand JSON columns over as text and leave decoding to the field.
    return json.loads(value) if isinstance(value, str | bytes) else value


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    task_id: str
    task_name: str
    queue: str
    exchange: str
    routing_key: str
    #: None when ``header_table`` holds them.
    headers: dict[str, Any] | None
    #: The headers' 'expires' (ISO 8601), for the message's TTL.
    expires: str | None
    properties: dict[str, Any]
    body: str
    content_type: str
    content_encoding: str
    publish_attempts: int
    header_table: bytes | None = None
    #: The broker refused it when it was last tried (``last_error`` begins with ``REFUSED``).
    refused: bool = False

    def header_dict(self) -> dict[str, Any]:
        if self.headers is not None:
            return self.headers
        assert self.header_table is not None  # the claim leaves out only what the table holds
        return amqp_frames.read_table(self.header_table)


@dataclass
class BatchOutcome:
    """Which rows of a batch the broker confirmed, and why the others failed."""

    confirmed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


class ConfirmTimeout(Exception):
    """The broker did not confirm a batch in ``RELIABLE_TASKS_RELAY_CONFIRM_TIMEOUT``.

    ``outcome`` is what the broker settled in time: the rows it confirmed (RabbitMQ has them:
    they must not be published again), and those it nacked or returned, or that could not be
    built. ``unconfirmed`` are the rows still waiting for their confirm.
    """

    def __init__(
        self, message: str, outcome: BatchOutcome | None = None, unconfirmed: Sequence[int] = ()
    ) -> None:
        super().__init__(message)
        self.outcome = outcome if outcome is not None else BatchOutcome()
        self.unconfirmed = list(unconfirmed)


def get_celery_app() -> Celery:
    """The Celery app named by ``RELIABLE_TASKS_CELERY_APP``, else Celery's current app."""
    path = conf.CELERY_APP
    if path is None:
        from celery import current_app

        return cast(Celery, current_app._get_current_object())  # type: ignore[attr-defined]
    from django.utils.module_loading import import_string

    return import_string(path.replace(":", "."))  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Publishing


class Publisher:
    """Publishes batches on one broker connection and reports what the broker confirmed."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        # py-amqp's confirm_publish (which Celery's docs recommend) would wait for each message's
        # confirm inside basic_publish; the relay confirms a whole batch at once on its own.
        self.connection: Connection = app.connection_for_write(
            transport_options={"confirm_publish": False}
        )
        self.connection.connect()
        # A py-amqp channel on RabbitMQ (confirms), a virtual kombu channel elsewhere.
        self.channel: Any = self.connection.channel()
        self._declared: set[str] = set()
        self._exchanges: set[str] = set()
        self._confirms = isinstance(self.channel, amqp.Channel)
        if self._confirms:
            self._setup_confirms()
        else:
            self.producer = Producer(self.channel, auto_declare=False)
        self.channel_errors: tuple[type[BaseException], ...] = tuple(self.connection.channel_errors)
        self.errors: tuple[type[BaseException], ...] = (
            *self.connection.connection_errors,
            *self.channel_errors,
            OSError,
            ConfirmTimeout,
        )

    def _setup_confirms(self) -> None:
        self.channel.confirm_select()
        self._next_tag = 1
        self._pending: dict[int, int] = {}  # delivery tag -> outbox row id
        self._outcome = BatchOutcome()
        self._returned: set[str] = set()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)

    def close(self) -> None:
        try:
            self.connection.release()
        except Exception:
            logger.debug("error while closing the broker connection", exc_info=True)

    def publish_batch(self, rows: Sequence[Row], timeout: float) -> BatchOutcome:
        """Publish ``rows``; return once every one is confirmed, nacked or returned."""
        if not self._confirms:
            return self._publish_unconfirmed(rows)
        outcome = self._outcome = BatchOutcome()
        self._returned = set()
        # Queues and exchanges first: each is a round trip to the broker, which must not wait
        # behind the corked socket below. Queues before exchanges: declaring a queue declares
        # its exchange too, which a fresh broker may not have yet.
        undeclared = self._declare_queues({row.queue for row in rows})
        missing = self._missing_exchanges({row.exchange for row in rows})
        writer = amqp_frames.PublishWriter(self.connection.connection, self.channel.channel_id)
        with self._corked():
            for row in rows:
                if row.exchange in missing:
                    outcome.failed[row.id] = f"{REFUSED}{missing[row.exchange]}"
                    continue
                if row.queue in undeclared:
                    outcome.failed[row.id] = undeclared[row.queue]
                    continue
                try:
                    message = self._message(row)
                except Exception as exc:  # noqa: BLE001 - one bad row must not stop the batch
                    outcome.failed[row.id] = f"cannot build the message: {_unbuildable(exc)}"
                    continue
                try:
                    writer.add(message, row.exchange, row.routing_key, mandatory=True)
                except amqp_frames.CannotFrame as exc:
                    # Nothing of it was framed; the broker's errors from sending are not this.
                    outcome.failed[row.id] = f"cannot build the message: {exc}"
                    continue
                self._pending[self._next_tag] = row.id
                self._next_tag += 1
            writer.send()
        deadline = time.monotonic() + timeout
        while self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out(rows, outcome, timeout)
            try:
                self.connection.drain_events(timeout=remaining)
            except TimeoutError:
                continue
        return self._settled(rows, outcome)

    def _timed_out(self, rows: Sequence[Row], outcome: BatchOutcome, timeout: float) -> NoReturn:
        """Raise ConfirmTimeout with what the broker settled in time."""
        # Their confirms may still come, on a connection the relay is about to drop: forget them,
        # so that nothing waits for them again.
        pending, self._pending = list(self._pending.values()), {}
        settled = self._settled(rows, outcome)
        unconfirmed = [row_id for row_id in pending if row_id not in settled.failed]
        raise ConfirmTimeout(
            f"{len(unconfirmed)} of {len(rows)} messages not confirmed within {timeout:g} s",
            settled,
            unconfirmed,
        )

    def _settled(self, rows: Sequence[Row], outcome: BatchOutcome) -> BatchOutcome:
        """The outcome with the returned messages' rows failed, not confirmed (RabbitMQ sends a
        return before the message's confirm)."""
        if self._returned:
            # Rare: find the returned messages' rows only when there are some.
            for row in rows:
                if _correlation_id(row) in self._returned:
                    outcome.failed[row.id] = "returned by the broker as unroutable"
                    # Its queue may have been deleted since it was declared: declare it again.
                    self._declared.discard(row.queue)
        returned = set(outcome.failed)
        outcome.confirmed = [i for i in outcome.confirmed if i not in returned]
        return outcome

    @contextmanager
    def _corked(self) -> Iterator[None]:
        """Hold back part-filled TCP segments while a batch is written (Linux's TCP_CORK).

        The batch goes out in writes of ``PublishWriter.SEND_AT`` bytes; corked, the end of one
        write and the start of the next share a segment instead of each leaving a short one.
        Uncorking sends what is left, before the relay waits for the confirms.
        """
        sock = getattr(self.connection.connection, "sock", None)
        cork = getattr(socket, "TCP_CORK", None)
        if sock is None or cork is None:
            yield
            return
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, cork, 0)

    def _publish_unconfirmed(self, rows: Sequence[Row]) -> BatchOutcome:
        """Transports without confirms (the embedded fallback): a returned call is a write."""
        outcome = BatchOutcome()
        for row in rows:
            self._declare(row.queue)
            encoding = _content_encoding(row)
            try:
                message_props = _properties(row)
                if "expiration" in message_props:  # kombu takes seconds and writes milliseconds
                    message_props["expiration"] = int(message_props["expiration"]) / 1000
                headers = row.header_dict()
                body = row.body.encode(encoding)
            except Exception as exc:  # noqa: BLE001 - one bad row must not stop the batch
                outcome.failed[row.id] = f"cannot build the message: {_unbuildable(exc)}"
                continue
            self.producer.publish(
                body,
                exchange=row.exchange,
                routing_key=row.routing_key,
                content_type=row.content_type,
                content_encoding=encoding,
                headers=headers,
                **message_props,
            )
            outcome.confirmed.append(row.id)
        return outcome

    def _missing_exchanges(self, names: set[str]) -> dict[str, str]:
        """Exchanges of a batch that do not exist, with the broker's words.

        Publishing to a missing exchange closes the channel and fails the whole batch, so each
        exchange is probed once per connection, on a channel of its own, before it is used.
        """
        missing: dict[str, str] = {}
        for name in names - self._exchanges - {""}:
            if len(name.encode("utf-8", "surrogatepass")) > 255:
                continue  # py-amqp cannot write the probe; the writer fails its rows alone
            try:
                with self._side_channel() as probe:
                    probe.exchange_declare(name, "direct", passive=True)
                self._exchanges.add(name)
            except self.channel_errors as exc:
                missing[name] = str(exc)
        return missing

    @contextmanager
    def _side_channel(self) -> Iterator[Any]:
        """A channel of its own for a check the broker may answer by closing it."""
        channel: Any = self.connection.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(*self.errors):
                channel.close()

    def _declare_queues(self, names: set[str]) -> dict[str, str]:
        """Declare the batch's queues this connection has not declared; return why any could
        not be, as their rows' ``last_error``.

        Each is declared on a channel of its own, as exchanges are probed: a queue the broker
        refuses to declare (one that exists with other arguments, ``PRECONDITION_FAILED``)
        closes that channel, and its rows are set aside, not the batch failed.
        """
        failed: dict[str, str] = {}
        for name in names:
            try:
                self._declare(name)
            except self.channel_errors as exc:
                failed[name] = f"{REFUSED}{exc}"
            except self.errors:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad queue must not stop the batch
                failed[name] = f"cannot build the message: {exc!r}"
        return failed

    def _declare(self, queue_name: str) -> None:
        if not queue_name or queue_name in self._declared:
            return
        try:
            # Celery's own way to a queue that its configuration does not list: made as the
            # app's task_create_missing_queue_type (and exchange type) say, as a worker makes it.
            # The relay's process never saw the call that named it, so ``in`` would not do.
            queue = self.app.amqp.queues[queue_name]
        except KeyError:  # task_create_missing_queues is off
            queue = Queue(queue_name)
        if not self._confirms:  # the embedded transport: no channel to lose
            queue(self.channel).declare()
        else:
            with self._side_channel() as channel:
                queue(channel).declare()
        self._declared.add(queue_name)

    def _message(self, row: Row) -> amqp_frames.Message:
        """The message as kombu's ``prepare_message`` builds it, with its content header
        written by ``amqp_frames`` (the same bytes, in less time)."""
        props = _properties(row)
        priority = props.pop("priority", None)
        message = amqp_frames.Message(
            row.body, priority=priority, content_type=row.content_type,
            content_encoding=_content_encoding(row), application_headers=row.headers,
            headers_table=row.header_table, **props,
        )  # fmt: skip
        # Written here, so a header AMQP cannot carry fails this row only, not the batch.
        message.content_header()
        return message

    def _settle(self, tag: int, multiple: bool, into: list[int] | None, reason: str) -> None:
        # Tags are pending in publishing order: a multiple ack settles a prefix of them.
        tags = list(itertools.takewhile(lambda t: t <= tag, self._pending)) if multiple else [tag]
        for t in tags:
            row_id = self._pending.pop(t, None)
            if row_id is None:
                continue
            if into is not None:
                into.append(row_id)
            else:
                self._outcome.failed[row_id] = reason

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, self._outcome.confirmed, "")

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, None, "nacked by the broker")

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.add(str(message.properties.get("correlation_id")))


#: The longest per-message TTL RabbitMQ takes, in milliseconds.
MAX_TTL_MS = 2**32 - 1


def _properties(row: Row) -> dict[str, Any]:
    """AMQP properties for a row: persistent always, the TTL counted from now."""
    props = dict(row.properties)
    props["delivery_mode"] = PERSISTENT
    # A returned message names its row by this; Celery sets it, a foreign producer may not.
    props["correlation_id"] = _correlation_id(row)
    expires = row.expires
    if expires:
        left = (outbox.header_time(expires) - datetime.now(UTC)).total_seconds()
        # RabbitMQ refuses a TTL above 2^32 - 1 ms (49.7 days), closing the channel; the
        # worker still drops the message once its 'expires' header passes.
        props["expiration"] = str(min(MAX_TTL_MS, max(0, int(left * 1000))))
    return props


def _correlation_id(row: Row) -> str:
    return str(row.properties.get("correlation_id") or row.task_id)


def _content_encoding(row: Row) -> str:
    # An empty one (a requeued message from a producer that named none) is kombu's UTF-8.
    return row.content_encoding or "utf-8"


# --------------------------------------------------------------------------------------------
# Waiting for work


class Waker:
    """Sleeps until a new row is committed (PostgreSQL NOTIFY) or the timeout passes."""

    def __init__(self, alias: str) -> None:
        self._conn: Any = None
        # The listening connection is a raw driver connection: wrap its errors as Django's,
        # so that the relay's loop treats a lost listener like any database outage.
        self._errors = connections[alias].wrap_database_errors
        wrapper = connections[alias]
        if wrapper.vendor == "postgresql":
            with self._errors:
                self._conn = wrapper.get_new_connection(wrapper.get_connection_params())
                self._conn.autocommit = True
                self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Wait up to ``timeout`` seconds; True if woken by a notification."""
        if self._conn is None:
            stop.wait(timeout)
            return False
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Short slices so that stop() is honoured within half a second.
            with self._errors:
                if self._received(min(remaining, 0.5)):
                    # Several commits may have notified; one claim serves them all.
                    while self._received(0):
                        pass
                    return True
        return False

    def _received(self, timeout: float) -> bool:
        # The generator holds the connection's lock until it is closed: close it before the next.
        notifications = self._conn.notifies(timeout=timeout, stop_after=1)
        try:
            return next(notifications, None) is not None
        finally:
            notifications.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                logger.debug("error while closing the listening connection", exc_info=True)


# --------------------------------------------------------------------------------------------
# The relay


def _retried_alone(rows: list[Row]) -> list[Row]:
    """The rows to publish of a claim: a row the broker refused before goes out on its own.

    A row the broker refuses with a channel error as it is published (a message over its
    ``max_message_size``) fails every batch it is in: the claim rolls back, the connection is
    made again, the batch's rows go out one at a time, and any the broker took already go out
    twice. Such a row is therefore
    published alone when it is due again, and the rows claimed after it are left, due, for the
    next claim; on PostgreSQL their locks go with the claim's commit. Rows nacked or not
    confirmed in time fail no batch, and go out in batches as before. Rows keep claim order.
    """
    for position, row in enumerate(rows):
        if row.refused:
            return rows[:position] or rows[:1]
    return rows


def _publishing(rows: Sequence[Row]) -> Any:
    """Sentry's transactions for a batch (``integrations.sentry.publishing``), or None."""
    from .integrations import sentry

    return sentry.publishing(rows)


def _unbuildable(exc: Exception) -> str:
    """Why a row's message could not be built, for its ``last_error``."""
    if isinstance(exc, struct.error):
        # py-amqp packs header values with struct; its text differs between Python versions.
        return (
            "a header holds a value an AMQP header table cannot carry (an integer beyond 64 bits, "
            f"or a name longer than 255 bytes): {exc}. Enqueue it with the value in the arguments "
            "or as a string."
        )
    return repr(exc)


class Relay:
    """Moves due outbox rows to the broker until stopped.

    Args:
        app: The Celery app whose broker, routes and queues to use.
        name: Identifies the relay in heartbeats; ``hostname:pid`` by default.
    """

    def __init__(self, app: Celery | None = None, *, name: str | None = None) -> None:
        self.app = app or get_celery_app()
        self.alias = conf.DATABASE
        self.hostname = socket.gethostname()
        self.name = name or f"{self.hostname}:{os.getpid()}"
        self.started_at = timezone.now()
        self.dispatched_total = 0
        self._stop = threading.Event()
        self._publisher: Publisher | None = None
        self._broker_failures = 0
        self._next_heartbeat = 0.0
        self._next_prune = 0.0
        self._isolate = 0
        #: After a confirm timeout: the batch size until batches are confirmed in time again.
        self._limit: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Ask the loop to end after the batch in flight."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end the loop cleanly (main thread only)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        """Relay until ``stop()``; reconnect to the broker and the database as needed."""
        logger.info("relay %s started (batch %d)", self.name, conf.RELAY_BATCH_SIZE)
        waker: Waker | None = None
        database_failures = 0
        try:
            while not self.stopping:
                try:
                    if waker is None:
                        waker = Waker(self.alias)
                    self._housekeeping()
                    _, full = self._batch()
                    if full:
                        continue
                    waker.wait(self._idle_timeout(), self._stop)
                except DatabaseError as exc:
                    database_failures += 1
                    logger.warning(
                        "relay %s: database unavailable (%s); retrying (attempt %d)",
                        self.name, exc, database_failures,
                    )  # fmt: skip
                    if waker is not None:
                        waker.close()
                        waker = None
                    connections[self.alias].close()
                    self._pause(database_failures)
                else:
                    database_failures = 0
        finally:
            if waker is not None:
                waker.close()
            self._close_publisher()
            self._beat(stopped=True)
            logger.info(
                "relay %s stopped; %d messages dispatched", self.name, self.dispatched_total
            )

    def close(self) -> None:
        """Release the broker connection (``run()`` does this itself when it ends)."""
        self._close_publisher()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_once(self) -> int:
        """Relay one batch; return how many rows were confirmed and marked."""
        return self._batch()[0]

    def drain(self, timeout: float = 60.0) -> int:
        """Relay batches until no row is due; return how many were dispatched."""
        total = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent, full = self._batch()
            total += sent
            if not full and not self._due_count():
                return total
        raise TimeoutError(f"the outbox still had due rows after {timeout} s")

    # -- one batch ---------------------------------------------------------------------------

    def _batch(self) -> tuple[int, bool]:
        """Claim, publish, mark. Returns (rows dispatched, whether the claim was full)."""
        # After a channel error (say, an exchange that does not exist) the rows of the failed
        # batch are retried one at a time, so the one at fault is found and set aside.
        # After a confirm timeout, batches no larger than what the broker confirmed in time.
        size = (
            1 if self._isolate else min(self._limit or conf.RELAY_BATCH_SIZE, conf.RELAY_BATCH_SIZE)
        )
        publisher = self._ensure_publisher()
        if publisher is None:
            return 0, False
        rows: list[Row] = []
        traced: Any = None
        timed_out: ConfirmTimeout | None = None
        try:
            with self._claim_transaction():
                claimed = self._claim(size)
                if not claimed:
                    self._isolate = 0
                    return 0, False
                rows = _retried_alone(claimed)
                traced = _publishing(rows)  # Sentry's trace, when it traces: None otherwise
                if traced is not None:
                    rows = traced.rows
                try:
                    outcome = publisher.publish_batch(rows, conf.RELAY_CONFIRM_TIMEOUT)
                except ConfirmTimeout as exc:
                    timed_out = exc
                    outcome = self._after_timeout(exc)
                self._mark(rows, outcome)
        except BaseException as exc:
            # The claim rolled back: every row of the batch is pending again.
            if traced is not None:
                traced.finish(None, error=f"the batch failed: {exc!r}")
            if not isinstance(exc, publisher.errors):
                raise  # the database, say
            if isinstance(exc, publisher.channel_errors):
                self._channel_failed(rows, exc)
                return 0, True
            self._broker_failed(exc)
            return 0, False
        if traced is not None:
            traced.finish(outcome)
        self.dispatched_total += len(outcome.confirmed)
        if timed_out is not None:
            # The confirmed rows are marked; the connection is dropped and made again, as for
            # any broker failure.
            self._broker_failed(timed_out)
            return len(outcome.confirmed), False
        self._isolate = max(0, self._isolate - 1)
        self._broker_failures = 0
        if self._limit is not None and len(rows) >= size:
            # Back to the full batch size, doubling with each batch the broker confirmed in time.
            self._limit = None if self._limit * 2 >= conf.RELAY_BATCH_SIZE else self._limit * 2
        # Rows claimed but left for the next batch are due: that one starts at once.
        return len(outcome.confirmed), len(claimed) >= size or len(rows) < len(claimed)

    def _after_timeout(self, exc: ConfirmTimeout) -> BatchOutcome:
        """What to mark after a confirm timeout, in the claim's transaction.

        The rows RabbitMQ confirmed in time are marked dispatched: rolled back, they would be
        published again after the reconnect, and again after each timeout while the broker stays
        slow (a memory alarm, a slow disk, large messages): duplicates without end, and a relay
        that never gets past the batch.

        The unconfirmed rows stay pending, with the publish-retry backoff of a nacked message and
        the reason in ``last_error``, rather than due at once. Their messages most likely reached
        the broker, which is only slow to confirm them: each new try is probably a duplicate, and
        one more load on a broker in trouble. The backoff grows with the row's
        ``publish_attempts``, so a row the broker keeps not confirming in time goes out ever less
        often (not once per reconnect), and ``last_error`` shows why it waits (the admin, and the
        health check's failing rows). The price is their order: later rows may go out first.
        """
        # The connection is dropped after the commit (``_broker_failed``), not here: closing
        # waits for the broker's answer, which a broker in a memory alarm does not read, and the
        # claim's row locks would be held meanwhile.
        outcome = exc.outcome
        reason = f"not confirmed by the broker within {conf.RELAY_CONFIRM_TIMEOUT:g} s"
        for row_id in exc.unconfirmed:
            outcome.failed.setdefault(row_id, reason)
        # The next batches are no larger than what the broker confirmed in time (at least one),
        # doubling back to the batch size as they are confirmed.
        self._limit = max(1, len(outcome.confirmed))
        logger.warning(
            "relay %s: %s; %d confirmed rows marked dispatched, the others wait; next batches "
            "of %d at most",
            self.name, exc, len(outcome.confirmed), self._limit,
        )  # fmt: skip
        return outcome

    def _channel_failed(self, rows: Sequence[Row], exc: BaseException) -> None:
        self._close_publisher()
        if len(rows) == 1:
            logger.warning(
                "relay %s: the broker refused outbox row %d: %s", self.name, rows[0].id, exc
            )
            self._mark(rows, BatchOutcome(failed={rows[0].id: f"{REFUSED}{exc}"}))
            self._isolate = max(0, self._isolate - 1)
        else:
            logger.warning(
                "relay %s: channel error in a batch of %d (%s); retrying them one by one",
                self.name,
                len(rows),
                exc,
            )
            self._isolate = len(rows)

    @contextmanager
    def _claim_transaction(self) -> Iterator[None]:
        # On PostgreSQL the claim's row locks are held until the batch is marked, so relays
        # never publish the same row twice. SQLite has no row locks and one relay; a long
        # write transaction there would only block producers.
        features = connections[self.alias].features
        with (
            transaction.atomic(using=self.alias)
            if features.has_select_for_update_skip_locked
            else nullcontext()
        ):
            yield

    def _claim(self, size: int) -> list[Row]:
        # Plain SQL and tuples: the ORM's per-row work costs more here than the query does.
        connection = connections[self.alias]
        skip_locked = connection.features.has_select_for_update_skip_locked
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        vendor = connection.vendor
        with connection.cursor() as cursor:
            cursor.execute(_claim_sql(skip_locked, vendor), [OutboxStatus.PENDING.value, now, size])
            fetched = cursor.fetchall()
        # Positions as in Row: 6 and 8 are the JSON columns.
        rows = [
            Row(r[0], r[1], r[2], r[3], r[4], r[5], _json(r[6]), r[7], _json(r[8]), r[9], r[10],
                r[11], r[12], None if r[13] is None else bytes(r[13]), bool(r[14]))
            for r in fetched
        ]  # fmt: skip
        if vendor not in _EXPIRES:  # the database gave the headers, not their 'expires'
            rows = [replace(row, expires=(row.headers or {}).get("expires")) for row in rows]
        return rows

    def _mark(self, rows: Sequence[Row], outcome: BatchOutcome) -> None:
        now = timezone.now()
        messages = OutboxMessage.objects.using(self.alias)
        if outcome.confirmed:
            connection = connections[self.alias]
            if connection.vendor == "postgresql":
                # One array parameter rather than one per row: the statement stays short.
                with connection.cursor() as cursor:
                    cursor.execute(_MARK_DISPATCHED_SQL, [now, outcome.confirmed])
            else:
                messages.filter(pk__in=outcome.confirmed).update(
                    status=OutboxStatus.DISPATCHED,
                    dispatched_at=now,
                    publish_attempts=F("publish_attempts") + 1,
                    last_error="",
                )
        if outcome.failed:
            base, cap = conf.backoff_pair("RELAY_PUBLISH_RETRY_BACKOFF")
            attempts = {row.id: row.publish_attempts + 1 for row in rows}
            by_id = {row.id: row for row in rows}
            for row_id, reason in outcome.failed.items():
                delay = backoff(attempts[row_id], base=base, cap=cap, jitter="equal")
                row = by_id[row_id]
                log.with_fields(logger, task=row.task_name, id=row.task_id, outbox=row_id).warning(
                    "not published (%s); next try in %.1f s", reason, delay
                )
                messages.filter(pk=row_id).update(
                    publish_attempts=attempts[row_id],
                    last_error=reason,
                    due_at=now + timedelta(seconds=delay),
                    # Kept from the first refusal: how long the broker has refused it (health).
                    failing_since=Coalesce("failing_since", Value(now)),
                )

    # -- broker connection -------------------------------------------------------------------

    def _ensure_publisher(self) -> Publisher | None:
        if self._publisher is not None:
            return self._publisher
        try:
            self._publisher = Publisher(self.app)
        except Exception as exc:  # noqa: BLE001 - any failure to connect means: wait and retry
            self._broker_failed(exc)
            return None
        if self._broker_failures:
            logger.info("relay %s: broker connection restored", self.name)
        return self._publisher

    def _broker_failed(self, exc: BaseException) -> None:
        self._close_publisher()
        self._broker_failures += 1
        logger.warning(
            "relay %s: broker unavailable (%s); pending rows wait (attempt %d)",
            self.name, exc or type(exc).__name__, self._broker_failures,
        )  # fmt: skip
        self._pause(self._broker_failures)

    def _close_publisher(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    def _pause(self, failures: int) -> None:
        base, cap = conf.backoff_pair("RELAY_RECONNECT_BACKOFF")
        self._stop.wait(backoff(failures, base=base, cap=cap, jitter="equal"))

    # -- waiting and housekeeping ------------------------------------------------------------

    def _idle_timeout(self) -> float:
        timeout = float(conf.RELAY_POLL_INTERVAL)
        next_due = (
            OutboxMessage.objects.using(self.alias)
            .filter(status=OutboxStatus.PENDING)
            .aggregate(next_due=Min("due_at"))["next_due"]
        )
        if next_due is not None:
            until_due = (next_due - timezone.now()).total_seconds()
            # A due row this relay did not claim is locked by another relay, which will
            # publish it: wait for news rather than spinning on it.
            if until_due > 0:
                timeout = min(timeout, until_due)
        return min(timeout, max(0.0, self._next_heartbeat - time.monotonic()))

    def _due_count(self) -> int:
        return (
            OutboxMessage.objects.using(self.alias)
            .filter(status=OutboxStatus.PENDING, due_at__lte=timezone.now())
            .count()
        )

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._beat()
            self._next_heartbeat = now + conf.RELAY_HEARTBEAT_INTERVAL
        interval = conf.RELAY_PRUNE_INTERVAL
        if interval and now >= self._next_prune:
            self._next_prune = now + interval
            rows = outbox.prune(limit=conf.PRUNE_BATCH_SIZE)
            keys = ledger.prune(limit=conf.PRUNE_BATCH_SIZE)
            old = dead.prune(limit=conf.PRUNE_BATCH_SIZE)
            if rows or keys or old:
                logger.info(
                    "relay %s pruned %d outbox rows, %d idempotency keys, %d old dead tasks and attempts",
                    self.name, rows, keys, old,
                )  # fmt: skip

    def _beat(self, stopped: bool = False) -> None:
        now = timezone.now()
        values = {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "last_seen_at": now,
            "dispatched_total": self.dispatched_total,
            "stopped_at": now if stopped else None,
        }
        try:
            RelayHeartbeat.objects.using(self.alias).update_or_create(
                name=self.name, defaults=values
            )
        except DatabaseError:
            if not stopped:
                raise
            logger.warning("relay %s could not record its stop", self.name, exc_info=True)
