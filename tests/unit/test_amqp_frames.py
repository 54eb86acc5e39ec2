"""The relay's content headers are byte for byte what py-amqp writes, for any headers."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import amqp
import pytest
from amqp import method_framing
from hypothesis import example, given
from hypothesis import strategies as st

from reliable_tasks import amqp_frames

# What the relay's headers hold: JSON, decoded.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=20,
)
# What py-amqp also accepts, which the fast path hands back to it.
other_values = (
    st.decimals(
        allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6
    )
    | st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2100, 1, 1))
    | st.binary(max_size=10)
    | st.tuples(st.integers(min_value=0, max_value=9), st.text(max_size=3))
)
header_tables = st.dictionaries(st.text(max_size=30), json_values | other_values, max_size=25)
shortstrs = st.none() | st.text(max_size=40)


def both(body: str, **properties: Any) -> tuple[bytes, bytes]:
    ours = amqp_frames.Message(body, **properties)._serialize_properties()
    theirs = amqp.Message(body, **properties)._serialize_properties()
    return ours, theirs


@given(
    headers=header_tables,
    content_type=shortstrs,
    correlation_id=shortstrs,
    reply_to=shortstrs,
    expiration=shortstrs,
    priority=st.none() | st.integers(min_value=0, max_value=255),
    delivery_mode=st.sampled_from([None, 1, 2]),
    timestamp=st.none() | st.integers(min_value=0, max_value=2**40),
)
@example(
    headers={"big": 2**31 - 1, "bigger": 2**31, "low": -(2**31) + 1, "lower": -(2**31), "t": True},
    content_type="application/json",
    correlation_id="x",
    reply_to=None,
    expiration="0",
    priority=0,
    delivery_mode=2,
    timestamp=None,
)
@example(
    headers={"é": "ünïcode \udcff", "nested": {"a": [1, None, {"b": 1.5}]}, "empty": {}},
    content_type="",
    correlation_id=None,
    reply_to=None,
    expiration=None,
    priority=None,
    delivery_mode=None,
    timestamp=1,
)
def test_the_fast_content_header_is_py_amqps_to_the_byte(
    headers: dict[str, Any], **properties: Any
) -> None:
    ours, theirs = both("{}", application_headers=headers, **properties)
    assert ours == theirs


def test_a_celery_message_is_written_by_the_fast_path_not_handed_back() -> None:
    headers = {
        "lang": "py", "task": "app.tasks.add", "id": "3f1c", "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": "3f1c", "parent_id": None, "argsrepr": "(1, 2)",
        "kwargsrepr": "{}", "origin": "gen1@host", "ignore_result": False, "stamps": {},
    }  # fmt: skip
    props = {"delivery_mode": 2, "correlation_id": "3f1c", "reply_to": "r"}
    written = amqp_frames.properties(
        amqp.Message.PROPERTIES,
        {"content_type": "application/json", "application_headers": headers, **props},
    )
    assert (
        written
        == both("[]", content_type="application/json", application_headers=headers, **props)[1]
    )


@pytest.mark.parametrize(
    "headers",
    [{"amount": Decimal("1.50")}, {"when": dt.datetime(2026, 1, 1)}, {b"raw": 1}, {"k" * 256: 1}],
)
def test_what_the_fast_path_does_not_write_goes_to_py_amqp(headers: dict[Any, Any]) -> None:
    with pytest.raises(amqp_frames.Unsupported):
        amqp_frames.properties(amqp.Message.PROPERTIES, {"application_headers": headers})
    if not any(isinstance(k, str) and len(k) > 255 for k in headers):
        ours, theirs = both("", application_headers=headers)
        assert ours == theirs


def test_py_amqp_still_asks_the_message_for_its_content_header() -> None:
    """The relay's speed rests on py-amqp calling this method when it writes a frame; if a
    py-amqp release stops, messages stay correct (py-amqp writes them) but slow: fail here."""
    import inspect

    from amqp import method_framing

    assert "content._serialize_properties()" in inspect.getsource(method_framing)
    assert amqp_frames.Message._serialize_properties is not amqp.Message._serialize_properties


@given(headers=st.dictionaries(st.text(max_size=30), json_values, max_size=25))
def test_a_table_written_at_enqueue_is_py_amqps_and_sent_as_it_is(headers: dict[str, Any]) -> None:
    table = amqp_frames.table(headers)
    assert table == amqp.serialization.dumps("F", [headers])
    # The relay hands it over with the message: the content header is the same as without it.
    stored = amqp_frames.Message(b"{}", application_headers=headers, headers_table=table)
    assert (
        stored.content_header()
        == amqp.Message(b"{}", application_headers=headers)._serialize_properties()
    )


@pytest.mark.parametrize(
    "headers", [{"n": 2**64}, {1: "a key that is not a string"}, {"d": Decimal("1.5")}]
)
def test_headers_the_fast_path_does_not_write_get_no_stored_table(headers: dict[Any, Any]) -> None:
    assert amqp_frames.table(headers) is None


def test_a_property_left_to_py_amqp_takes_the_stored_headers_along() -> None:
    headers = {"id": "t-1", "retries": 0, "timelimit": [None, None]}
    table = amqp_frames.table(headers)
    # A bool where an integer goes: py-amqp writes it (as 1), this module leaves it to py-amqp.
    stored = amqp_frames.Message(b"{}", timestamp=True, headers_table=table)
    expected = amqp.Message(b"{}", timestamp=True, application_headers=headers)
    assert stored.content_header() == expected._serialize_properties()


class _Recording:
    """Stands for py-amqp's connection and transport: keeps what is written."""

    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.bytes_sent = 0
        self.written: list[bytes] = []
        self.transport = self

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


@given(
    body=st.text(max_size=300) | st.binary(max_size=300),
    headers=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    exchange=st.text(max_size=20),
    routing_key=st.text(max_size=40),
    mandatory=st.booleans(),
    frame_max=st.sampled_from([4096, 131072]),
    send_at=st.sampled_from([amqp_frames.PublishWriter.SEND_AT, 1]),
)
@example(
    body="x" * 10_000, headers={}, exchange="", routing_key="q", mandatory=True, frame_max=4096,
    send_at=amqp_frames.PublishWriter.SEND_AT,
)  # fmt: skip
def test_a_batch_is_framed_as_py_amqp_frames_each_message(
    body: str | bytes,
    headers: dict[str, Any],
    exchange: str,
    routing_key: str,
    mandatory: bool,
    frame_max: int,
    send_at: int,
) -> None:
    def message() -> amqp.Message:
        return amqp_frames.Message(
            body, content_type="application/json", content_encoding="utf-8",
            application_headers=headers, correlation_id="t-1", delivery_mode=2,
        )  # fmt: skip

    theirs = _Recording(frame_max)
    write_frame = method_framing.frame_writer(theirs, theirs)
    args = amqp.serialization.dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
    for _ in range(2):
        write_frame(1, 7, (60, 40), args, message())
    ours = _Recording(frame_max)
    writer = amqp_frames.PublishWriter(ours, 7)
    writer.SEND_AT = send_at
    for _ in range(2):
        writer.add(message(), exchange, routing_key, mandatory)
    held = send_at > 2 * (len(body) + 2000)  # both messages fit under SEND_AT
    if held:
        assert ours.written == []  # nothing goes before send()
    writer.send()
    assert b"".join(ours.written) == b"".join(theirs.written)
    writes = len(ours.written)
    assert writes == (1 if held else 2)
    writer.send()  # nothing more to write
    assert len(ours.written) == writes == ours.bytes_sent


@pytest.mark.parametrize(
    ("exchange", "routing_key", "encoding", "reason"),
    [
        ("", "é" * 128, "utf-8", "the routing key is 256 bytes in UTF-8; AMQP allows 255 at most"),
        (
            "é" * 128,
            "q",
            "utf-8",
            "the exchange name is 256 bytes in UTF-8; AMQP allows 255 at most",
        ),
        ("", "q", "no-such-codec", "content_encoding 'no-such-codec'"),
    ],
)
def test_a_message_publish_cannot_carry_is_refused_with_nothing_framed(
    exchange: str, routing_key: str, encoding: str, reason: str
) -> None:
    ours = _Recording(131072)
    writer = amqp_frames.PublishWriter(ours, 7)
    bad = amqp_frames.Message("{}", content_type="application/json", content_encoding=encoding)
    with pytest.raises(amqp_frames.CannotFrame, match=reason):
        writer.add(bad, exchange, routing_key, mandatory=True)
    writer.send()
    assert ours.written == []


def test_a_text_body_with_an_empty_content_encoding_is_sent_as_utf_8() -> None:
    ours = _Recording(131072)
    writer = amqp_frames.PublishWriter(ours, 7)
    writer.add(amqp_frames.Message("☕", content_encoding=""), "", "q", mandatory=True)
    writer.send()
    theirs = _Recording(131072)
    args = amqp.serialization.dumps("Bssbb", (0, "", "q", True, False))
    method_framing.frame_writer(theirs, theirs)(
        1, 7, (60, 40), args, amqp.Message("☕", content_encoding="utf-8")
    )
    assert ours.written == theirs.written
