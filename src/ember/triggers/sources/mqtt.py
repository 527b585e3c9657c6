"""MQTT 3.1.1 and 5 subscriptions as an event source (aiomqtt over paho-mqtt).

Delivery: QoS 1 (the default) in a persistent session. The client id is derived from the
trigger id and the session is never started clean (v5: kept SESSION_EXPIRY seconds after a
disconnect), so what is published while Ember is away waits in the broker, up to the broker's
own queue limit (mosquitto: max_queued_messages). The PUBACK of a message is sent at `ack`, not
on receipt: paho's manual acknowledgement, which aiomqtt 2.5 does not expose yet (its issue
#345), so `_paho` reaches the paho client under it. QoS 0 messages are never acknowledged nor
sent again (at most once).

Back-pressure: a v5 client names its Receive Maximum in CONNECT and the broker sends no more
un-acked QoS 1 messages than that; the source uses the trigger's room when it first connects.
Under 3.1.1 the broker's own limit applies (mosquitto's max_inflight_messages, 20 by default).
Messages a broker sends beyond it wait in memory: mosquitto 2.0.11 (Debian 12's) gives back two
places per PUBACK, so once messages are acked it sends more than the window.

nack: MQTT has no negative acknowledgement; a broker sends an un-acked message again only when
the session reconnects, and until then the message holds one place of the in-flight window, so
a few nacks would stall the trigger. After a nack the source therefore hands over no more
messages, waits (at most DRAIN seconds) until those it handed over on this connection are
settled, disconnects and connects again: the broker then resends the nacked messages and those
not handed over yet. A broker resends with the original packet ids, which it reuses once a
message is acked, so an ack that arrives after its connection ended is dropped (the message
comes again: at least once) rather than sent on the next connection.

Event: subject the topic; datacontenttype the v5 content type; other v5 user properties whose
names are valid CloudEvents extension names become extensions, and a retained message has
`mqttretained: "true"`. A CloudEvent in binary mode (v5 user properties named as the attributes,
`specversion`, `id`...; a `ce-` prefix is accepted too) or in structured mode (content type
application/cloudevents+json) keeps its attributes. MQTT messages have no id: otherwise the id
is the packet id and a digest of topic and payload, stable across redelivery in the session
(the broker resends with the original packet id); two messages share it only with the same
topic, payload and packet id (reused after at most 65535 messages).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple
from urllib.parse import quote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ember.triggers.base import (
    Event,
    Events,
    Message,
    TriggerError,
    only,
    reading,
    stopped,
    text_field,
)
from ember.triggers.envelope import RESERVED, content_mode, from_http, now

log = logging.getLogger("ember.triggers.mqtt")

KEYS = ("url", "topic", "qos", "version", "client_id", "username", "password", "shared")
SESSION_EXPIRY = 7 * 24 * 3600  # s the broker keeps a v5 session (and its messages) offline
CHECK_TIMEOUT = 3.0
KEEPALIVE = 30
DRAIN = 30.0  # s to wait after a nack for the messages handed over before reconnecting
REDELIVER_PAUSE = 1.0  # s between the disconnect after a nack and the new connection
QOS0_QUEUE = 1000  # QoS 0 messages kept unread (the broker does not bound those); more dropped
FIRST = asyncio.FIRST_COMPLETED
TYPE = "io.ember.mqtt.message"
_NAME = re.compile(r"[a-z0-9]+")  # a valid CloudEvents extension name
# What goes into a header value as is when it is handed to the HTTP binding's reader (which
# percent-decodes): printable ASCII but '"' and '%'.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


class _Token(NamedTuple):
    generation: int  # the connection it came on
    mid: int
    qos: int


class Mqtt:
    type: ClassVar[str] = "mqtt"
    durable: ClassVar[bool] = True

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        only(config, KEYS)
        url = text_field(config, "url")
        _address(url)
        topic = text_field(config, "topic")
        _check_filter(topic)
        qos = config.get("qos", 1)
        if qos == 2 and type(qos) is int:
            raise TriggerError("qos", "QoS 2 is not supported: use 1 (at least once) or 0")
        if type(qos) is not int or qos not in (0, 1):
            raise TriggerError("qos", f"must be 0 or 1, not {qos!r}")
        version = config.get("version", "5")
        version = "5" if version in (5, "5", "5.0") else version
        if version not in ("5", "3.1.1"):
            raise TriggerError("version", f'must be "5" or "3.1.1", not {version!r}')
        client_id = text_field(config, "client_id", "")
        if len(client_id.encode()) > 65535:
            raise TriggerError("client_id", "is longer than MQTT allows (65535 bytes)")
        username = _optional(config, "username")
        password = _optional(config, "password")
        if password is not None and username is None:
            raise TriggerError("password", "needs a `username:` as well")
        shared = _optional(config, "shared")
        if shared is not None and any(c in shared for c in "/+#"):
            raise TriggerError("shared", f"a group name cannot contain /, + or #: {shared!r}")
        return {
            "url": url,
            "topic": topic,
            "qos": qos,
            "version": version,
            "client_id": client_id,
            "username": username,
            "password": password,
            "shared": shared,
        }

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self._config = config
        self._events = events
        self._host, self._port = _address(config["url"])
        topic, shared = config["topic"], config["shared"]
        self._filter = f"$share/{shared}/{topic}" if shared else topic
        self._source = f"mqtt://{self._host}:{self._port}/{topic}"
        digest = hashlib.sha256(events.id.encode()).hexdigest()
        self._client_id = config["client_id"] or f"ember{digest[:18]}"  # 23: 3.1.1's minimum
        self._v5 = config["version"] == "5"
        self._window = 0  # Receive Maximum: the room when first connected
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._handed: set[int] = set()  # mids handed over on this connection, not yet settled
        self._idle = asyncio.Event()  # set while _handed is empty
        self._nacked = asyncio.Event()

    async def check(self) -> None:
        """Connect once with a throwaway clean session (the trigger's own is left alone)."""
        client = self._new_client(f"embercheck{secrets.token_hex(6)}", persistent=False)
        _paho(client).connect_timeout = CHECK_TIMEOUT
        try:
            async with client:
                pass
        except MqttConnectError as exc:
            raise TriggerError(_refused_field(str(exc)), f"the broker refused: {exc}") from None
        except aiomqtt.MqttError as exc:
            url = self._config["url"]
            raise TriggerError(
                "url", f"cannot reach the MQTT broker at {url}: {exc}; is the broker running?"
            ) from None

    async def start(self) -> None:
        self._task = reading(self._events, self._session)

    async def stop(self) -> None:
        await stopped(self._task)
        self._task = None

    async def ack(self, message: Message) -> None:
        token = _token(message)
        client = self._client
        if token.qos and client is not None and token.generation == self._generation:
            _paho(client).ack(token.mid, token.qos)  # not connected: sent again later anyway
        self._settle(token)

    async def nack(self, message: Message) -> None:
        token = _token(message)
        if token.qos and token.generation == self._generation:
            self._nacked.set()
        self._settle(token)

    def _settle(self, token: _Token) -> None:
        if token.generation == self._generation:
            self._handed.discard(token.mid)
            if not self._handed:
                self._idle.set()

    async def _session(self) -> None:
        while True:  # returns only by raising; a connection ends by itself after nacks
            _stop_if_cancelled()
            await self._connection()
            await asyncio.sleep(REDELIVER_PAUSE)

    async def _connection(self) -> None:
        self._window = min(max(self._window, self._events.room, 1), 65535)
        async with self._new_client(self._client_id, persistent=True) as client:
            await self._subscribe(client)
            _stop_if_cancelled()
            self._generation += 1
            self._client, self._handed = client, set()
            self._idle.set()
            self._nacked.clear()
            self._events.connected()
            try:
                await self._serve(client)
            finally:
                self._client = None

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Read until the connection fails (raises) or a nack asks for a redelivery."""
        reader = asyncio.create_task(self._read(client, self._generation))
        tasks = {reader, asyncio.create_task(self._nacked.wait())}
        try:
            await asyncio.wait(tasks, return_when=FIRST)
            if not reader.done():  # drain; what is still out after DRAIN is acked in vain
                idle = asyncio.create_task(self._idle.wait())
                tasks.add(idle)
                await asyncio.wait({reader, idle}, timeout=DRAIN, return_when=FIRST)
            if reader.done():
                await reader  # raises why the connection ended
                raise aiomqtt.MqttError("the message stream ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)

    async def _read(self, client: aiomqtt.Client, generation: int) -> None:
        async for received in client.messages:
            if self._nacked.is_set():
                continue  # not acked: the broker sends it again after the reconnect
            token = _Token(generation, received.mid, received.qos)
            message = Message(self._event(received), token, str(received.topic))
            if token.qos:
                self._handed.add(token.mid)
                self._idle.clear()
            try:
                await self._events.put(message)
            except BaseException:
                self._settle(token)
                raise

    def _new_client(self, identifier: str, persistent: bool) -> aiomqtt.Client:
        options: dict[str, Any] = {}
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if persistent:
                properties.SessionExpiryInterval = SESSION_EXPIRY
                properties.ReceiveMaximum = self._window
            options = {"clean_start": not persistent, "properties": properties}
        else:
            options = {"clean_session": not persistent}
        config = self._config
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=config["username"],
            password=config["password"],
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            keepalive=KEEPALIVE,
            timeout=CHECK_TIMEOUT if not persistent else None,
            max_queued_incoming_messages=QOS0_QUEUE if config["qos"] == 0 else 0,
            **options,
        )
        _paho(client).manual_ack_set(True)
        return client

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        qos = self._config["qos"]
        # v5: retained messages only when the subscription is new, not at every reconnect
        if self._v5:  # the options carry the QoS
            options = SubscribeOptions(qos=qos, retainHandling=1)
            granted = await client.subscribe(self._filter, 0, options)
        else:
            granted = await client.subscribe(self._filter, qos)
        code = granted[0]
        if code.is_failure if isinstance(code, ReasonCode) else code >= 0x80:
            raise TriggerError("topic", f"the broker refused to subscribe to {self._filter!r}")

    def _event(self, received: aiomqtt.Message) -> Event:
        topic = str(received.topic)
        properties = received.properties
        content_type: str = getattr(properties, "ContentType", "")
        user: dict[str, str] = dict(getattr(properties, "UserProperty", []))
        event = _cloudevent(user, content_type, received.payload)
        if event is not None:
            return event
        digest = hashlib.sha256(topic.encode() + b"\0" + received.payload).hexdigest()[:16]
        extensions = {name: value for name, value in user.items() if _extension_name(name)}
        if received.retain:
            extensions["mqttretained"] = "true"
        return Event(
            id=f"{received.mid}-{digest}" if received.qos else secrets.token_hex(12),
            source=self._source,
            type=TYPE,
            time=now(),
            subject=topic,
            datacontenttype=content_type,
            data=received.payload,
            extensions=extensions,
        )


def _cloudevent(user: dict[str, str], content_type: str, payload: bytes) -> Event | None:
    """The CloudEvent a message carries (binary mode in v5 user properties, or structured
    mode), else None."""
    fields = [(b"content-type", content_type.encode())] if content_type else []
    prefix = "" if "specversion" in user else "ce-" if "ce-specversion" in user else None
    if prefix is not None:
        for name, value in user.items():
            if name.startswith(prefix):
                header = f"ce-{name[len(prefix) :]}".encode(errors="replace")
                fields.append((header, quote(value, safe=_SAFE).encode()))
    if content_mode(fields) not in ("binary", "structured"):
        return None
    try:
        (event,) = from_http(fields, payload)
    except ValueError as exc:
        log.warning("an MQTT message is a malformed CloudEvent, taken as plain: %s", exc)
        return None
    return event


def _stop_if_cancelled() -> None:
    """Raise a cancellation aiomqtt lost: on Python 3.11 the `asyncio.wait_for` it waits for
    CONNACK and SUBACK with drops a cancel that arrives as the reply does (CPython gh-86296);
    `stop` would then wait for a session that goes on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _extension_name(name: str) -> bool:
    return name not in RESERVED and _NAME.fullmatch(name) is not None


def _check_filter(topic: str) -> None:
    if len(topic.encode()) > 65535 or "\0" in topic:
        raise TriggerError("topic", "is longer than 65535 bytes or contains a NUL character")
    if topic.startswith("$share/"):
        raise TriggerError("topic", "name the group with `shared:`, not with $share/ here")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TriggerError("topic", f"'#' must be the whole last level (a/#), in {topic!r}")
        if "+" in level and level != "+":
            raise TriggerError("topic", f"'+' must be a whole level (a/+/b), in {topic!r}")


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port or 1883
    except ValueError:
        raise TriggerError("url", f"has an invalid port: {url!r}") from None
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/"):
        raise TriggerError("url", f"must be mqtt://host:port, not {url!r}")
    if parts.username is not None or parts.query or parts.fragment:
        raise TriggerError("url", "must be only mqtt://host:port (credentials: username:)")
    return parts.hostname, port


def _optional(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise TriggerError(key, f"must be a non-empty string, not {value!r}")
    return value


def _refused_field(reason: str) -> str:
    reason = reason.lower()
    if "protocol" in reason:
        return "version"
    if "identifier" in reason:
        return "client_id"
    return "username" if "author" in reason or "password" in reason else "url"


def _token(message: Message) -> _Token:
    if not isinstance(message.token, _Token):
        raise TypeError(f"not a message of an MQTT trigger: {message.token!r}")
    return message.token


def _paho(client: aiomqtt.Client) -> paho.Client:
    """The paho client under aiomqtt, for what aiomqtt 2.5 lacks (manual PUBACK)."""
    return client._client
