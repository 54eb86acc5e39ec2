"""Payloads through enqueue → outbox → relay → broker: they round-trip exactly, or fail at enqueue."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu import serialization

from reliable_tasks import PayloadNotSerializable, PayloadTooLarge, UnsupportedOption, testing
from reliable_tasks.models import OutboxMessage
from reliable_tasks.relay import Relay
from tests.support import Broker
from tests.testapp.tasks import record

pytestmark = pytest.mark.django_db(transaction=True)

# What kombu's JSON carries with its type: these must come back as the same type and value.
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.datetimes(),  # naive
    st.datetimes(timezones=st.timezones()),  # any zone, a fixed offset after the trip
    st.dates(),
    st.times(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.uuids(),
    # Long strings, up to 5,000 characters: 30 of them stay under the payload limit (256 KiB).
    # Larger payloads: test_tricky_payloads_arrive_at_the_broker_exactly_as_enqueued.
    st.integers(min_value=0, max_value=5_000).map(lambda n: "x" * n),
)
# Tuples travel as JSON arrays and arrive as lists, as with Celery's own JSON serializer.
payloads = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=30,
)


def as_received(value: Any) -> Any:
    """What a task receives for ``value``, in a form ``==`` compares exactly: tuples become
    lists, and a datetime's zone becomes its UTC offset at that moment (JSON has no zone
    names). The wall time and the offset are compared, not only the instant: the same instant
    with another offset would not be the value that was passed.
    """
    if isinstance(value, list | tuple):
        return [as_received(v) for v in value]
    if isinstance(value, dict):
        return {k: as_received(v) for k, v in value.items()}
    if isinstance(value, dt.datetime | dt.time) and value.tzinfo is not None:
        return (type(value).__name__, value.replace(tzinfo=None), value.utcoffset())
    return value


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


# Values JSON cannot carry: each must be refused at enqueue, naming where it was.
unencodable = st.one_of(
    st.builds(Opaque), st.frozensets(st.integers(), min_size=1), st.builds(object)
)


def decode(body: str, content_type: str = "application/json", encoding: str = "utf-8") -> Any:
    return serialization.loads(body, content_type, encoding, accept=[content_type])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=payloads)
# A backslash written out before "u0000" is text, not a NUL character: CI once found this one.
@example(payload={"\\u0000": None})
@example(payload={"\x00": ["\x00", "\\\x00"]})
def test_any_supported_payload_round_trips_through_the_outbox_exactly(payload: Any) -> None:
    with transaction.atomic():
        record.delay("p", payload=payload)
        [entry] = testing.enqueued()
        assert as_received(entry.kwargs) == {"payload": as_received(payload)}
        assert _same_types(entry.kwargs["payload"], payload)
        transaction.set_rollback(True)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=payloads)
def test_any_supported_payload_reaches_the_worker_exactly_through_relay_and_broker(
    broker: Broker, relay: Relay, payload: Any
) -> None:
    """The worker decodes the message RabbitMQ delivers, as Celery does: the same values."""
    result = record.delay("w", payload=payload)
    assert relay.drain() == 1
    [message] = broker.get_all(expect=1)
    body = message.body.decode() if isinstance(message.body, bytes) else message.body
    args, kwargs, _ = decode(body, message.content_type, message.content_encoding)
    assert message.headers["id"] == result.id
    assert (args, as_received(kwargs)) == (["w"], {"payload": as_received(payload)})
    assert _same_types(kwargs["payload"], payload)


@given(
    key=st.one_of(st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False)),
    where=st.integers(min_value=0, max_value=2),
)
def test_a_dict_key_that_is_not_text_is_refused_at_enqueue_with_its_place(
    key: Any, where: int
) -> None:
    value: Any = {key: "a"}
    if where == 1:
        value = [1, {"inner": value}]
    elif where == 2:
        value = ({"inner": value},)
    with pytest.raises(PayloadNotSerializable) as info:
        record.delay("k", payload=value)
    message = str(info.value)
    place = {
        0: "kwargs['payload']",
        1: "kwargs['payload'][1]['inner']",
        2: "kwargs['payload'][0]['inner']",
    }
    assert f"{place[where]} has the key {key!r}" in message
    assert "JSON object keys are text" in message
    assert not OutboxMessage.objects.exists()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=payloads, bad=unencodable, where=st.integers(min_value=0, max_value=3))
def test_an_unencodable_value_anywhere_is_refused_at_enqueue_with_its_place(
    payload: Any, bad: Any, where: int
) -> None:
    nested: Any = [payload, {"deep": [bad]}] if where else bad
    with pytest.raises(PayloadNotSerializable) as info:
        record.delay("bad", payload=nested)
    message = str(info.value)
    assert "task 'tests.testapp.tasks.record' cannot be enqueued" in message
    assert ("kwargs['payload'][1]['deep'][0]" if where else "kwargs['payload']") in message
    assert not OutboxMessage.objects.exists()


def test_tricky_payloads_arrive_at_the_broker_exactly_as_enqueued(
    broker: Broker, relay: Relay
) -> None:
    tricky = [
        "naïve café ☕ 𝄞 \u0000 \u2028",
        {
            "when": dt.datetime(2026, 11, 28, 1, 2, 3, 456789, tzinfo=dt.UTC),
            "day": dt.date(2026, 2, 28),
        },
        {
            "amount": decimal.Decimal("12345678901234567890.000000001"),
            "id": uuid.UUID(int=2**128 - 1),
        },
        [[[[[["deep"]]]]]],
        {"": None, "k" * 200: 2**63, "float": 1e-308},
        "x" * 200_000,
    ]
    for i, payload in enumerate(tricky):
        record.delay(f"t{i}", payload=payload)
    assert relay.drain() == len(tricky)
    received = {}
    for message in broker.get_all(expect=len(tricky)):
        args, kwargs, _ = decode(
            message.body.decode() if isinstance(message.body, bytes) else message.body
        )
        received[args[0]] = kwargs["payload"]
    assert received == {f"t{i}": payload for i, payload in enumerate(tricky)}


@override_settings(RELIABLE_TASKS_MAX_PAYLOAD_BYTES=64 * 1024)
def test_a_payload_over_the_limit_is_refused_and_one_under_it_is_not() -> None:
    record.delay("fits", payload="y" * 60_000)
    with pytest.raises(
        PayloadTooLarge, match="the limit is RELIABLE_TASKS_MAX_PAYLOAD_BYTES = 64 KiB"
    ):
        record.delay("too-big", payload="y" * 70_000)
    assert [e.args for e in testing.enqueued()] == [("fits",)]


def test_a_header_holding_a_nul_character_is_refused_and_the_transaction_stays_usable() -> None:
    with transaction.atomic():
        with pytest.raises(PayloadNotSerializable, match=r"a header holds a NUL character"):
            record.apply_async(("h",), headers={"note": "a\x00b"})
        record.apply_async(("ok",), headers={"note": "\\u0000 is only text"})
    [entry] = testing.enqueued()
    assert entry.args == ("ok",)
    assert OutboxMessage.objects.get().headers["note"] == "\\u0000 is only text"


def _same_types(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(_same_types(got[k], v) for k, v in want.items())
    if isinstance(want, list | tuple):  # a tuple arrives as a list
        return isinstance(got, list) and all(
            _same_types(g, w) for g, w in zip(got, want, strict=True)
        )
    return type(got) is type(want)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"time_limit": float("inf")}, r"headers\['timelimit'\]\[0\] = inf is not a finite"),
        ({"headers": {"ratio": float("nan")}}, r"headers\['ratio'\] = nan is not a finite"),
        ({"headers": {"note": "a\ud800b"}}, r"headers\['note'\] holds the text 'a\\ud800b'"),
    ],
    ids=["infinite-time-limit", "nan-header", "lone-surrogate-header"],
)
def test_a_header_json_cannot_hold_is_refused_by_name_and_the_transaction_stays_usable(
    options: dict[str, Any], named: str
) -> None:
    """Python's JSON writes NaN, Infinity and lone surrogates; the database's JSON refuses
    them (PostgreSQL at the INSERT, breaking the transaction; SQLite when the relay reads)."""
    with transaction.atomic():
        with pytest.raises(PayloadNotSerializable, match=named):
            record.apply_async(("refused",), **options)
        record.delay("ok")
    [entry] = testing.enqueued()
    assert entry.args == ("ok",)


@pytest.mark.parametrize(
    ("option", "others"),
    [
        ("routing_key", {"exchange": "amq.direct"}),
        ("exchange", {"routing_key": "rk"}),
        ("queue", {}),
    ],
)
def test_a_name_amqp_cannot_carry_is_refused_at_enqueue_and_the_transaction_stays_usable(
    option: str, others: dict[str, str]
) -> None:
    """AMQP carries exchange, routing key and queue names of 255 bytes at most."""
    with transaction.atomic():
        with pytest.raises(
            UnsupportedOption, match=rf"its {option} .* is 256 bytes in UTF-8; AMQP allows 255"
        ):
            record.apply_async(("refused",), **{option: "é" * 128}, **others)  # 256 bytes
        record.apply_async(("ok",), **{option: "é" * 127}, **others)
    [entry] = testing.enqueued()
    assert entry.args == ("ok",)
    assert getattr(OutboxMessage.objects.get(), option) == "é" * 127


@pytest.mark.parametrize(
    ("options", "error"),
    [
        # The task id travels as the message's correlation_id, an AMQP short string.
        ({"task_id": "a" * 300}, r"its task id 'a+'... is 300 bytes in UTF-8; AMQP allows 255"),
        ({"priority": 300}, r"priority=300; AMQP takes a whole number from 0 to 255"),
        ({"priority": -1}, r"priority=-1; AMQP takes a whole number from 0 to 255"),
        ({"priority": "high"}, r"priority='high'; AMQP takes a whole number from 0 to 255"),
        # A header frame above RabbitMQ's frame_max closes the relay's connection.
        ({"headers": {"blob": "x" * 140_000}}, r"its headers are 137 KiB as AMQP writes them"),
    ],
)
def test_what_the_relay_could_never_publish_is_refused_at_enqueue(
    options: dict[str, Any], error: str
) -> None:
    """Each of these, once in the outbox, would fail at every publish (or, for a task id too
    long for its column, abort the caller's transaction on PostgreSQL): refused at the call,
    saying why, with the transaction still usable."""
    with transaction.atomic():
        with pytest.raises((UnsupportedOption, PayloadTooLarge), match=error):
            record.apply_async(("refused",), **options)
        record.apply_async(("ok",), priority=255, task_id="b" * 255, headers={"n": "x" * 100_000})
    [entry] = testing.enqueued()
    assert entry.args == ("ok",)
    assert OutboxMessage.objects.get().task_id == "b" * 255


def test_an_argument_with_a_lone_surrogate_is_enqueued_and_shown_written_out() -> None:
    """The body carries it as a JSON escape, which text stores; only the arguments' display
    (argsrepr), a header, would hold it raw, which no database takes: it is written out."""
    record.delay("bad \ud800 text")
    [entry] = testing.enqueued()
    assert entry.args == ("bad \ud800 text",)
    assert OutboxMessage.objects.get().headers["argsrepr"] == "('bad \\ud800 text',)"


def test_a_header_json_cannot_carry_names_what_headers_take() -> None:
    """Headers are plain JSON, not kombu's: a datetime, which arguments may be, is not."""
    with pytest.raises(PayloadNotSerializable) as refused:
        record.apply_async(("h",), headers={"when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)})
    message = str(refused.value)
    assert "headers['when'] = datetime.datetime(2026, 1, 1" in message
    assert (
        "Pass str, int, float, bool, None, list or dict values (write a time as an ISO" in message
    )


def test_a_priority_from_an_int_enum_is_taken() -> None:
    """An IntEnum member is a whole number: as JSON and in AMQP's octet it is its value."""

    class Level(enum.IntEnum):
        HIGH = 9

    record.apply_async(("prioritised",), priority=Level.HIGH)
    assert OutboxMessage.objects.get().properties["priority"] == 9
