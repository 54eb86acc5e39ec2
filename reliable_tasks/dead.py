"""Dead tasks: capture a task that will not succeed by itself, then requeue or discard it.

A dead task keeps the message as it was published (headers, body, routing), so a requeue
writes that same message to the outbox again: it is published only if the requeue commits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Field, QuerySet
from django.utils import timezone
from kombu import serialization
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils import json as kombu_json

from . import amqp_frames, log, pruning, signals
from .conf import conf
from .exceptions import ReliableTasksError
from .models import DeadReason, DeadStatus, DeadTask, OutboxMessage, TaskAttempt
from .outbox import (
    ENQUEUED_AT_HEADER,
    FIRST_ATTEMPT_HEADER,
    KEY_HEADER,
    PREVIOUS_DELAY_HEADER,
    SERIALIZER,
    CapturedMessage,
    column_text,
    header_time,
    without_nul,
)

logger = logging.getLogger("reliable_tasks.dead")

#: Headers of one run of attempts, dropped when a dead task starts over.
ATTEMPT_HEADERS = (FIRST_ATTEMPT_HEADER, PREVIOUS_DELAY_HEADER)
#: Headers that time the previous enqueue (tracing tools add them); a requeue is a new one.
STALE_ON_REQUEUE = ("sentry-task-enqueued-time",)

MAX_TRACEBACK = 16 * 1024
MAX_MESSAGE = 4 * 1024

#: The formats a message body is decoded from here (a dead task's arguments, a requeue with
#: new arguments, the admin's display): those whose decoding cannot run code. A body is never
#: unpickled, whatever content type its message claims: anyone who can publish to a queue
#: could otherwise run code in the worker that captures it or the web process that shows it.
SAFE_CONTENT_TYPES = ("application/json", "application/x-msgpack", "application/x-yaml")


class CannotRequeue(ReliableTasksError):
    """This dead task cannot be sent again as it is (say, its body could not be decoded)."""


@dataclass
class RawMessage:
    """A message as the worker received it, for dead tasks that never became a task call."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes | str
    content_type: str
    content_encoding: str
    exchange: str = ""
    routing_key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def attempts_of(task_id: str) -> list[dict[str, Any]]:
    """The recorded attempts of a task id, oldest first, as plain dicts."""
    rows = TaskAttempt.objects.using(conf.DATABASE).filter(task_id=task_id).order_by("id")
    return [
        {
            "number": a.number,
            "outcome": a.outcome,
            "exc_type": a.exc_type,
            "message": a.message,
            "traceback": a.traceback,
            "worker": a.worker,
            "started_at": a.started_at.isoformat() if a.started_at else None,
            "ended_at": a.ended_at.isoformat(),
        }
        for a in rows
    ]


def trim_attempts(task_id: str, *, newest: int | None) -> None:
    """Keep the latest ``RELIABLE_TASKS_MAX_RECORDED_ATTEMPTS`` attempts of a task id.

    ``newest``: the number of the attempt just recorded, when it tells how many there are;
    None looks (requeued deliveries all carry the number of the attempt they put back).
    """
    keep = conf.MAX_RECORDED_ATTEMPTS
    if newest is not None and newest <= keep:
        return  # fewer attempts than the limit: nothing to drop, no query
    attempts = TaskAttempt.objects.using(conf.DATABASE).filter(task_id=task_id)
    old = list(attempts.order_by("-id").values_list("pk", flat=True)[keep:])
    if old:
        attempts.filter(pk__in=old).delete()


def prune(*, limit: int, now: datetime | None = None) -> int:
    """Delete up to ``limit`` requeued or discarded dead tasks and attempt records past
    ``RELIABLE_TASKS_DEAD_TASK_RETENTION``. Dead tasks nobody acted on are kept.
    """
    return pruning.delete_batch(_prunable(now), limit)


def prunable(*, now: datetime | None = None) -> int:
    """How many rows ``prune`` would delete in all."""
    return pruning.count(_prunable(now))


def _prunable(now: datetime | None) -> tuple[QuerySet[DeadTask], QuerySet[TaskAttempt]]:
    cutoff = (now or timezone.now()) - conf.DEAD_TASK_RETENTION
    return (
        DeadTask.objects.using(conf.DATABASE).filter(
            status__in=[DeadStatus.REQUEUED, DeadStatus.DISCARDED], status_changed_at__lt=cutoff
        ),
        TaskAttempt.objects.using(conf.DATABASE).filter(ended_at__lt=cutoff),
    )


def capture(
    message: CapturedMessage,
    *,
    reason: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    idempotency_key: str,
    exc: BaseException | None = None,
    attempt_count: int | None = None,
    first_failed_at: datetime | None = None,
) -> DeadTask:
    """Store a task call that failed for good, with its attempts (call it inside a transaction).

    ``attempt_count`` and ``first_failed_at`` are the task's own, where the caller knows them:
    the attempts kept on record are only the latest ``RELIABLE_TASKS_MAX_RECORDED_ATTEMPTS``.
    """
    attempts = attempts_of(message.task_id)
    now = timezone.now()
    first = attempts[0]["started_at"] or attempts[0]["ended_at"] if attempts else None
    dead = DeadTask.objects.using(conf.DATABASE).create(
        task_id=message.task_id,
        task_name=message.task_name,
        args=_plain(list(args)),
        kwargs=_plain(dict(kwargs)),
        idempotency_key=idempotency_key,
        queue=message.queue,
        exchange=message.exchange,
        routing_key=message.routing_key,
        headers=message.headers,
        properties=message.properties,
        body=message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        reason=reason,
        exc_type=qualname(exc) if exc is not None else "",
        exc_message=truncate(str(exc), MAX_MESSAGE) if exc is not None else "",
        attempts=attempts,
        attempt_count=max(attempt_count or 0, len(attempts)),
        first_failed_at=first_failed_at or first or now,
        last_failed_at=now,
    )
    _announce(dead, exc)
    return dead


def capture_raw(message: RawMessage, *, reason: str, error: str, queue: str = "") -> DeadTask:
    """Store a message that could not become a task call (unknown task, undecodable body).

    ``queue`` is kept only for a message sent to the default exchange, where the routing key
    names the queue; elsewhere a requeue publishes to the exchange and routing key as they were.
    """
    headers = _plain(message.headers or {})
    content_encoding = message.content_encoding
    raw = message.body
    body = _text(raw, content_encoding)
    if body is None:
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        body, content_encoding = base64.b64encode(data).decode(), "base64"
    args: Any = None
    kwargs: Any = None
    if content_encoding != "base64":
        try:
            decoded = decode_body(body, message.content_type, content_encoding)
            args, kwargs = decoded[0], decoded[1]
        except Exception:  # noqa: BLE001 - an undecodable body is what this function is for
            pass
    now = timezone.now()
    # Any of these may come from whatever a producer sent: each is made to fit its column, or
    # the database would refuse the dead task and the message would come back forever. The
    # headers and properties keep them whole.
    columns = {
        "task_id": headers.get("id") or message.properties.get("correlation_id"),
        "task_name": headers.get("task"),
        "queue": queue if not message.exchange else "",
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "content_type": message.content_type,
        "content_encoding": content_encoding,
    }
    dead = DeadTask.objects.using(conf.DATABASE).create(
        **{name: _fit(name, value) for name, value in columns.items()},
        args=_plain(args) if isinstance(args, list | tuple) else None,
        kwargs=_plain(kwargs) if isinstance(kwargs, dict) else None,
        headers=headers,
        properties=_plain(message.properties or {}),
        body=body,
        reason=reason,
        exc_message=truncate(error, MAX_MESSAGE),
        first_failed_at=now,
        last_failed_at=now,
    )
    _announce(dead)
    return dead


def requeue(
    dead: DeadTask,
    *,
    renew_key: bool = False,
    args: Sequence[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    user: str = "",
) -> OutboxMessage:
    """Send a dead task again through the outbox, in one transaction with its new status.

    Args:
        renew_key: Run under a new idempotency key (and a new task id) instead of the old one.
        args, kwargs: New arguments (say, corrected by an operator); the old ones otherwise.
        user: Who asked, for the record.
    """
    row = _outbox_row(dead, renew_key=renew_key, args=args, kwargs=kwargs)
    with transaction.atomic(using=conf.DATABASE):
        _start_afresh([dead.task_id])
        row.save(using=conf.DATABASE, force_insert=True)
        DeadTask.objects.using(conf.DATABASE).filter(pk=dead.pk).update(
            **_requeued(user, timezone.now()),
            requeued_outbox_id=row.pk,
            requeued_task_id=row.task_id,
        )
    _requeue_done(dead, row, user)
    return row


def _outbox_row(
    dead: DeadTask,
    *,
    renew_key: bool = False,
    args: Sequence[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> OutboxMessage:
    """The (unsaved) outbox row that sends a dead task's message again."""
    if dead.content_encoding == "base64":
        raise CannotRequeue(
            f"dead task {dead.pk} holds a message whose body could not be decoded; it cannot be "
            "sent again as it is. Inspect it, then discard it."
        )
    if not dead.headers.get("task"):
        raise CannotRequeue(f"dead task {dead.pk} has no task name in its headers; discard it.")
    headers = {k: v for k, v in dead.headers.items() if k not in ATTEMPT_HEADERS + STALE_ON_REQUEUE}
    if _passed(headers.get("expires")):
        # The relay would publish it already expired, and nothing would run: the operator who
        # requeues it asks for it to run now.
        headers["expires"] = None
    if isinstance(headers.get("headers"), dict):
        headers["headers"] = {
            k: v for k, v in headers["headers"].items() if k not in STALE_ON_REQUEUE
        }
    properties = dict(dead.properties)
    # A message captured as it was delivered carries the TTL of its first publish; the relay
    # sets a new one from the 'expires' header.
    properties.pop("expiration", None)
    headers["retries"] = 0
    headers[ENQUEUED_AT_HEADER] = timezone.now().isoformat()
    body, content_type, content_encoding = dead.body, dead.content_type, dead.content_encoding
    if args is not None or kwargs is not None:
        body, content_type, content_encoding = _reencode(dead, args, kwargs)
        headers["argsrepr"] = repr(list(args if args is not None else dead.args or []))
        headers["kwargsrepr"] = repr(kwargs if kwargs is not None else dead.kwargs or {})
    task_id = dead.task_id
    if renew_key:
        task_id = str(uuid.uuid4())
        headers["id"] = task_id
        properties["correlation_id"] = task_id
        headers[KEY_HEADER] = renewed_key(dead.idempotency_key or dead.task_id, task_id)
    return OutboxMessage(
        task_id=task_id,
        task_name=dead.task_name or str(headers["task"]),
        queue=dead.queue,
        exchange=dead.exchange,
        routing_key=dead.routing_key,
        headers=headers,
        header_table=amqp_frames.table(headers),
        properties=properties,
        body=body,
        content_type=content_type,
        content_encoding=content_encoding,
    )


#: What a renewal appends to a key; a key renewed before keeps only its last renewal.
_RENEWAL = re.compile(r"(?::requeue:[0-9a-f]{8})+$")
#: The ledger's key column.
_MAX_KEY = 255


def renewed_key(key: str, task_id: str) -> str:
    """``key`` renewed for a requeue as ``task_id``: ``<key>:requeue:<8 characters of the id>``.

    A key renewed before drops its earlier renewal, so that keys do not grow with each one; a
    key too long to take the suffix within the ledger's 255 characters is shortened, with a
    digest of the whole, so that two long keys stay apart.
    """
    base = _RENEWAL.sub("", key)
    suffix = f":requeue:{task_id[:8]}"
    if len(base) + len(suffix) > _MAX_KEY:
        digest = hashlib.sha256(base.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        base = f"{base[: _MAX_KEY - len(suffix) - len(digest) - 1]}~{digest}"
    return base + suffix


def _start_afresh(task_ids: list[str]) -> None:
    """Forget earlier attempts (their copy stays with the dead task): a requeued crash loop
    would otherwise be dead again at its first crash."""
    TaskAttempt.objects.using(conf.DATABASE).filter(task_id__in=task_ids).delete()


def _requeued(user: str, now: datetime) -> dict[str, Any]:
    return {"status": DeadStatus.REQUEUED, "status_changed_at": now, "status_changed_by": user}


def _requeue_done(dead: DeadTask, row: OutboxMessage, user: str) -> None:
    signals.task_requeued.send(sender=DeadTask, dead_task=dead, outbox_id=row.pk, user=user)
    key = (row.headers or {}).get(KEY_HEADER) or dead.idempotency_key
    log.with_fields(logger, task=dead.task_name, id=row.task_id, key=key, dead_task=dead.pk).info(
        "dead task requeued through the outbox by %s", user or "-"
    )


def discard(dead: DeadTask, *, user: str = "") -> None:
    """Mark a dead task discarded; it stays for the record."""
    DeadTask.objects.using(conf.DATABASE).filter(pk=dead.pk).update(
        status=DeadStatus.DISCARDED, status_changed_at=timezone.now(), status_changed_by=user
    )


def requeue_many(
    dead_tasks: QuerySet[DeadTask],
    *,
    renew_key: bool = False,
    user: str = "",
    batch_size: int = 500,
    on_skip: Callable[[DeadTask, CannotRequeue], None] | None = None,
) -> int:
    """Requeue every dead task of a query (status "dead" only), in batches; return how many.

    Each batch is one transaction: its dead tasks are locked (a second operator's bulk action
    skips them), their outbox rows inserted in one statement, their status set. Dead tasks
    that cannot be requeued (an undecodable body, no task name) are skipped with a warning,
    and passed to ``on_skip`` with the reason; those another operator holds are not.
    """
    ids = list(dead_tasks.filter(status=DeadStatus.DEAD).values_list("pk", flat=True))
    done = 0
    for start in range(0, len(ids), batch_size):
        with transaction.atomic(using=conf.DATABASE):
            batch = list(
                DeadTask.objects.using(conf.DATABASE)
                .select_for_update(skip_locked=True)
                .filter(pk__in=ids[start : start + batch_size], status=DeadStatus.DEAD)
            )
            pairs: list[tuple[DeadTask, OutboxMessage]] = []
            for dead in batch:
                try:
                    pairs.append((dead, _outbox_row(dead, renew_key=renew_key)))
                except CannotRequeue as exc:
                    logger.warning("%s", exc)
                    if on_skip is not None:
                        on_skip(dead, exc)
            if not pairs:
                continue
            _start_afresh([dead.task_id for dead, _ in pairs])
            rows = OutboxMessage.objects.using(conf.DATABASE).bulk_create([row for _, row in pairs])
            now = timezone.now()
            for (dead, _), row in zip(pairs, rows, strict=True):
                dead.status, dead.status_changed_at, dead.status_changed_by = (
                    DeadStatus.REQUEUED,
                    now,
                    user,
                )
                dead.requeued_outbox_id, dead.requeued_task_id = row.pk, row.task_id
            DeadTask.objects.using(conf.DATABASE).bulk_update(
                [dead for dead, _ in pairs],
                [
                    "status",
                    "status_changed_at",
                    "status_changed_by",
                    "requeued_outbox_id",
                    "requeued_task_id",
                ],
            )
        for (dead, _), row in zip(pairs, rows, strict=True):
            _requeue_done(dead, row, user)
        done += len(pairs)
    return done


def discard_many(dead_tasks: QuerySet[DeadTask], *, user: str = "", batch_size: int = 500) -> int:
    """Discard every dead task of a query (status "dead" only), in batches; return how many."""
    ids = list(dead_tasks.filter(status=DeadStatus.DEAD).values_list("pk", flat=True))
    done = 0
    for start in range(0, len(ids), batch_size):
        done += (
            DeadTask.objects.using(conf.DATABASE)
            .filter(pk__in=ids[start : start + batch_size], status=DeadStatus.DEAD)
            .update(
                status=DeadStatus.DISCARDED,
                status_changed_at=timezone.now(),
                status_changed_by=user,
            )
        )
    return done


def decode_body(body: bytes | str, content_type: str, content_encoding: str) -> Any:
    """A message body decoded from one of ``SAFE_CONTENT_TYPES``; kombu's ``ContentDisallowed``
    for any other (pickle above all), its ``DecodeError`` for a body that is not what its
    content type says."""
    return serialization.loads(body, content_type, content_encoding, accept=SAFE_CONTENT_TYPES)


def _reencode(
    dead: DeadTask, args: Sequence[Any] | None, kwargs: dict[str, Any] | None
) -> tuple[str, str, str]:
    try:
        decoded = decode_body(dead.body, dead.content_type, dead.content_encoding)
    except ContentDisallowed:
        raise CannotRequeue(
            f"dead task {dead.pk} has a body of type {dead.content_type!r}, which is not decoded "
            "here (only JSON, msgpack and YAML are: decoding pickle could run code); requeue it "
            "without new arguments."
        ) from None
    except DecodeError as exc:
        raise CannotRequeue(
            f"the body of dead task {dead.pk} is not valid {dead.content_type!r} ({exc}); it "
            "cannot take new arguments. Requeue it as it is, or discard it."
        ) from None
    if not (isinstance(decoded, list | tuple) and len(decoded) == 3):
        raise CannotRequeue(
            f"the body of dead task {dead.pk} is not a Celery task message (args, kwargs, embed); "
            "it cannot take new arguments. Requeue it as it is, or discard it."
        )
    old_args, old_kwargs, embed = decoded
    new_body = [
        list(args) if args is not None else old_args,
        kwargs if kwargs is not None else old_kwargs,
        embed,
    ]
    content_type, content_encoding, data = serialization.dumps(new_body, serializer=SERIALIZER)
    return data, content_type, content_encoding


def _announce(dead: DeadTask, exc: BaseException | None = None) -> None:
    cause = f"{dead.exc_type}: {dead.exc_message}" if dead.exc_type else dead.exc_message
    log.with_fields(
        logger,
        task=dead.task_name or "(unknown)",
        id=dead.task_id,
        key=dead.idempotency_key,
        dead_task=dead.pk,
    ).error("dead task: %s%s", dead.get_reason_display(), f" ({cause})" if cause else "")
    transaction.on_commit(
        lambda: signals.task_dead.send(sender=DeadTask, dead_task=dead, exc=exc),
        using=conf.DATABASE,
    )


def qualname(exc: BaseException) -> str:
    """The exception's class by its full name, cut to the 255 characters its columns take."""
    cls = type(exc)
    return column_text(f"{cls.__module__}.{cls.__qualname__}")[:255]


def truncate(text: str, limit: int) -> str:
    """``text`` as every database's text column takes it, cut to ``limit`` characters."""
    text = column_text(text)
    return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"


def _plain(value: Any) -> Any:
    """A JSON-storable copy: kombu's JSON keeps datetimes and decimals readable; NaN and the
    infinities, which JSON columns refuse, become the strings "NaN", "Infinity", "-Infinity".
    """
    return without_nul(json.loads(kombu_json.dumps(value), parse_constant=str))


def _text(raw: bytes | str, encoding: str) -> str | None:
    """The body as text that a text column takes, or None: PostgreSQL refuses a NUL character
    (a small protobuf is valid UTF-8 and may hold one), and no database takes a lone surrogate.
    """
    try:
        text = raw if isinstance(raw, str) else raw.decode(encoding or "utf-8")
        text.encode("utf-8")
    except (ValueError, LookupError):  # UnicodeError is a ValueError; LookupError: no such codec
        return None
    return None if "\x00" in text else text


def _fit(name: str, value: Any) -> str:
    """``value`` as text that the dead task's column ``name`` takes: no NUL, cut to its size."""
    text: str = without_nul(str(value or ""))
    column = DeadTask._meta.get_field(name)
    limit = column.max_length if isinstance(column, Field) else None
    return text if limit is None else text[:limit]


def _passed(expires: Any) -> bool:
    """Whether a message's 'expires' header (ISO 8601, as Celery writes it) is past."""
    if not isinstance(expires, str) or not expires:
        return False
    try:
        return header_time(expires) <= timezone.now()
    except ValueError:
        return False


__all__ = [
    "ATTEMPT_HEADERS",
    "CannotRequeue",
    "DeadReason",
    "RawMessage",
    "capture",
    "capture_raw",
    "discard",
    "discard_many",
    "requeue",
    "requeue_many",
]
