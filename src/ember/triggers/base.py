"""What an event source is to Ember: the `Source` protocol a connector meets, the `Events` it
hands messages to, and the CloudEvents attributes every message carries.

A source is one module. It reads its broker and hands each message to `Events.put`, which
waits while the trigger already holds as many messages as it may (back-pressure: a slow
function makes the source read slowly). Ember later calls `ack` once the function succeeded or
the event is in the durable async queue, or `nack` when neither happened, so the broker keeps
it. Sources register under the `ember.triggers` entry-point group (docs/triggers.md, "Writing a
connector"); `ember.triggers.registry` finds them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, Protocol

import msgspec

# Attributes a filter may name besides extensions (CloudEvents 1.0 context attributes).
ATTRIBUTES = ("id", "source", "type", "subject", "time", "datacontenttype", "dataschema")


class Event(msgspec.Struct, kw_only=True, gc=False):
    """One CloudEvents 1.0 event, as a source fills it: `data` is the payload's bytes."""

    id: str
    source: str  # a URI-reference naming where it came from, e.g. "nats://127.0.0.1:4222/orders"
    type: str  # e.g. "io.ember.nats.message"
    time: str = ""  # RFC 3339; empty: the time Ember received it
    subject: str = ""  # the topic, subject, queue, stream or channel
    datacontenttype: str = ""
    dataschema: str = ""
    data: bytes = b""
    extensions: dict[str, str] = {}

    def attribute(self, name: str) -> str:
        """A context attribute or extension by its CloudEvents name ("" if unset)."""
        if name in ATTRIBUTES:
            return str(getattr(self, name))
        return self.extensions.get(name, "")


class Message:
    """An event a source read, with what the source needs to acknowledge it (`token`)."""

    __slots__ = ("event", "key", "received", "token")

    def __init__(self, event: Event, token: object = None, key: str = "") -> None:
        self.event = event
        self.token = token  # the source's own handle: a delivery tag, a stream id, a msg
        self.key = key  # the source's ordering key (e.g. the topic); delivery.order_by may override
        self.received = time.time()


class TriggerError(Exception):
    """A trigger's configuration is wrong (or its broker unreachable): `field` names the key
    under the trigger, `problem` says what is wrong and what to do."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class Events(Protocol):
    """The trigger's side, as a source sees it."""

    id: str  # the trigger's id (stable for its life; /hooks/{id} for webhooks)
    function: str  # "namespace/name"
    name: str  # the trigger's name within the function

    @property
    def room(self) -> int:
        """How many more messages `put` takes now without waiting (size a fetch with it)."""
        ...

    async def put(self, message: Message) -> None:
        """Hand a message over; waits while the trigger is at its limit (back-pressure)."""
        ...

    async def free(self) -> int:
        """Wait until at least half the trigger's room is free, and return the room: a source
        that pulls (JetStream, Redis) sizes its next read with it, so a busy trigger reads in
        batches rather than one message per round trip."""
        ...

    def connected(self) -> None:
        """The broker is reached and messages are read: the trigger's state is `running`."""
        ...

    def failing(self, error: str) -> None:
        """The broker is unreachable or refused: the state is `failing`, with `error`."""
        ...

    def backlog(self, pending: int, oldest: float = 0.0) -> None:
        """What the broker still holds for this trigger (its lag), and the unix time the oldest
        of it was written when the broker says (0: unknown)."""
        ...

    async def load_state(self) -> bytes:
        """What `save_state` stored last (b"" if nothing): kept across restarts and deploys."""
        ...

    async def save_state(self, state: bytes) -> None: ...


class Source(Protocol):
    """One kind of event source (`type:` in ember.yaml). Its class is registered under the
    `ember.triggers` entry-point group with the type as the entry's name."""

    type: ClassVar[str]
    # The source acknowledges messages to its broker (at-least-once); False: the broker
    # forgets a message once sent (NATS core, PostgreSQL NOTIFY): at-most-once across restarts.
    durable: ClassVar[bool]

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The trigger's own keys (all but type, name, filter, delivery), checked and with
        defaults filled; raises `TriggerError(field, problem)`. No I/O."""
        ...

    def __init__(self, config: dict[str, Any], events: Events) -> None: ...

    async def check(self) -> None:
        """Reach the broker once (connect, maybe declare, disconnect); raises `TriggerError`
        naming the field at fault. Called at deploy, before anything is committed."""
        ...

    async def start(self) -> None:
        """Begin reading, in the source's own task, reconnecting (`keep_connected`) until
        `stop`. Returns at once; failures show through `Events.failing`."""
        ...

    async def stop(self) -> None:
        """Stop reading and disconnect. Messages put but not acked are the broker's again."""
        ...

    async def ack(self, message: Message) -> None:
        """The event was delivered or queued durably: the broker may forget it."""
        ...

    async def nack(self, message: Message) -> None:
        """The event could be neither delivered nor queued: the broker should send it again."""
        ...


BACKOFF_FIRST, BACKOFF_MAX = 0.2, 30.0
STEADY = 30.0  # seconds a session must last for the next failure to start the backoff over


async def keep_connected(
    events: Events,
    session: Callable[[], Awaitable[None]],
    first: float = BACKOFF_FIRST,
    most: float = BACKOFF_MAX,
) -> None:
    """Run `session` (connect, call `events.connected()`, read until the connection ends) again
    and again until cancelled, waiting first, 2 * first, ... at most `most` seconds between
    tries. A failure is reported with `events.failing` as `Type: message`."""
    wait = first
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        try:
            await session()
            error = "the connection ended"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = describe(exc)
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # a stop whose cancel a library swallowed
            raise asyncio.CancelledError
        events.failing(error)
        if loop.time() - began > STEADY:
            wait = first
        await asyncio.sleep(wait)
        wait = min(wait * 2, most)


def reading(
    events: Events, session: Callable[[], Awaitable[None]], most: float = BACKOFF_MAX
) -> asyncio.Task[None]:
    """A source's `start`: its sessions (`keep_connected`) in a task of their own."""
    return asyncio.create_task(
        keep_connected(events, session, most=most), name=f"trigger {events.id}"
    )


async def stopped(task: asyncio.Task[None] | None) -> None:
    """A source's `stop`: its reading task cancelled and awaited (nothing of it runs after)."""
    if task is not None:
        task.cancel()
        await asyncio.wait({task})


def describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:500]


def text_field(config: Mapping[str, Any], key: str, default: str | None = None) -> str:
    """A string setting: required when `default` is None."""
    value = config.get(key, default)
    if value is None:
        raise TriggerError(key, f"is required: add `{key}:` to the trigger")
    if not isinstance(value, str) or (default is None and not value):
        raise TriggerError(key, f"must be a non-empty string, not {value!r}")
    return value


def int_field(config: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TriggerError(key, f"must be a whole number from {low} to {high}, not {value!r}")
    return value


def only(config: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse keys a source does not know (a typo would otherwise be ignored)."""
    for key in config:
        if key not in allowed:
            raise TriggerError(
                str(key), f"is not a setting of this trigger type; known: {', '.join(allowed)}"
            )
