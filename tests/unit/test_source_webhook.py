"""The webhook source: signed requests through `receive`, as the `POST /hooks/{id}` route calls
it, answered 202 only once the event is acked; refusals name the header at fault."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from ember.triggers.base import Message, TriggerError
from ember.triggers.sources.webhook import Seen, Webhook, receive
from tests.brokers.sink import Sink

SECRET = "0123456789abcdef-secret"
NOW = 1_700_000_000.0
BODY = b'{"order": 42}'


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 10))


def ember(
    body: bytes = BODY,
    stamp: float = NOW,
    secret: str = SECRET,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    mac = hmac.new(secret.encode(), f"{int(stamp)}.".encode() + body, hashlib.sha256)
    return {
        "content-type": "application/json",
        "x-ember-timestamp": str(int(stamp)),
        "x-ember-signature": f"v1={mac.hexdigest()}",
        **(extra or {}),
    }


def github(body: bytes = BODY, secret: str = SECRET) -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "x-hub-signature-256": f"sha256={mac}",
        "x-github-event": "push",
        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }


async def started(trigger: str, **config: Any) -> tuple[Webhook, Sink]:
    sink = Sink(id=trigger)
    hook = Webhook(Webhook.validate({"secret": SECRET, **config}), sink)
    await hook.check()
    await hook.start()
    return hook, sink


async def send(
    hook: Webhook, sink: Sink, headers: dict[str, str], body: bytes = BODY, ack: bool = True
) -> tuple[Message, tuple[int, dict[str, str]]]:
    """POST a request, take its event from the sink, ack (or nack) it: the event and the answer."""
    answer = asyncio.create_task(receive(sink.id, headers, body, NOW))
    message = await sink.get(timeout=5)
    assert not answer.done()  # no answer before the event is acked or nacked
    await (hook.ack(message) if ack else hook.nack(message))
    await sink.done()
    return message, await answer


def test_validate_fills_defaults() -> None:
    assert Webhook.validate({"secret": SECRET}) == {
        "secret": SECRET,
        "signature": "ember",
        "type": "io.ember.webhook",
        "tolerance": 300,
    }
    got = Webhook.validate({"secret": SECRET, "signature": "github"})
    assert got["type"] == ""  # com.github.<X-GitHub-Event> per request


BAD = [  # config, the field named, a piece of the problem
    ({}, "secret", "is required: webhooks are verified with HMAC-SHA256"),
    ({"secret": "short"}, "secret", "at least 16 characters"),
    ({"secret": 1234567890123456789}, "secret", "at least 16 characters"),
    ({"secret": SECRET, "signature": "sha1"}, "signature", "ember or github"),
    ({"secret": SECRET, "tolerance": 0}, "tolerance", "from 1 to 86400"),
    ({"secret": SECRET, "signature": "github", "tolerance": 60}, "tolerance", "ember only"),
    ({"secret": SECRET, "type": ""}, "type", "non-empty"),
    ({"secret": SECRET, "path": "/x"}, "path", "not a setting"),
]


@pytest.mark.parametrize(("config", "field", "problem"), BAD)
def test_validate_refuses_naming_the_field(
    config: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(TriggerError) as caught:
        Webhook.validate(config)
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert SECRET not in str(caught.value)


def test_github_signature_accepted_and_delivered() -> None:
    async def main() -> None:
        hook, sink = await started("gh", signature="github")
        message, answer = await send(hook, sink, github())
        delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
        assert answer == (202, {"id": delivery, "status": "delivered"})
        event = message.event
        assert (event.id, event.type) == (delivery, "com.github.push")
        assert event.source == "ember://webhook/gh"
        assert (event.data, event.datacontenttype) == (BODY, "application/json")
        assert event.time == "2023-11-14T22:13:20.000Z"  # NOW
        await hook.stop()

    run(main)


def test_ember_signature_accepted_and_delivered() -> None:
    async def main() -> None:
        hook, sink = await started("em", type="com.example.order")
        message, answer = await send(hook, sink, ember(extra={"x-ember-id": "order-42"}))
        assert answer == (202, {"id": "order-42", "status": "delivered"})
        assert (message.event.id, message.event.type) == ("order-42", "com.example.order")
        assert message.event.data == BODY
        # Without X-Ember-Id each request gets a fresh id; one good signature of several is enough.
        headers = ember(b"{}", NOW - 1)
        headers["x-ember-signature"] = "v1=" + "0" * 64 + ", " + headers["x-ember-signature"]
        other, answer = await send(hook, sink, headers, b"{}")
        assert answer[0] == 202 and other.event.id not in ("", "order-42")
        await hook.stop()

    run(main)


def without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key != name}


REFUSED = [  # name, signature kind, headers, body, status, a piece of the error
    ("github, wrong secret", "github", github(secret="another-secret-xyz"), BODY, 401,
     "X-Hub-Signature-256 does not match"),
    ("github, body changed", "github", github(), b'{"order": 43}', 401,
     "X-Hub-Signature-256 does not match"),
    ("github, no signature", "github", without(github(), "x-hub-signature-256"), BODY, 401,
     "missing X-Hub-Signature-256 header"),
    ("ember, wrong secret", "ember", ember(secret="another-secret-xyz"), BODY, 401,
     "X-Ember-Signature does not match"),
    ("ember, timestamp changed", "ember", {**ember(), "x-ember-timestamp": str(int(NOW) + 1)},
     BODY, 401, "X-Ember-Signature does not match"),
    ("ember, no signature", "ember", without(ember(), "x-ember-signature"), BODY, 401,
     "missing X-Ember-Signature header"),
    ("ember, no timestamp", "ember", without(ember(), "x-ember-timestamp"), BODY, 401,
     "missing X-Ember-Timestamp header"),
    ("ember, stale", "ember", ember(stamp=NOW - 301), BODY, 401,
     "X-Ember-Timestamp 1699999699 is 301 s"),
    ("ember, from the future", "ember", ember(stamp=NOW + 301), BODY, 401, "X-Ember-Timestamp"),
    ("ember, timestamp not a number", "ember", {**ember(), "x-ember-timestamp": "yesterday"},
     BODY, 401, "is not unix seconds"),
    ("a CloudEvent without its source", "ember", ember(extra={"ce-specversion": "1.0", "ce-id": "1",
     "ce-type": "t"}), BODY, 400, "not a valid CloudEvent"),
    ("a structured CloudEvent that is no JSON", "ember", {**ember(b"{"), "content-type":
     "application/cloudevents+json"}, b"{", 400, "not a valid CloudEvent"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kind", "headers", "body", "status", "problem"), REFUSED, ids=[r[0] for r in REFUSED]
)
def test_refused_requests_name_the_header(
    name: str, kind: str, headers: dict[str, str], body: bytes, status: int, problem: str
) -> None:
    async def main() -> None:
        hook, sink = await started("r", signature=kind)
        code, answer = await receive("r", headers, body, NOW)
        assert code == status and problem in answer["error"], answer
        assert sink.messages.empty() and sink.held == 0
        await hook.stop()

    run(main)


def test_a_replay_is_refused_but_a_nacked_request_may_be_sent_again() -> None:
    async def main() -> None:
        hook, sink = await started("rp")
        request = ember(extra={"x-ember-id": "once"})
        _, answer = await send(hook, sink, request)
        assert answer[0] == 202
        code, refused = await receive("rp", request, BODY, NOW + 10)
        assert code == 409 and "X-Ember-Signature" in refused["error"]
        assert sink.messages.empty()

        retried = ember(b"{}", NOW + 1)
        _, answer = await send(hook, sink, retried, b"{}", ack=False)
        assert answer[0] == 503 and "retry later" in answer[1]["error"]
        assert answer[1]["status"] == "not delivered"
        _, answer = await send(hook, sink, retried, b"{}")
        assert answer[0] == 202
        await hook.stop()

    run(main)


def test_seen_signatures_are_kept_for_the_window_only() -> None:
    seen = Seen()
    assert seen.add("a", until=100, now=0)
    assert not seen.add("a", until=100, now=50)
    assert seen.add("b", until=300, now=101)  # "a" is past its window: forgotten
    assert len(seen) == 1
    seen.discard("b")
    assert seen.add("b", until=300, now=102)


def test_stopped_or_unknown_triggers_answer_404_and_waiting_requests_503() -> None:
    async def main() -> None:
        hook, sink = await started("st")
        waiting = asyncio.create_task(receive("st", ember(), BODY, NOW))
        await sink.get()
        await hook.stop()
        assert (await waiting)[0] == 503
        assert (await receive("st", ember(b"[]"), b"[]", NOW))[0] == 404
        assert (await receive("nobody", ember(), BODY, NOW))[0] == 404

    run(main)


def test_a_binary_cloudevent_keeps_its_attributes() -> None:
    async def main() -> None:
        hook, sink = await started("ce")
        attributes = {
            "ce-specversion": "1.0",
            "ce-id": "evt-7",
            "ce-source": "https://shop.example.com/orders",
            "ce-type": "com.example.order.created",
            "ce-subject": "orders/42",
            "ce-time": "2024-05-01T12:00:00Z",
            "ce-traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "content-type": "text/plain",
        }
        message, answer = await send(hook, sink, ember(b"hello", extra=attributes), b"hello")
        assert answer == (202, {"id": "evt-7", "status": "delivered"})
        event = message.event
        assert (event.id, event.source) == ("evt-7", "https://shop.example.com/orders")
        assert (event.type, event.subject) == ("com.example.order.created", "orders/42")
        assert (event.time, event.datacontenttype) == ("2024-05-01T12:00:00Z", "text/plain")
        assert event.data == b"hello"
        assert event.extensions == {"traceparent": attributes["ce-traceparent"]}
        await hook.stop()

    run(main)


def test_a_structured_cloudevent_keeps_its_attributes() -> None:
    async def main() -> None:
        hook, sink = await started("cs", signature="github")
        body = json.dumps({
            "specversion": "1.0",
            "id": "evt-8",
            "source": "/billing",
            "type": "com.example.invoice.paid",
            "datacontenttype": "application/json",
            "region": "eu",
            "data": {"invoice": 8},
        }).encode()  # fmt: skip
        headers = {**github(body), "content-type": "application/cloudevents+json"}
        message, answer = await send(hook, sink, headers, body)
        assert answer[0] == 202
        event = message.event
        assert (event.id, event.source, event.type) == (
            "evt-8",
            "/billing",
            "com.example.invoice.paid",
        )
        assert json.loads(event.data) == {"invoice": 8}
        assert event.datacontenttype == "application/json"
        assert event.extensions == {"region": "eu"}
        await hook.stop()

    run(main)
