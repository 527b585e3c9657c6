"""The CloudEvents HTTP envelope on the trigger side: what `binary`, `structured` and `batch`
write (checked against the cloudevents SDK's reader too) and what `from_http` reads."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import unquote

import pytest
from cloudevents.core.bindings import http as sdk_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent

from ember.triggers import envelope
from ember.triggers.base import Event

FULL = Event(
    id="JS.orders.42",
    source="nats://127.0.0.1:4222/orders",
    type="io.ember.jetstream.message",
    time="2024-05-01T12:00:00.123456Z",
    subject="orders.eu",
    datacontenttype="application/json",
    dataschema="https://example.com/order.json",
    data=b'{"order":7,"items":["a","b"]}',
    extensions={"traceparent": "00-0af7-b7ad-01", "partitionkey": "eu 1"},
)
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def headers_of(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), f"a header is repeated: {names}"
    return {name.decode(): value.decode("ascii") for name, value in headers}


def test_binary_maps_every_attribute_to_its_header_and_data_to_the_body() -> None:
    headers, body = envelope.binary(FULL)
    assert headers_of(headers) == {
        "ce-specversion": "1.0",
        "ce-id": "JS.orders.42",
        "ce-source": "nats://127.0.0.1:4222/orders",
        "ce-type": "io.ember.jetstream.message",
        "ce-time": "2024-05-01T12:00:00.123456Z",
        "ce-subject": "orders.eu",
        "ce-dataschema": "https://example.com/order.json",
        "ce-traceparent": "00-0af7-b7ad-01",
        "ce-partitionkey": "eu%201",
        "content-type": "application/json",
    }
    assert body == FULL.data


def test_binary_percent_encodes_space_quote_percent_and_non_ascii_only() -> None:
    plain = "nats://h:1/a?b=c&d#e'()*+,;=[]{}|~^`<>\\@!$-_."
    odd = 'a b"c%dü\x01\x7f'
    headers, _ = envelope.binary(Event(id=plain, source="s", type="t", subject=odd))
    sent = headers_of(headers)
    assert sent["ce-id"] == plain, "printable ASCII but space, '\"' and '%' goes as is"
    assert sent["ce-subject"] == "a%20b%22c%25d%C3%BC%01%7F"
    assert unquote(sent["ce-subject"]) == odd


def test_binary_and_structured_fill_an_unset_time_with_now_in_utc() -> None:
    before = datetime.now(UTC)
    stamps = [
        headers_of(envelope.binary(Event(id="1", source="s", type="t"))[0])["ce-time"],
        json.loads(envelope.structured(Event(id="1", source="s", type="t"))[1])["time"],
    ]
    after = datetime.now(UTC)
    for stamp in stamps:
        assert STAMP.fullmatch(stamp), stamp
        assert before.replace(microsecond=0) <= datetime.fromisoformat(stamp) <= after


def test_now_formats_the_current_instant() -> None:
    for _ in range(3):  # the cached second's text stays right across calls
        low = time.time()
        stamp = envelope.now()
        high = time.time()
        assert STAMP.fullmatch(stamp), stamp
        assert low - 1e-6 <= datetime.fromisoformat(stamp).timestamp() <= high + 1e-6


def test_extensions_the_spec_forbids_are_left_out() -> None:
    event = Event(
        id="1",
        source="s",
        type="t",
        extensions={"ok1": "a", "Upper": "b", "with-dash": "c", "id": "d", "data": "e", "": "f"},
    )
    assert [n for n, _ in envelope.binary(event)[0] if n.startswith(b"ce-")] == [
        b"ce-specversion",
        b"ce-id",
        b"ce-source",
        b"ce-type",
        b"ce-time",
        b"ce-ok1",
    ]
    sent = json.loads(envelope.structured(event)[1])
    assert sent["ok1"] == "a" and sent["id"] == "1"
    assert not {"Upper", "with-dash", "data", ""} & set(sent)


@pytest.mark.parametrize("ctype", ["", "text/plain\r\nx-evil: 1", "text/plaïn"])
def test_binary_leaves_out_a_content_type_no_header_can_carry(ctype: str) -> None:
    headers, _ = envelope.binary(Event(id="1", source="s", type="t", datacontenttype=ctype))
    assert b"content-type" not in [name for name, _ in headers]


@pytest.mark.parametrize(
    ("ctype", "data", "member", "value"),
    [
        ("application/json", b'{"a": [1, 2]}', "data", {"a": [1, 2]}),
        ("application/vnd.foo+json; charset=utf-8", b'"text"', "data", "text"),
        ("application/json", b"{not json", "data_base64", "e25vdCBqc29u"),
        ("text/plain", "hé".encode(), "data", "hé"),
        ("text/csv", b"\xff\xfe", "data_base64", "//4="),
        ("application/octet-stream", b"\x00\x01", "data_base64", "AAE="),
        ("", b"{}", "data_base64", "e30="),
    ],
)
def test_structured_data_is_json_text_or_base64_by_content_type(
    ctype: str, data: bytes, member: str, value: object
) -> None:
    headers, body = envelope.structured(
        Event(id="1", source="s", type="t", datacontenttype=ctype, data=data)
    )
    assert headers == [(b"content-type", b"application/cloudevents+json; charset=utf-8")]
    sent = json.loads(body)
    assert sent[member] == value
    assert {"data", "data_base64"} & set(sent) == {member}


def test_structured_keeps_json_data_byte_for_byte_and_omits_empty_data() -> None:
    raw = b'{"z": 1,   "a": 2.50}'
    body = envelope.structured(
        Event(id="1", source="s", type="t", datacontenttype="application/json", data=raw)
    )[1]
    assert raw in body
    empty = json.loads(envelope.structured(Event(id="1", source="s", type="t"))[1])
    assert not {"data", "data_base64"} & set(empty)


def test_batch_is_a_json_array_of_structured_envelopes() -> None:
    second = Event(id="2", source="s", type="t", time="2024-01-01T00:00:00Z", data=b"\x00")
    headers, body = envelope.batch([FULL, second])
    assert headers == [(b"content-type", b"application/cloudevents-batch+json")]
    sent = json.loads(body)
    assert sent == [
        json.loads(envelope.structured(FULL)[1]),
        json.loads(envelope.structured(second)[1]),
    ]
    assert envelope.batch([])[1] == b"[]"


def test_the_sdk_reads_what_binary_and_structured_write() -> None:
    """An independent reader: the cloudevents SDK sees the same event."""
    fmt = JSONFormat()
    headers, body = envelope.binary(FULL)
    message = sdk_http.HTTPMessage({k.decode(): v.decode() for k, v in headers}, body)
    for read in (
        sdk_http.from_binary(message, fmt, SdkEvent),
        fmt.read(SdkEvent, envelope.structured(FULL)[1]),
    ):
        attributes = read.get_attributes()
        assert attributes["id"] == FULL.id and attributes["source"] == FULL.source
        assert attributes["type"] == FULL.type and attributes["subject"] == FULL.subject
        assert attributes["time"] == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
        assert attributes["partitionkey"] == "eu 1" and attributes["dataschema"] == FULL.dataschema
        assert read.get_data() == {"order": 7, "items": ["a", "b"]}


ROUND_TRIP = [
    FULL,
    Event(id="b", source="/x", type="t", time="2024-01-01T00:00:00Z", data=b"\x00\xff"),
    Event(
        id="t",
        source="/x",
        type="t",
        time="2024-01-01T00:00:00+02:00",
        datacontenttype="text/plain",
        data="hé ".encode(),
    ),
    Event(id="n", source="/x", type="t", time="2024-01-01T00:00:00Z", subject='ü "%'),
]


@pytest.mark.parametrize("event", ROUND_TRIP, ids=lambda e: e.id)
@pytest.mark.parametrize("write", [envelope.binary, envelope.structured])
def test_from_http_reads_back_what_binary_and_structured_write(
    event: Event, write: Callable[[Event], tuple[list[tuple[bytes, bytes]], bytes]]
) -> None:
    assert envelope.from_http(*write(event)) == [event]


def test_from_http_reads_back_a_batch_in_order() -> None:
    assert envelope.from_http(*envelope.batch(ROUND_TRIP)) == ROUND_TRIP
    assert envelope.from_http(*envelope.batch([])) == []


def test_from_http_binary_keeps_the_body_as_sent_and_decodes_header_values() -> None:
    headers = [
        (b"CE-SpecVersion", b"1.0"),
        (b"ce-id", b"a%20b"),
        (b"ce-source", b"/s"),
        (b"ce-type", b"t"),
        (b"ce-time", b"2024-05-01T12:00:00Z"),
        (b"ce-flag", b"%E2%9C%93"),
        (b"Content-Type", b"application/json"),
        (b"x-other", b"ignored"),
    ]
    [event] = envelope.from_http(headers, b'{ "spaced" : 1 }')
    assert event == Event(
        id="a b",
        source="/s",
        type="t",
        time="2024-05-01T12:00:00Z",
        datacontenttype="application/json",
        data=b'{ "spaced" : 1 }',
        extensions={"flag": "✓"},
    )


def test_from_http_structured_json_data_without_content_type_is_application_json() -> None:
    body = b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":1},"on":true,"n":5}'
    [event] = envelope.from_http([(b"content-type", b"application/cloudevents+json")], body)
    assert event.datacontenttype == "application/json" and event.data == b'{"a":1}'
    assert event.extensions == {"on": "true", "n": "5"}
    base64_body = json.dumps(
        {
            "specversion": "1.0",
            "id": "1",
            "source": "s",
            "type": "t",
            "data_base64": base64.b64encode(b"\x00").decode(),
        }
    ).encode()
    [raw] = envelope.from_http([(b"content-type", b"application/cloudevents+json")], base64_body)
    assert raw.data == b"\x00" and raw.datacontenttype == ""


def test_a_request_that_is_no_cloudevent_gives_no_events() -> None:
    plain = [(b"content-type", b"application/json"), (b"x-ce-like", b"1")]
    assert envelope.from_http(plain, b'{"id": "1"}') == []
    assert envelope.content_mode(plain) == ""
    assert envelope.content_mode([(b"ce-id", b"1")]) == "binary"
    assert (
        envelope.content_mode([(b"content-type", b"application/cloudevents+json; charset=utf-8")])
        == "structured"
    )
    assert (
        envelope.content_mode([(b"content-type", b"Application/CloudEvents-Batch+JSON")]) == "batch"
    )


BINARY = [(b"ce-specversion", b"1.0"), (b"ce-id", b"1"), (b"ce-source", b"s"), (b"ce-type", b"t")]
STRUCTURED = [(b"content-type", b"application/cloudevents+json")]
BATCH = [(b"content-type", b"application/cloudevents-batch+json")]


def envelope_json(**members: object) -> bytes:
    return json.dumps(
        {"specversion": "1.0", "id": "1", "source": "s", "type": "t", **members}
    ).encode()


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        (BINARY[:1] + BINARY[2:], b"", "binary-mode CloudEvent: missing header ce-id"),
        (BINARY[1:], b"", "missing header ce-specversion"),
        (
            [(b"ce-specversion", b"0.3"), *BINARY[1:]],
            b"",
            "ce-specversion is '0.3'; Ember reads CloudEvents 1.0 only",
        ),
        (
            [*BINARY, (b"ce-time", b"yesterday")],
            b"",
            "header ce-time 'yesterday' is not an RFC 3339 timestamp",
        ),
        ([*BINARY, (b"ce-time", b"2024-01-01T00:00:00")], b"", "timezone aware"),
        (
            [*BINARY, (b"ce-foo-bar", b"x")],
            b"",
            "'foo-bar' should only contain lowercase letters and numbers",
        ),
        (STRUCTURED, b"{bad", "structured CloudEvent: bad JSON"),
        (STRUCTURED, b"[1]", "structured CloudEvent: bad JSON, the envelope must be a JSON object"),
        (
            STRUCTURED,
            b'{"specversion":"1.0","source":"s","type":"t"}',
            'structured CloudEvent: missing member "id"',
        ),
        (
            STRUCTURED,
            envelope_json(specversion="0.3"),
            "member \"specversion\" is '0.3'; Ember reads CloudEvents 1.0 only",
        ),
        (STRUCTURED, envelope_json(time="noon"), "member time 'noon' is not an RFC 3339 timestamp"),
        (STRUCTURED, envelope_json(id=7), "Attribute 'id' must be a <class 'str'>"),
        (
            STRUCTURED,
            envelope_json(data=1, data_base64="AA=="),
            'has both "data" and "data_base64"',
        ),
        (
            STRUCTURED,
            envelope_json(ext={"a": 1}),
            'extension "ext" must be a string, number or boolean',
        ),
        (
            STRUCTURED,
            envelope_json(Ext="x"),
            "'Ext' should only contain lowercase letters and numbers",
        ),
        (
            [(b"content-type", b"application/cloudevents+xml")],
            b"<e/>",
            "format 'application/cloudevents+xml' is not supported",
        ),
        (BATCH, b'{"id": "1"}', "CloudEvents batch: bad JSON, not an array of events"),
        (
            BATCH,
            b"[" + envelope_json() + b', {"id": "2"}]',
            'CloudEvents batch, event 1: missing member "specversion"',
        ),
    ],
)
def test_from_http_refuses_a_malformed_event_naming_what_is_wrong(
    headers: list[tuple[bytes, bytes]], body: bytes, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        envelope.from_http(headers, body)
    assert type(caught.value) is ValueError
    assert message in str(caught.value)
