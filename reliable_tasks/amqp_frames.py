"""The relay's AMQP frames, written faster than py-amqp's general encoder.

py-amqp writes a message's properties and its header table with one generic routine that
tests each value against a list of types; a Celery message carries some twenty headers, and in
the relay this was most of the CPU time a message cost. The header table is now written once,
at enqueue (``table()``, stored with the outbox row), and the relay writes the rest of the
content header around it. The relay's headers come from JSON, so
their values are only ever strings, integers, floats, booleans, None, lists and dicts: this
module writes exactly those, in the AMQP 0-9-1 field-table format (with RabbitMQ's type
letters, as py-amqp uses them), and hands anything else back to py-amqp. A test checks the two
give the same bytes.

``PublishWriter`` frames a batch of ``basic.publish`` messages the way py-amqp frames each, and
writes them together.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, cast

import amqp
import amqp.serialization

_LONG = struct.Struct(">I")
_INT = struct.Struct(">i")
_LONGLONG = struct.Struct(">q")
_ULONGLONG = struct.Struct(">Q")
_DOUBLE = struct.Struct(">d")
_FLAGS = struct.Struct(">H")
# py-amqp writes an integer as a 32-bit 'I' within these bounds, else as a 64-bit 'L'.
_INT_MAX = 2**31 - 1


class Unsupported(Exception):
    """A value this module does not write; py-amqp's own encoder takes the message."""


class CannotFrame(ValueError):
    """A message ``basic.publish`` cannot carry; ``PublishWriter.add`` framed none of it."""


def _shortstr(value: Any) -> bytes:
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    if type(data) is not bytes or len(data) > 255:
        raise Unsupported
    return bytes((len(data),)) + data


def _value(value: Any, out: list[bytes]) -> None:
    kind = type(value)
    if kind is str:
        data = value.encode("utf-8", "surrogatepass")
        out += (b"S", _LONG.pack(len(data)), data)
    elif value is None:
        out.append(b"V")
    elif kind is bool:
        out.append(b"t\x01" if value else b"t\x00")
    elif kind is int:
        if -_INT_MAX <= value <= _INT_MAX:
            out += (b"I", _INT.pack(value))
        else:
            out += (b"L", _LONGLONG.pack(value))
    elif kind is float:
        out += (b"d", _DOUBLE.pack(value))
    elif kind is dict:
        out.append(b"F")
        _table(value, out)
    elif kind is list or kind is tuple:
        out.append(b"A")
        _array(value, out)
    else:
        raise Unsupported


# Header names repeat from message to message: each is encoded once (a bounded cache).
_KEYS: dict[str, bytes] = {}
_KEYS_MAX = 1024


def _key(key: Any) -> bytes:
    encoded = _KEYS.get(key) if type(key) is str else None
    if encoded is None:
        if type(key) is not str:
            raise Unsupported
        encoded = _shortstr(key)
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        _KEYS[key] = encoded
    return encoded


def _table(table: Mapping[Any, Any], out: list[bytes]) -> None:
    items: list[bytes] = []
    known = _KEYS
    for key, value in table.items():
        encoded = known.get(key)
        items.append(encoded if encoded is not None and type(key) is str else _key(key))
        # Most of Celery's header values are strings or None: written here, without a call.
        if type(value) is str:
            data = value.encode("utf-8", "surrogatepass")
            items += (b"S", _LONG.pack(len(data)), data)
        elif value is None:
            items.append(b"V")
        else:
            _value(value, items)
    data = b"".join(items)
    out += (_LONG.pack(len(data)), data)


def _array(values: Sequence[Any], out: list[bytes]) -> None:
    items: list[bytes] = []
    for value in values:
        _value(value, items)
    data = b"".join(items)
    out += (_LONG.pack(len(data)), data)


def table(headers: Mapping[str, Any]) -> bytes | None:
    """A header table as a content header carries it (its length first), or None where this
    module does not write it. The outbox stores it at enqueue (``OutboxMessage.header_table``)."""
    out: list[bytes] = []
    try:
        _table(headers, out)
    except (Unsupported, struct.error):  # struct.error: an integer beyond 64 bits
        return None
    return b"".join(out)


def read_table(data: bytes) -> dict[str, Any]:
    """The headers a ``table()`` holds (py-amqp reads them)."""
    (headers,), _ = amqp.serialization.loads("F", data, 0)
    return cast(dict[str, Any], headers)


def properties(
    spec: Sequence[tuple[str, str]], props: Mapping[str, Any], headers_table: bytes | None = None
) -> bytes:
    """The property flags and list of a content header, as py-amqp's ``_serialize_properties``.

    ``spec`` is the content class's property list (``amqp.Message.PROPERTIES``), in order;
    ``headers_table``, ``props["application_headers"]`` written already by ``table()``.
    Raises ``Unsupported`` for what this module does not write.
    """
    flags, bit = [], 15
    word = 0
    out: list[bytes] = []
    for name, kind in spec:
        value = props.get(name)
        if value is None and (headers_table is None or name != "application_headers"):
            bit -= 1
            continue
        if bit == 0:  # every 15 properties, a flag word of its own (bit 0 says "more")
            flags.append(word)
            word, bit = 0, 15
        word |= 1 << bit
        bit -= 1
        if kind == "s":
            out.append(_shortstr(value or ""))
        elif kind == "F":
            if headers_table is not None and name == "application_headers":
                out.append(headers_table)
            else:
                _table(value or {}, out)
        elif kind == "o" and type(value) is int and 0 <= value <= 255:
            out.append(bytes((value,)))
        elif kind == "L" and type(value) is int and 0 <= value < 2**64:
            out.append(_ULONGLONG.pack(value))
        elif kind != "bit":
            raise Unsupported
    flags.append(word)
    return b"".join(_FLAGS.pack(w) for w in flags) + b"".join(out)


class Message(amqp.Message):
    """An ``amqp.Message`` whose content header this module writes, py-amqp as the fallback.

    ``content_header()`` writes it once, where the relay can tell a row whose header cannot be
    written (py-amqp raises ``struct.error`` for an integer beyond 64 bits) from a broker
    failure; publishing then sends those bytes. ``headers_table``: the application headers
    written already (``table()``), sent as they are.
    """

    __slots__ = ("_content_header", "headers_table")
    _content_header: bytes

    def __init__(self, *args: Any, headers_table: bytes | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.headers_table = headers_table

    def content_header(self) -> bytes:
        try:
            return self._content_header
        except AttributeError:
            pass
        try:
            data = properties(self.PROPERTIES, self.properties, self.headers_table)
        except Unsupported:
            if (
                self.headers_table is not None
                and self.properties.get("application_headers") is None
            ):
                self.properties["application_headers"] = read_table(self.headers_table)
            data = super()._serialize_properties()  # type: ignore[misc]
        self._content_header = data
        return data

    def _serialize_properties(self) -> bytes:
        return self.content_header()


def _name(value: str, what: str) -> bytes:
    try:
        return _shortstr(value)
    except Unsupported:
        size = len(value.encode("utf-8", "surrogatepass"))
        raise CannotFrame(f"{what} is {size} bytes in UTF-8; AMQP allows 255 at most") from None


_FRAME_HEAD = struct.Struct(">BHI")
_FRAME_END = b"\xce"
# basic.publish (class 60, method 40), its reserved short first; and the content header's
# class, weight and body size.
_PUBLISH = struct.Struct(">HHH")
_CONTENT = struct.Struct(">HHQ")


class PublishWriter:
    """Writes ``basic.publish`` frames for a batch of messages and sends them in one write.

    py-amqp sends each message with a write of its own, after reading the socket for events
    (a zero-timeout ``drain_events`` per message, when the broker announces the
    ``connection.blocked`` capability, as RabbitMQ does). The relay reads the broker's events
    once the batch is written, as it waits for the confirms; this writer frames the batch as
    py-amqp would (the same bytes, a test compares them) and hands it to py-amqp's transport at
    once. A message whose body needs several frames is split at the connection's ``frame_max``.
    """

    #: Framed bytes held at most before they are written (large bodies are sent as they come).
    SEND_AT = 1 << 16

    def __init__(self, connection: Any, channel_id: int) -> None:
        self.connection = connection
        self.channel_id = channel_id
        self._parts: list[bytes] = []
        self._size = 0
        self._methods: dict[tuple[str, str, bool], bytes] = {}

    def add(self, message: Message, exchange: str, routing_key: str, mandatory: bool) -> None:
        """Frame ``message``; send the frames held once they reach ``SEND_AT`` bytes.

        Raises ``CannotFrame``, with nothing framed, for a message AMQP cannot carry; what
        sending raises is the connection's.
        """
        channel = self.channel_id
        parts = self._parts
        key = (exchange, routing_key, mandatory)
        method = self._methods.get(key)
        if method is None:
            args = (
                _PUBLISH.pack(60, 40, 0)
                + _name(exchange, "the exchange name")
                + _name(routing_key, "the routing key")
            )
            method = args + (b"\x01" if mandatory else b"\x00")
            method = _FRAME_HEAD.pack(1, channel, len(method)) + method + _FRAME_END
            if len(self._methods) >= _KEYS_MAX:
                self._methods.clear()
            self._methods[key] = method
        body = message.body
        if isinstance(body, str):
            # py-amqp takes a missing encoding for UTF-8; kombu an empty one too.
            encoding = message.properties.get("content_encoding") or "utf-8"
            message.properties["content_encoding"] = encoding
            try:
                body = body.encode(encoding)
            except (LookupError, UnicodeError) as exc:
                raise CannotFrame(
                    f"the body is text to encode as content_encoding {encoding!r}: {exc}"
                ) from None
        header = _CONTENT.pack(60, 0, len(body)) + message.content_header()
        parts += (method, _FRAME_HEAD.pack(2, channel, len(header)), header, _FRAME_END)
        chunk = self.connection.frame_max - 8
        if len(body) <= chunk:
            if body:
                parts += (_FRAME_HEAD.pack(3, channel, len(body)), body, _FRAME_END)
        else:
            for start in range(0, len(body), chunk):
                piece = body[start : start + chunk]
                parts += (_FRAME_HEAD.pack(3, channel, len(piece)), piece, _FRAME_END)
        self._size += len(method) + len(header) + len(body) + 16
        if self._size >= self.SEND_AT:
            self.send()

    def send(self) -> None:
        """Write what ``add`` framed (nothing if it framed nothing)."""
        if not self._parts:
            return
        data, self._parts, self._size = b"".join(self._parts), [], 0
        transport = self.connection.transport
        if transport is None:
            raise amqp.RecoverableConnectionError("connection already closed")
        transport.write(data)
        self.connection.bytes_sent += 1  # as py-amqp counts writes, for its heartbeats
