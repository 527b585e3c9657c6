"""/fn/NAME takes CloudEvents from outside in binary, structured and batch mode: a deployed
function reads them with `req.event` / `req.events`, and a malformed one is its ValueError."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from tests.integration.conftest import EmberServer, make_function

SEES = """
import base64
import ember

NAMES = ("id", "source", "type", "specversion", "time", "subject", "datacontenttype",
         "dataschema", "extensions")

def seen(event):
    out = {name: getattr(event, name) for name in NAMES}
    data = event.data
    out["data"] = {"bytes": base64.b64encode(data).decode()} if isinstance(data, bytes) else data
    try:
        out["json"] = event.json()
    except ValueError:
        out["json"] = "not json"
    return out

def handle(req, ctx):
    try:
        events = [seen(e) for e in req.events]
    except ValueError as exc:
        return ember.Response({"error": str(exc)}, status=400)
    try:
        single = None if req.event is None else req.event.id
    except ValueError as exc:
        single = "ValueError: " + str(exc)
    return {"events": events, "event": single}
"""


@pytest.fixture(scope="module")
def deployed(
    server: EmberServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmberServer]:
    server.deploy(make_function(tmp_path_factory.mktemp("src"), "sees", SEES))
    yield server


def post(server: EmberServer, headers: dict[str, str], body: bytes) -> dict[str, object]:
    resp = server.http.post("/fn/sees", headers=headers, content=body)
    assert resp.status_code == 200, resp.text
    got: dict[str, object] = resp.json()
    return got


def test_binary_mode(deployed: EmberServer) -> None:
    got = post(
        deployed,
        {
            "ce-specversion": "1.0",
            "ce-id": "order%2042",
            "ce-source": "https://shop.example.com/orders",
            "ce-type": "com.example.order.created",
            "ce-time": "2024-05-01T12:00:00Z",
            "ce-subject": "orders/%C3%BC",
            "ce-traceparent": "00-abc-01",
            "content-type": "application/json",
        },
        b'{"total": 12.5}',
    )
    assert got == {
        "events": [
            {
                "id": "order 42",
                "source": "https://shop.example.com/orders",
                "type": "com.example.order.created",
                "specversion": "1.0",
                "time": "2024-05-01T12:00:00Z",
                "subject": "orders/ü",
                "datacontenttype": "application/json",
                "dataschema": None,
                "extensions": {"traceparent": "00-abc-01"},
                "data": {"bytes": base64.b64encode(b'{"total": 12.5}').decode()},
                "json": {"total": 12.5},
            }
        ],
        "event": "order 42",
    }


def test_structured_mode(deployed: EmberServer) -> None:
    envelope = {
        "specversion": "1.0",
        "id": "s-1",
        "source": "/sensors/7",
        "type": "com.example.reading",
        "time": "2024-05-01T12:00:00.25+02:00",
        "dataschema": "https://example.com/reading.json",
        "region": "eu",
        "data": {"celsius": 21},
    }
    got = post(
        deployed,
        {"content-type": "application/cloudevents+json; charset=utf-8", "ce-id": "ignored"},
        json.dumps(envelope).encode(),
    )
    assert got == {
        "events": [
            {
                "id": "s-1",
                "source": "/sensors/7",
                "type": "com.example.reading",
                "specversion": "1.0",
                "time": "2024-05-01T12:00:00.25+02:00",
                "subject": None,
                "datacontenttype": None,
                "dataschema": "https://example.com/reading.json",
                "extensions": {"region": "eu"},
                "data": {"celsius": 21},
                "json": {"celsius": 21},
            }
        ],
        "event": "s-1",
    }


def test_batch_mode(deployed: EmberServer) -> None:
    batch = [
        {"specversion": "1.0", "id": "b-1", "source": "/q", "type": "t", "data": [1, 2]},
        {
            "specversion": "1.0",
            "id": "b-2",
            "source": "/q",
            "type": "t",
            "datacontenttype": "text/plain",
            "data": "two",
        },
        {"specversion": "1.0", "id": "b-3", "source": "/q", "type": "t", "data_base64": "AP8="},
    ]
    got = post(
        deployed, {"content-type": "application/cloudevents-batch+json"}, json.dumps(batch).encode()
    )
    events = got["events"]
    assert isinstance(events, list)
    assert [(e["id"], e["data"], e["json"]) for e in events] == [
        ("b-1", [1, 2], [1, 2]),
        ("b-2", "two", "not json"),
        ("b-3", {"bytes": "AP8="}, "not json"),
    ]
    assert (
        got["event"] == "ValueError: the request carries a batch of 3 CloudEvents: read req.events"
    )


def test_a_plain_request_carries_no_event(deployed: EmberServer) -> None:
    assert post(deployed, {"content-type": "application/json"}, b"{}") == {
        "events": [],
        "event": None,
    }


def test_a_malformed_structured_event_is_a_valueerror_in_the_function(
    deployed: EmberServer,
) -> None:
    body = json.dumps({"specversion": "1.0", "source": "/x", "type": "t"}).encode()
    resp = deployed.http.post(
        "/fn/sees", headers={"content-type": "application/cloudevents+json"}, content=body
    )
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"error": 'structured CloudEvent: missing member "id"'}
    bad_json = deployed.http.post(
        "/fn/sees", headers={"content-type": "application/cloudevents+json"}, content=b"{"
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["error"].startswith("structured CloudEvent: bad JSON")
