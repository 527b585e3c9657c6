"""`req.event` and `req.events` in the native runtime: the three HTTP modes, malformed events,
agreement with what the trigger side writes, and that nothing is imported before use."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap

import pytest

from ember.runtime.api import Request
from ember.triggers import envelope
from ember.triggers.base import Event

Headers = list[tuple[bytes, bytes]]
STRUCTURED = [(b"content-type", b"application/cloudevents+json")]
BATCH = [(b"content-type", b"application/cloudevents-batch+json")]
BINARY = [(b"ce-specversion", b"1.0"), (b"ce-id", b"1"), (b"ce-source", b"s"), (b"ce-type", b"t")]


def request(headers: Headers, body: bytes = b"") -> Request:
    return Request("POST", "/", b"", [(b"host", b"x"), *headers], body)


def envelope_json(**members: object) -> bytes:
    base = {"specversion": "1.0", "id": "1", "source": "s", "type": "t"}
    return json.dumps({**base, **members}).encode()


def test_binary_mode_gives_every_attribute_and_the_body_as_sent() -> None:
    req = request(
        [
            (b"CE-SpecVersion", b"1.0"),
            (b"ce-id", b"a%20b"),
            (b"ce-source", b"nats://127.0.0.1:4222/orders"),
            (b"ce-type", b"io.ember.nats.message"),
            (b"ce-time", b"2024-05-01T12:00:00.5Z"),
            (b"ce-subject", b"orders.%C3%BC"),
            (b"ce-dataschema", b"https://example.com/s.json"),
            (b"ce-traceparent", b"00-abc"),
            (b"Content-Type", b"application/json; charset=utf-8"),
        ],
        b'{"a": [1, 2]}',
    )
    event = req.event
    assert event is not None
    assert (event.specversion, event.id, event.type) == ("1.0", "a b", "io.ember.nats.message")
    assert event.source == "nats://127.0.0.1:4222/orders"
    assert (event.time, event.subject) == ("2024-05-01T12:00:00.5Z", "orders.ü")
    assert event.datacontenttype == "application/json; charset=utf-8"
    assert event.dataschema == "https://example.com/s.json"
    assert event.extensions == {"traceparent": "00-abc"}
    assert event.data == b'{"a": [1, 2]}' and event.json() == {"a": [1, 2]}
    assert req.events == [event] and req.event is event, "parsed once"


def test_optional_attributes_that_are_absent_are_none() -> None:
    event = request(BINARY).event
    assert event is not None
    assert (event.time, event.subject, event.datacontenttype, event.dataschema) == (None,) * 4
    assert event.data == b"" and event.extensions == {}


def test_structured_mode_decodes_data_by_its_content_type() -> None:
    cases = [
        (envelope_json(data={"k": [1]}), {"k": [1]}, {"k": [1]}),
        (envelope_json(datacontenttype="application/json", data="s"), "s", "s"),
        (envelope_json(datacontenttype="text/plain", data="[1]"), "[1]", [1]),
        (envelope_json(data_base64=base64.b64encode(b"\x00[]").decode()), b"\x00[]", None),
    ]
    for body, data, parsed in cases:
        event = request(STRUCTURED, body).event
        assert event is not None
        assert event.data == data, body
        if parsed is not None:
            assert event.json() == parsed, body
    empty = request(STRUCTURED, envelope_json(subject=None)).event
    assert empty is not None and empty.data is None and empty.subject is None
    with pytest.raises(ValueError, match="has no data"):
        empty.json()


def test_structured_mode_keeps_extension_values_as_sent() -> None:
    event = request(STRUCTURED, envelope_json(on=True, n=5, s="x")).event
    assert event is not None and event.extensions == {"on": True, "n": 5, "s": "x"}


def test_batch_mode_gives_the_events_in_order_and_event_refuses() -> None:
    body = json.dumps([json.loads(envelope_json(id=str(i))) for i in range(3)]).encode()
    req = request(BATCH, body)
    assert [e.id for e in req.events] == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"a batch of 3 CloudEvents: read req\.events"):
        _ = req.event
    assert request(BATCH, b"[]").events == []


def test_a_request_that_is_no_cloudevent_has_none() -> None:
    req = request([(b"content-type", b"application/json")], envelope_json())
    assert req.event is None and req.events == []


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        (BINARY[:1] + BINARY[2:], b"", "binary-mode CloudEvent: missing header ce-id"),
        ([(b"ce-specversion", b"0.3"), *BINARY[1:]], b"", "ce-specversion is '0.3'"),
        ([*BINARY[:1], (b"ce-id", b""), *BINARY[2:]], b"", "header ce-id must be a non-empty"),
        ([*BINARY, (b"ce-time", b"noon")], b"", "header ce-time 'noon' is not an RFC 3339"),
        ([*BINARY, (b"ce-time", b"2024-01-01T00:00:00")], b"", "not an RFC 3339 timestamp"),
        ([*BINARY, (b"ce-foo_bar", b"1")], b"", "header ce-foo_bar is not a valid attribute name"),
        (STRUCTURED, b"{bad", "structured CloudEvent: bad JSON"),
        (STRUCTURED, b"[]", "structured CloudEvent: must be a JSON object, not list"),
        (STRUCTURED, b'{"specversion": "1.0", "source": "s", "type": "t"}', 'missing member "id"'),
        (STRUCTURED, envelope_json(specversion="0.3"), "\"specversion\" is '0.3'"),
        (STRUCTURED, envelope_json(id=5), 'member "id" must be a non-empty string'),
        (STRUCTURED, envelope_json(Bad="x"), 'member "Bad" is not a valid attribute name'),
        (STRUCTURED, envelope_json(ext=[1]), 'extension member "ext" must be a string'),
        (STRUCTURED, envelope_json(data=1, data_base64="AA=="), "has both"),
        (STRUCTURED, envelope_json(data_base64="!!"), 'member "data_base64" is not base64'),
        (
            [(b"content-type", b"application/cloudevents+avro")],
            b"",
            "'application/cloudevents+avro' is not supported",
        ),
        (BATCH, b'{"a": 1}', "CloudEvents batch: the body must be a JSON array"),
        (
            BATCH,
            b"[" + envelope_json() + b", 3]",
            "CloudEvents batch, event 1: must be a JSON object",
        ),
    ],
)
def test_a_malformed_cloudevent_raises_valueerror_naming_the_fault(
    headers: Headers, body: bytes, message: str
) -> None:
    req = request(headers, body)
    for read in (lambda: req.event, lambda: req.events):
        with pytest.raises(ValueError) as caught:
            read()
        assert message in str(caught.value)


SENT = [
    Event(
        id="x 1",
        source="mqtt://127.0.0.1:1883/a/b",
        type="io.ember.mqtt.message",
        time="2024-05-01T12:00:00.123456Z",
        subject="a/b ü",
        datacontenttype="application/json",
        dataschema="https://example.com/s",
        data=b'{"n":1}',
        extensions={"traceparent": "00-1"},
    ),
    Event(id="2", source="s", type="t", time="2024-05-01T12:00:00Z", data=b"\xff\x00"),
    Event(
        id="3",
        source="s",
        type="t",
        time="2024-05-01T12:00:00Z",
        datacontenttype="text/plain",
        data=b"hi",
    ),
]


def test_the_runtime_reads_what_the_trigger_side_writes_in_every_mode() -> None:
    def seen(req: Request) -> list[tuple[object, ...]]:
        return [
            (
                e.id,
                e.source,
                e.type,
                e.time,
                e.subject,
                e.datacontenttype,
                e.dataschema,
                e.extensions,
            )
            for e in req.events
        ]

    expected = [
        (
            e.id,
            e.source,
            e.type,
            e.time,
            e.subject or None,
            e.datacontenttype or None,
            e.dataschema or None,
            e.extensions,
        )
        for e in SENT
    ]
    binary = [request(*envelope.binary(e)) for e in SENT]
    assert [seen(r)[0] for r in binary] == expected
    assert [r.event.data for r in binary if r.event is not None] == [e.data for e in SENT]
    structured = [request(*envelope.structured(e)) for e in SENT]
    assert [seen(r)[0] for r in structured] == expected
    assert [r.event.data for r in structured if r.event is not None] == [
        {"n": 1},
        b"\xff\x00",
        "hi",
    ]
    batch = request(*envelope.batch(SENT))
    assert seen(batch) == expected


def test_request_keeps_slots() -> None:
    assert not hasattr(request(BINARY), "__dict__")


def test_nothing_is_imported_until_req_event_is_read() -> None:
    """The runtime stays import-light: the parser loads on first use, the SDK never."""
    code = textwrap.dedent(
        """
        import sys
        import ember, ember.runtime.instance
        req = ember.Request("GET", "/", b"", [(b"ce-specversion", b"1.0"), (b"ce-id", b"1"),
                            (b"ce-source", b"s"), (b"ce-type", b"t")], b"")
        assert "ember.runtime.events" not in sys.modules
        assert req.event.id == "1"
        assert "ember.runtime.events" in sys.modules
        loaded = [m for m in sys.modules if m.split(".")[0] in ("cloudevents", "dateutil")]
        assert not loaded, loaded
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
