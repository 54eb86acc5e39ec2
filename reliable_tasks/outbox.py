"""Enqueue: turn an ``apply_async`` call into an outbox row in the caller's transaction.

Celery builds the message as it always does (routing, protocol-2 headers, signals); a
capturing producer takes the place of the broker and keeps what would have been published.
The row is then written on the outbox's database connection, so it commits or rolls back
with the caller's transaction, and no broker I/O happens on the caller's path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from celery import Celery, signals
from celery import Task as CeleryTask
from celery.app.routes import MapRoute
from celery.result import AsyncResult
from celery.utils import time as celery_time
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import maybe_make_aware
from django.core.signals import setting_changed
from django.utils import timezone
from kombu import serialization
from kombu.exceptions import EncodeError
from kombu.utils.uuid import uuid

from . import amqp_frames, pruning
from .conf import conf
from .exceptions import PayloadNotSerializable, PayloadTooLarge, UnsupportedOption

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from .models import OutboxMessage

SERIALIZER = "json"

#: An idempotency key chosen at requeue; it replaces the one the task computes.
#: The largest header table a message may carry: its content header is one frame, which
#: RabbitMQ keeps to frame_max (128 KiB by default), less room for the other properties.
MAX_HEADER_TABLE_BYTES = 127 * 1024

KEY_HEADER = "reliable_idempotency_key"
#: When the first attempt of a run of retries started (ISO 8601), for the policy's deadline.
FIRST_ATTEMPT_HEADER = "reliable_first_attempt"
#: The wait before this attempt, for decorrelated jitter.
PREVIOUS_DELAY_HEADER = "reliable_previous_delay"
#: When the task was enqueued (ISO 8601), for the enqueue-to-start latency.
ENQUEUED_AT_HEADER = "reliable_enqueued_at"

# What an AMQP message can carry besides headers and body; kombu drops anything else too.
_AMQP_PROPERTIES = frozenset(
    {"delivery_mode", "priority", "correlation_id", "reply_to", "message_id", "timestamp",
     "type", "user_id", "app_id", "cluster_id"}
)  # fmt: skip


@dataclass(frozen=True)
class CapturedMessage:
    """What ``apply_async`` would have published, encoded and checked."""

    task_name: str
    task_id: str
    queue: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: str
    content_type: str
    content_encoding: str
    due_at: datetime
    # ``headers`` and ``properties`` as JSON text, encoded once when they were checked.
    headers_json: str = ""
    properties_json: str = ""
    #: ``headers`` as the AMQP field table the relay sends (None: the relay writes it).
    header_table: bytes | None = None

    @property
    def retries(self) -> int:
        return int(self.headers.get("retries") or 0)


class _NoConnection:
    """Stands where Celery expects the producer's broker connection; there is none.

    Celery's retry around callback publishing (chains, ``link``) asks which errors are
    recoverable; with no broker I/O, none are.
    """

    recoverable_connection_errors: tuple[type[BaseException], ...] = ()
    connection_errors: tuple[type[BaseException], ...] = ()
    channel_errors: tuple[type[BaseException], ...] = ()

    def _reraise_as_library_errors(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class CapturingProducer:
    """A kombu ``Producer`` stand-in that keeps the first message instead of sending it.

    Celery may publish a second message through the same producer (a ``task-sent`` monitoring
    event when ``task_send_sent_event`` is on); only the task message is kept.
    """

    connection = _NoConnection()
    serializer = SERIALIZER

    def __init__(self, task_name: str) -> None:
        self.task_name = task_name
        self.message: CapturedMessage | None = None
        #: The first ``publish`` call's arguments as Celery passed them, for a ``Template``.
        self.call: tuple[Any, dict[str, Any]] | None = None

    def publish(
        self,
        body: Any,
        *,
        exchange: Any = None,
        routing_key: str | None = None,
        serializer: str | None = None,
        compression: str | None = None,
        headers: dict[str, Any] | None = None,
        declare: list[Any] | None = None,
        **properties: Any,
    ) -> None:
        if self.message is not None:
            return
        self.call = (body, dict(
            exchange=exchange, routing_key=routing_key, serializer=serializer,
            compression=compression, headers=headers, declare=declare, **properties,
        ))  # fmt: skip
        name = self.task_name
        if serializer not in (None, SERIALIZER):
            raise UnsupportedOption(
                f"task {name!r} was called with serializer={serializer!r}; reliable tasks travel as "
                "JSON only (the outbox stores text, and pickle can run code on the worker). Remove "
                "the serializer option from the call or the task."
            )
        if compression:
            raise UnsupportedOption(
                f"task {name!r}: compression={compression!r} is not supported through the outbox; "
                "remove it from the call, the task and task_compression."
            )
        # Publish-only options (retry, timeout, ...) and the TTL fall away here: the relay
        # publishes on its own terms and counts the TTL from the absolute 'expires' header.
        headers = dict(headers or {})
        headers[ENQUEUED_AT_HEADER] = timezone.now().isoformat()
        properties = {k: v for k, v in properties.items() if k in _AMQP_PROPERTIES}
        task_id = str(headers.get("id") or properties.get("correlation_id"))
        content_type, content_encoding, data = _encode_body(name, body)
        for display in ("argsrepr", "kwargsrepr"):
            # Only for people to read; PostgreSQL's jsonb cannot hold a NUL character, and no
            # database a lone surrogate, which the arguments themselves may carry as escapes.
            if isinstance(headers.get(display), str):
                headers[display] = column_text(headers[display])
        headers_json = _encode_mapping(name, "headers", headers)
        # JSON writes a NUL character as \u0000; only then is the slower exact search needed.
        if NUL_ESCAPE in headers_json and holds_nul(headers):
            raise PayloadNotSerializable(
                f"task {name!r} cannot be enqueued: a header holds a NUL character (\\x00), which "
                "the database cannot store. Remove it from the headers. Nothing was written to the "
                "outbox; the transaction is still usable."
            )
        properties_json = _encode_mapping(name, "publish options", properties)
        size = len(data.encode()) + len(headers_json)
        limit = conf.MAX_PAYLOAD_BYTES
        if size > limit:
            raise PayloadTooLarge(
                f"task {name!r} is {_human(size)} encoded (arguments and headers); the limit is "
                f"RELIABLE_TASKS_MAX_PAYLOAD_BYTES = {_human(limit)}. Store large data elsewhere "
                "(a table, object storage) and pass its key. Nothing was written to the outbox."
            )
        _refuse_non_text_keys(name, body)
        queue = _queue_name(declare)
        exchange = getattr(exchange, "name", exchange) or ""
        routing_key = routing_key or ""
        for option, value in (
            ("queue", queue),  # first: Celery routes to a queue by its name
            ("exchange", exchange),
            ("routing_key", routing_key),
            ("task id", task_id),  # the message's correlation_id
        ):
            _refuse_long_name(name, option, value)
        priority = properties.get("priority")
        if priority is not None and not (
            isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255
        ):
            raise UnsupportedOption(
                f"task {name!r} cannot be enqueued: priority={priority!r}; AMQP takes a whole "
                "number from 0 to 255 (RabbitMQ honours up to the queue's x-max-priority). "
                "Nothing was written to the outbox; the transaction is still usable."
            )
        header_table = amqp_frames.table(headers)
        if header_table is not None and len(header_table) > MAX_HEADER_TABLE_BYTES:
            raise PayloadTooLarge(
                f"task {name!r} cannot be enqueued: its headers are {_human(len(header_table))} "
                f"as AMQP writes them; a message's headers travel in one frame, which RabbitMQ "
                f"keeps to 128 KiB (frame_max), so {_human(MAX_HEADER_TABLE_BYTES)} at most. Pass "
                "large values as arguments. Nothing was written to the outbox."
            )
        self.message = CapturedMessage(
            task_name=name,
            task_id=task_id,
            queue=queue,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            properties=properties,
            body=data,
            content_type=content_type,
            content_encoding=content_encoding,
            due_at=_due_at(headers.get("eta")),
            headers_json=headers_json,
            properties_json=properties_json,
            header_table=header_table,
        )

    def revive(self, connection: Any) -> None:
        """Celery's callback retry path calls this; there is nothing to reconnect."""


# -- plain calls, from a template --------------------------------------------------------------

#: Counts Django's ``setting_changed`` signals: a template made before one is not used.
_settings_generation = 0


def forget_templates(**kwargs: Any) -> None:
    """Make every task's next plain call go through Celery (and make a new template)."""
    global _settings_generation
    _settings_generation += 1


setting_changed.connect(forget_templates, weak=False, dispatch_uid="reliable-tasks-templates")

# What differs from one plain call's message to the next; the rest comes from the template.
_PER_CALL_HEADERS = frozenset({"id", "root_id", "argsrepr", "kwargsrepr", "origin"})
_PER_CALL_PROPERTIES = frozenset({"headers", "correlation_id", "reply_to"})
# Headers a plain call's message leaves empty; one that holds a value was not a plain call.
_EMPTY_IN_PLAIN_CALLS = (
    "eta", "expires", "group", "group_index", "parent_id", "shadow", "retries",
    "replaced_task_nesting", "stamped_headers", "stamps",
)  # fmt: skip


@dataclass(frozen=True)
class Template:
    """A plain call's message as Celery built it, from which the next plain call's is made.

    A plain call is ``task.delay(*args, **kwargs)`` or ``task.apply_async(args, kwargs)``
    (``task_id`` allowed): no other option, outside a running task. Celery builds its message
    from the task, the app's configuration and the call; from one plain call to the next only
    the task id, the arguments and their display, the origin and the reply-to change. Celery's
    build is most of an enqueue's own work (seven reads of its configuration through Django's
    settings among it); from the template it is a dict copy and the arguments' display, while
    ``usable()`` holds:

    - the configuration is the one the template was made under: no ``setting_changed``
      (``override_settings``) since, the same ``app.conf`` holding the same changes;
    - the same router, routing by task name only (no router function, which sees arguments);
    - nothing listens to Celery's publish signals or wraps ``Task.apply_async`` or
      ``Celery.send_task`` (sentry-sdk's trace headers, other tracing): they see every call;
    - no task runs in this thread (a child task takes its parent's ids and priority).

    Otherwise Celery builds the message, as it always does.
    """

    headers: dict[str, Any]
    #: What else Celery passed to ``publish``, but the per-call properties.
    publish: dict[str, Any]
    #: The body's third part: callbacks, errbacks, chain and chord, all None.
    embed: dict[str, Any]
    ignore_result: bool
    repr_maxlevels: int
    conf: Any
    changes: tuple[tuple[str, Any], ...]
    router: Any
    routes: Any
    generation: int

    @classmethod
    def of(cls, task: Any, capture: CapturingProducer) -> Template | None:
        """The template of a plain call's captured message; None if it cannot be one."""
        if capture.call is None or capture.message is None:
            return None
        body, call = capture.call
        app = task.app
        headers = call.get("headers") or {}
        embed = body[2] if isinstance(body, tuple) and len(body) == 3 else None
        if (
            not isinstance(embed, dict)
            or any(embed.values())
            or any(headers.get(name) for name in _EMPTY_IN_PLAIN_CALLS)
            or call.get("reply_to") != app.thread_oid
            or type(task).shadow_name is not CeleryTask.shadow_name
            or getattr(task, "_dump_pydantic_arguments", None) is not None
            or not all(isinstance(route, MapRoute) for route in app.amqp.router.routes)
            or not _celery_may_be_skipped(app)
        ):
            return None
        return cls(
            headers={k: v for k, v in headers.items() if k not in _PER_CALL_HEADERS},
            publish={k: v for k, v in call.items() if k not in _PER_CALL_PROPERTIES},
            embed=dict(embed),
            ignore_result=bool(headers.get("ignore_result")),
            repr_maxlevels=app.conf.task_repr_maxlevels,
            conf=app.conf,
            changes=tuple(app.conf.changes.items()),
            router=app.amqp.router,
            routes=app.amqp.router.routes,
            generation=_settings_generation,
        )

    def usable(self, app: Any) -> bool:
        conf = app.conf
        if self.generation != _settings_generation or conf is not self.conf:
            return False
        changes = conf.changes
        if len(changes) != len(self.changes) or any(
            changes.get(k, changes) is not v for k, v in self.changes
        ):
            return False
        router = app.amqp.router
        return (
            router is self.router and router.routes is self.routes and _celery_may_be_skipped(app)
        )

    def build(
        self, task: Any, args: Any, kwargs: Any, task_id: str | None
    ) -> tuple[AsyncResult[Any], CapturedMessage]:
        """The call's result handle and message, as Celery's ``apply_async`` makes them."""
        if task.typing:
            check = getattr(task, "__header__", None)
            if check is not None:
                check(*(args or ()), **(kwargs or {}))  # a TypeError names the bad arguments
        args = args or ()
        kwargs = kwargs or {}
        if not isinstance(args, list | tuple):
            raise TypeError("task args must be a list or tuple")
        if not isinstance(kwargs, Mapping):
            raise TypeError("task keyword arguments must be a mapping")
        task_id = task_id or uuid()
        app = task.app
        amqp = app.amqp
        headers = dict(self.headers)
        headers["id"] = headers["root_id"] = task_id
        headers["argsrepr"] = display(args, amqp.argsrepr_maxsize, self.repr_maxlevels)
        headers["kwargsrepr"] = display(kwargs, amqp.kwargsrepr_maxsize, self.repr_maxlevels)
        headers["origin"] = anon_nodename()
        capture = CapturingProducer(task.name)
        if not self.ignore_result:
            app.backend.on_task_call(capture, task_id)
        capture.publish(
            (args, kwargs, self.embed), headers=headers, correlation_id=task_id,
            reply_to=app.thread_oid, **self.publish,
        )  # fmt: skip
        assert capture.message is not None  # publish keeps the first message or raises
        result: AsyncResult[Any] = task.AsyncResult(task_id)
        result.ignored = self.ignore_result
        return result, capture.message


#: Values whose ``repr`` is what Celery's ``saferepr`` writes for them (a test checks).
_REPR_AS_SAFEREPR = frozenset({int, bool, float, type(None)})


def display(value: Any, maxsize: int | None, maxlevels: int) -> str:
    """The ``argsrepr`` / ``kwargsrepr`` header of a call: Celery's ``saferepr``.

    The usual arguments (ids, counts, amounts; no keyword arguments) take ``repr``, which
    writes the same text without ``saferepr``'s walk over the value.
    """
    kind = type(value)
    if ((kind is tuple or kind is list) and all(type(v) in _REPR_AS_SAFEREPR for v in value)) or (
        kind is dict and not value
    ):
        text = repr(value)
        if maxsize is None or len(text) <= maxsize:
            return text
    return saferepr(value, maxsize, maxlevels=maxlevels)


def _celery_may_be_skipped(app: Any) -> bool:
    """Nothing outside Celery's message building needs to see this call."""
    return (
        not signals.before_task_publish.receivers
        and not signals.after_task_publish.receivers
        and not hasattr(CeleryTask.apply_async, "__wrapped__")
        and not hasattr(Celery.send_task, "__wrapped__")
        and app.current_worker_task is None
    )


def write(message: CapturedMessage) -> None:
    """Insert the outbox row on the outbox's database, inside its current transaction.

    One INSERT and no model instance: this runs in every enqueueing transaction, where
    ``Model.objects.create()`` costs more than the statement itself. Every column the message
    does not set gets its field's default, as ``save()`` would give it; on PostgreSQL the JSON
    columns take the text encoded when the message was checked, cast to ``jsonb``.
    """
    from django.db import connections

    connection = connections[conf.DATABASE]
    insert = _insert_statement(connection)
    with connection.cursor() as cursor:
        cursor.execute(insert.sql, insert.params(message, connection))


@dataclass(frozen=True)
class _Insert:
    """The outbox's INSERT for one database vendor, and where each of its values comes from."""

    sql: str
    #: Per column: the message attribute that fills it, or the field whose default does.
    sources: tuple[Any, ...]
    #: Defaults that are constants, prepared for the database once.
    constants: dict[str, Any]
    #: PostgreSQL: the message's values go as they are, its JSON as the text encoded already.
    raw: bool
    #: The model's fields by name, for the values that go through their conversion.
    fields: dict[str, Any]

    def params(self, message: CapturedMessage, connection: Any) -> list[Any]:
        raw = self.raw and bool(message.headers_json and message.properties_json)
        params: list[Any] = []
        for source in self.sources:
            if not isinstance(source, str):  # a field with a default computed per row
                params.append(source.get_db_prep_save(source.get_default(), connection))
            elif source in self.constants:
                params.append(self.constants[source])
            elif raw:
                params.append(getattr(message, _JSON_TEXT.get(source, source)))
            else:
                field = self.fields[source]
                params.append(field.get_db_prep_save(getattr(message, source), connection))
        return params


# The message's JSON columns, and the attribute holding each as encoded text.
_JSON_TEXT = {"headers": "headers_json", "properties": "properties_json"}
_INSERT_STATEMENTS: dict[str, _Insert] = {}


def _insert_statement(connection: Any) -> _Insert:
    """The outbox's INSERT for the connection's database vendor (built once per vendor)."""
    vendor = connection.vendor
    if vendor not in _INSERT_STATEMENTS:
        from django.db.models import JSONField

        from .models import OutboxMessage

        quote = connection.ops.quote_name
        fields = [f for f in OutboxMessage._meta.concrete_fields if not f.primary_key]
        placeholders = [
            "%s::jsonb" if vendor == "postgresql" and isinstance(f, JSONField) else "%s"
            for f in fields
        ]
        # The message's fields and properties (``retries``) fill their columns.
        given = {
            f.name
            for f in fields
            if f.name in CapturedMessage.__dataclass_fields__
            or isinstance(getattr(CapturedMessage, f.name, None), property)
        }
        per_row = {f.name for f in fields if f.has_default() and callable(f.default)} - given
        sources = [f if f.name in per_row else f.name for f in fields]
        constants = {
            f.name: f.get_db_prep_save(f.get_default(), connection)
            for f in fields
            if f.name not in given | per_row
        }
        _INSERT_STATEMENTS[vendor] = _Insert(
            sql=(
                f"INSERT INTO {quote(OutboxMessage._meta.db_table)} "
                f"({', '.join(quote(cast(str, f.column)) for f in fields)}) "
                f"VALUES ({', '.join(placeholders)})"
            ),
            sources=tuple(sources),
            constants=constants,
            raw=vendor == "postgresql",
            fields={f.name: f for f in fields},
        )
    return _INSERT_STATEMENTS[vendor]


NUL_ESCAPE = "\\u0000"


def holds_nul(value: Any) -> bool:
    """Whether a NUL character is anywhere in a JSON-like value, keys included."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple):
        return any(holds_nul(v) for v in value)
    if isinstance(value, dict):
        return any(holds_nul(k) or holds_nul(v) for k, v in value.items())
    return False


def column_text(text: str) -> str:
    """``text`` with what no database stores written out: a NUL character as ``\\x00``
    (PostgreSQL refuses it), a lone surrogate as an escape such as ``\\ud800`` (no UTF-8 codec writes it)."""
    text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def without_nul(value: Any) -> Any:
    """A copy for display with NUL characters written out as ``\\x00`` (jsonb refuses them)."""
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    return value


def _encode_body(task_name: str, body: Any) -> tuple[str, str, str]:
    try:
        content_type, content_encoding, data = serialization.dumps(body, serializer=SERIALIZER)
    except EncodeError:
        raise _not_serializable(task_name, body) from None
    return content_type, content_encoding, data


def _refuse_non_text_keys(task_name: str, body: Any) -> None:
    """JSON writes any dict key as text: ``{1: "a"}`` would reach the task as ``{"1": "a"}``."""
    if not (isinstance(body, tuple | list) and len(body) >= 2):  # Celery's (args, kwargs, embed)
        return
    args, kwargs = body[0], body[1]
    if not (_has_non_text_key(args) or _has_non_text_key(kwargs)):
        return  # every enqueue: a walk without paths; where the key is, only when there is one
    found = _first_unencodable(args, "args", _anything, _is_text) or _first_unencodable(
        kwargs, "kwargs", _anything, _is_text
    )
    assert found is not None  # the walk above found one
    path, key = found
    raise PayloadNotSerializable(
        f"task {task_name!r} cannot be enqueued: {path} has the key {key!r} (type "
        f"{type(key).__name__}), and JSON object keys are text: the task would receive "
        f"{str(key)!r} in its place. Use string keys, or a list of pairs. Nothing was "
        "written to the outbox; the transaction is still usable."
    )


def _has_non_text_key(value: Any) -> bool:
    if isinstance(value, dict):
        return any(
            not isinstance(key, str)
            or (isinstance(item, dict | list | tuple) and _has_non_text_key(item))
            for key, item in value.items()
        )
    if isinstance(value, list | tuple):
        return any(
            isinstance(item, dict | list | tuple) and _has_non_text_key(item) for item in value
        )
    return False


def _anything(value: Any) -> bool:
    return True


def _is_text(key: Any) -> bool:
    return isinstance(key, str)


def _refuse_long_name(task_name: str, option: str, value: str) -> None:
    # A character is 4 bytes in UTF-8 at most: a short name needs no encoding to be measured.
    size = len(value.encode("utf-8", "surrogatepass")) if len(value) > 63 else 0
    if size > 255:
        raise UnsupportedOption(
            f"task {task_name!r} cannot be enqueued: its {option} {value[:40]!r}... is {size} "
            "bytes in UTF-8; AMQP allows 255 at most, so the relay could never publish it. Use a "
            "shorter name. Nothing was written to the outbox; the transaction is still usable."
        )


def _encode_mapping(task_name: str, what: str, value: Mapping[str, Any]) -> str:
    try:
        # Python's JSON writes NaN and Infinity, which the database's JSON refuses.
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise _not_serializable(task_name, value, what=what) from None
    # JSON writes a surrogate as an escape such as \ud800, which the database's JSON refuses
    # alone. Characters beyond the BMP are written as pairs of them: only then is the slower
    # exact search needed.
    if "\\ud" in text:
        found = _first_unencodable(value, what, _no_surrogate, _no_surrogate)
        if found is not None:
            path, bad = found
            raise PayloadNotSerializable(
                f"task {task_name!r} cannot be enqueued: {path} holds the text {_shown(bad)}, "
                "with a surrogate code point (U+D800 to U+DFFF) that is not part of any "
                "character, which the database cannot store. Remove it, or pass the text in the "
                "task's arguments. Nothing was written to the outbox; the transaction is still "
                "usable."
            )
    return text


def _no_surrogate(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _not_serializable(task_name: str, value: Any, what: str = "") -> PayloadNotSerializable:
    if what:
        found = _first_unencodable(value, what, _json_encodes)
    else:
        args, kwargs = value[0], value[1]
        found = _first_unencodable(args, "args", _kombu_encodes) or _first_unencodable(
            kwargs, "kwargs", _kombu_encodes
        )
    path, bad = found or (what or "the arguments", value)
    shown = _shown(bad)
    if isinstance(bad, float):
        return PayloadNotSerializable(
            f"task {task_name!r} cannot be enqueued: {path} = {shown} is not a finite number, "
            "and JSON holds none (the database refuses NaN and Infinity). Pass a finite number, "
            "or None. Nothing was written to the outbox; the transaction is still usable."
        )
    # Arguments travel as kombu's JSON, which writes these types too; headers as plain JSON.
    kinds = (
        "str, int, float, bool, None, list or dict values (write a time as an ISO 8601 string)"
        if what
        else "str, int, float, bool, None, list, dict, datetime, date, time, UUID or Decimal "
        "values (for a model instance, its primary key)"
    )
    return PayloadNotSerializable(
        f"task {task_name!r} cannot be enqueued: {path} = {shown} (type {type(bad).__name__}) "
        f"cannot be encoded as JSON. Pass {kinds}. Nothing was written to the outbox; the "
        "transaction is still usable."
    )


def _kombu_encodes(value: Any) -> bool:
    try:
        serialization.dumps(value, serializer=SERIALIZER)
    except EncodeError:
        return False
    return True


def _json_encodes(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


_NO_KEY = object()


def _first_unencodable(
    value: Any, path: str, encodes: Callable[[Any], bool], key_ok: Callable[[Any], bool] = _anything
) -> tuple[str, Any] | None:
    """The path and value of the first leaf that ``encodes`` refuses, depth first; or the path
    of a mapping and the first of its keys that ``key_ok`` refuses."""
    if isinstance(value, Mapping):
        bad_key = next((k for k in value if not key_ok(k)), _NO_KEY)
        if bad_key is not _NO_KEY:
            return path, bad_key
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None if encodes(value) else (path, value)
    for child_path, child in children:
        found = _first_unencodable(child, child_path, encodes, key_ok)
        if found:
            return found
    return None


def _queue_name(declare: list[Any] | None) -> str:
    for entity in declare or ():
        # Exchanges have a 'type'; queues have a 'routing_key' and bind to an exchange.
        if hasattr(entity, "queue_arguments"):
            return str(entity.name)
    return ""


def header_time(value: str) -> datetime:
    """A time Celery writes into a message's headers (``eta``, ``expires``; ISO 8601), aware:
    one without an offset is UTC, as Celery's worker reads it. Raises ValueError if malformed."""
    return maybe_make_aware(datetime.fromisoformat(value))


def eta_header(app: Celery, countdown: Any = None, eta: Any = None) -> str | None:
    """The ``eta`` header Celery's message build writes for a call's ``countdown`` or ``eta``
    (a countdown wins), or None without either.

    Reliable tasks are built without them, the header given among the call's headers (which
    Celery adds to the message before ``before_task_publish``): with a quorum queue in the
    Celery configuration, Celery's build sends a message that has either through its native
    delayed delivery (its ``celery_delayed_*`` exchanges, on a topic or fanout exchange) and
    warns for each one on a direct exchange. The relay holds the row until it is due instead;
    delayed again by RabbitMQ after that, the task would run a countdown late.
    """
    if countdown:
        # Elapsed seconds, through UTC: a countdown across a change of the clocks is as long.
        later = celery_time.add_seconds_to_datetime(app.now(), countdown)  # type: ignore[attr-defined]  # celery-types omits it
        eta = maybe_make_aware(later, tz=app.timezone)
    if eta is None or isinstance(eta, str):
        return eta
    return str(eta.isoformat())


def _due_at(eta: str | None) -> datetime:
    return header_time(eta) if eta else timezone.now()


def _human(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.0f} KiB"
    return f"{size} bytes"


def prune(*, limit: int, now: datetime | None = None) -> int:
    """Delete up to ``limit`` dispatched rows older than ``RELIABLE_TASKS_OUTBOX_RETENTION``."""
    return pruning.delete_batch([_prunable(now).order_by("dispatched_at")], limit)


def prunable(*, now: datetime | None = None) -> int:
    """How many rows ``prune`` would delete in all (counted over the dispatched rows' index)."""
    return pruning.count([_prunable(now)])


def _prunable(now: datetime | None) -> QuerySet[OutboxMessage]:
    from .models import OutboxMessage, OutboxStatus

    cutoff = (now or timezone.now()) - conf.OUTBOX_RETENTION
    return OutboxMessage.objects.using(conf.DATABASE).filter(
        status=OutboxStatus.DISPATCHED, dispatched_at__lt=cutoff
    )
