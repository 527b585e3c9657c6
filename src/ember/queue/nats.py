"""The queue in NATS JetStream (`ember up --queue nats://...`), for a prefix P:

- KV bucket `P-invocations` (file storage, one revision per key), <fn> being the function's
  name in hex (names hold '/', keys may not):
    r.<fn>.<id>   the whole `Invocation` (msgpack), `seq` being its first work message's sequence
    k.<fn>.<sha256 of the idempotency key, hex>   the id of the invocation that first used it
    n.<fn>.<id>   set while the invocation's callback or destinations are still to be sent
- stream `P-work` (work-queue retention, file storage): a message per queued or running
  invocation, its id, on `P.work.<fn>`, handed out by a durable pull consumer per function
  (named <fn>). One not yet due is nak'd with the delay to its `not_before`, so the server
  delivers it again then; a running one's message is held until `save` acks it (ended) or naks
  it (a retry). The message goes first and the record after: a crash between leaves a message
  `take` drops, never a queued record nothing would deliver.
- stream `P-ended`: entries (function, id, ended) of invocations that ended, in the order they
  ended, which `prune` reads from the oldest. Saves write them in groups (`_Log`): a message
  holds the entries added while the one before it was being stored, and each save waits for
  its entry's message before writing the ended record.

One Ember server owns a prefix: the schedule of queued invocations (`next_due`, `backlog`, and
whether `take` need ask the server at all) is kept in memory, and `open` rebuilds it by deleting
the consumers (what a previous server held is delivered again at once) and reading every work
message. Everything written is acknowledged by JetStream before the call returns. A record is
one message, so the server's `max_payload` (1 MB unless configured) bounds an invocation's
request and result together.

Under load, the cost is per invocation: a put is two publishes (message, record), a take one
record write (running; the pull is shared by a batch), a save one record write, a share of an
ended-log message and an ack. So the hot writes go through `_Replies`, a leaner request path
than nats-py's `request` and JetStream `publish`, and a take finds what this server put or
queued again in a bounded cache (`_keep`) rather than reading it back: every write names the
revision it replaces, so a cached copy that is no longer the record fails to write and is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from ember.queue.base import (
    CANCELLED,
    DEAD,
    ENDED,
    QUEUED,
    RUNNING,
    Backlog,
    Invocation,
    Invocations,
)

log = logging.getLogger("ember.queue")
T = TypeVar("T")
R = TypeVar("R")
# (the `list` method would shadow the builtin in the signatures after it)
Found = tuple[Invocation, int]  # a record, and its revision
Records = list[Found]
Msgs = list[Msg]
Entries = list[tuple[str, str]]  # (function, id)

ACK_WAIT = 3600.0  # s a taken message stays with us unanswered: longer than any attempt
PULL = 256  # messages one request asks for when a whole consumer is read
WIDTH = 256  # requests in flight at once when many records are read or written
TIMEOUT = 5.0  # s for the server's answer
CACHE = 64 * 2**20  # bytes of queued invocations kept in memory, to be taken without a read
CACHED = 2048  # bytes an invocation held in memory takes beside its stored size (a guess)
START_ATTEMPTS = 3  # to connect at open, 2 s apart: `ember up` with a wrong URL fails soon

_TOKEN = re.compile(r"[-/=_A-Za-z0-9]+")  # what a KV key's part may hold (but '.')
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Invocation).decode
_decode_entries = msgspec.msgpack.Decoder(list[tuple[str, str, float]]).decode
_decode_entry = msgspec.msgpack.Decoder(tuple[str, str, float]).decode


def _decode_ended(data: bytes) -> list[tuple[str, str, float]]:
    """An ended log message: its entries (a lone entry, as earlier versions logged them)."""
    try:
        return _decode_entries(data)
    except msgspec.ValidationError:
        return [_decode_entry(data)]


def _fx(function: str) -> str:
    return function.encode().hex()


def _reader(
    subject: str, deliver: api.DeliverPolicy = api.DeliverPolicy.LAST_PER_SUBJECT
) -> api.ConsumerConfig:
    """A consumer for one read of a stream that is no work queue (nothing to acknowledge)."""
    return api.ConsumerConfig(
        filter_subject=subject,
        deliver_policy=deliver,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=60.0,  # s: gone soon if this server dies before deleting it
        mem_storage=True,
    )


async def _each(fn: Callable[[T], Awaitable[R]], items: Sequence[T]) -> list[R]:
    """`fn` over `items`, at most WIDTH at a time."""
    out: list[R] = []
    for start in range(0, len(items), WIDTH):
        out += await asyncio.gather(*(fn(item) for item in items[start : start + WIDTH]))
    return out


class _Queued:
    """One function's queued invocations, (not_before, accepted) by id, with the earliest of
    each at hand: heaps whose entries for ids gone or changed are dropped when they surface
    (`next_due` is asked often, `backlog` every second)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[float, float]] = {}
        self._heaps: tuple[list[tuple[float, str]], list[tuple[float, str]]] = ([], [])

    def __len__(self) -> int:
        return len(self.items)

    def add(self, inv: Invocation) -> None:
        self.items[inv.id] = (inv.not_before, inv.accepted)
        for field, heap in enumerate(self._heaps):
            heapq.heappush(heap, (self.items[inv.id][field], inv.id))
            if len(heap) > 2 * len(self.items) + 64:  # mostly stale entries: rebuilt
                heap[:] = [(v[field], k) for k, v in self.items.items()]
                heapq.heapify(heap)

    def discard(self, id: str) -> None:
        self.items.pop(id, None)

    def earliest(self, field: int) -> float | None:
        """The smallest not_before (field 0) or accepted (field 1)."""
        heap = self._heaps[field]
        while heap:
            value, id = heap[0]
            item = self.items.get(id)
            if item is not None and item[field] == value:
                return value
            heapq.heappop(heap)
        return None


class _Puller:
    """Pulls from one consumer without waiting: a no-wait request is answered with what is
    available now, then a status (404, 408) if that was fewer than asked. The inbox lives as
    long as the puller, so what arrives after a pull gave up is read by the next one."""

    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._arrived: deque[Msg] = deque()
        self._event = asyncio.Event()
        self._sub: Subscription | None = None
        self.lock = asyncio.Lock()  # one take of the function at a time

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        self._arrived.append(msg)
        self._event.set()

    async def pull(self, n: int) -> list[Msg]:
        request = msgspec.json.encode({"batch": n, "no_wait": True})
        await self._nc.publish(self._next, request, reply=self._inbox)
        got: list[Msg] = []
        with contextlib.suppress(TimeoutError):  # a slow server: the next pull reads the rest
            async with asyncio.timeout(TIMEOUT):
                while len(got) < n:
                    while not self._arrived:
                        self._event.clear()
                        await self._event.wait()
                    msg = self._arrived.popleft()
                    if msg.headers and "Status" in msg.headers:
                        break
                    got.append(msg)
        return got

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


class _Error(msgspec.Struct):
    code: int
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: the message's sequence in its stream, or an error."""

    seq: int = 0
    error: _Error | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode
_WRONG_LAST = (10071, 10164)  # JetStream's "wrong last sequence" error codes


class _Replies:
    """Requests whose answers all come to one subscription (`<inbox>.<n>`), each awaited as a
    plain future with a timer for its timeout: what nats-py's `request` and JetStream
    `publish` do, without their per-call task, token and JSON parsing, which were most of the
    queue's CPU under load."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._next = 0
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> Msg:
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(TIMEOUT, self._expire, token)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await future
        finally:
            timer.cancel()
            self._waiting.pop(token, None)

    def _expire(self, token: str) -> None:
        future = self._waiting.pop(token, None)
        if future is not None and not future.done():
            future.set_exception(nats.errors.TimeoutError())

    async def publish(self, subject: str, payload: bytes, last: int | None = None) -> int:
        """A JetStream publish (if `last` is given, only while `subject`'s last message is that
        sequence, 0: none); its sequence once the stream stored it."""
        headers = None if last is None else {"Nats-Expected-Last-Subject-Sequence": str(last)}
        reply = await self.request(subject, payload, headers)
        if reply.headers and "Status" in reply.headers:  # 503: no stream takes the subject
            raise NoStreamResponseError
        ack = _decode_ack(reply.data)
        if ack.error is not None:
            if ack.error.err_code in _WRONG_LAST:
                raise KeyWrongLastSequenceError(description=ack.error.description)
            APIError.from_error(msgspec.structs.asdict(ack.error))
        return ack.seq


class _Log:
    """The ended log written in groups: entries added while one message is being stored go
    together in the next, and each `add` returns once the message holding its entry is
    stored (a group commit: one publish for many saves under load)."""

    def __init__(self, replies: _Replies, subject: str) -> None:
        self._replies, self._subject = replies, subject
        self._pending: list[tuple[str, str, float]] = []
        self._stored: asyncio.Future[None] | None = None  # of the pending entries' message
        self._writer: asyncio.Task[None] | None = None

    async def add(self, function: str, id: str, ended: float) -> None:
        if self._stored is None:
            self._stored = asyncio.get_running_loop().create_future()
        stored = self._stored
        self._pending.append((function, id, ended))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        await asyncio.shield(stored)

    async def _write(self) -> None:
        try:
            while self._stored is not None:
                entries, stored = self._pending, self._stored
                self._pending, self._stored = [], None
                try:
                    await self._replies.publish(self._subject, _encode(entries))
                except Exception as exc:
                    stored.set_exception(exc)
                else:
                    stored.set_result(None)
        finally:
            self._writer = None


@dataclass(slots=True)
class _Held:
    """A running invocation's work message, and the revision of its record we wrote."""

    msg: Msg
    revision: int


class NatsQueue:
    """The `Queue` on NATS JetStream, its streams and bucket named after `prefix`."""

    name = "nats"

    def __init__(self, url: str, prefix: str = "ember") -> None:
        self.url, self.prefix = url, prefix
        self.max_record = 0  # the server's max_payload, once connected
        self._nc = Client()
        self._js = self._nc.jetstream(timeout=TIMEOUT)
        self._kv: KeyValue  # set by open
        bucket = f"{prefix}-invocations"
        self._bucket, self._kv_stream, self._kv_prefix = bucket, f"KV_{bucket}", f"$KV.{bucket}."
        self._work, self._ended = f"{prefix}-work", f"{prefix}-ended"
        self._ended_subject = f"{prefix}.ended"
        self._queued: dict[str, _Queued] = {}
        self._held: dict[str, _Held] = {}
        self._writing: dict[str, asyncio.Future[None]] = {}  # ids whose message is out first
        self._pullers: dict[str, _Puller] = {}
        self._pullers_lock = asyncio.Lock()
        self._replies = _Replies(self._nc)
        self._log = _Log(self._replies, self._ended_subject)
        # Queued invocations as this server last wrote them, and their revision, so a take
        # need not read them back (a write with that revision as the expected last one fails
        # if the record changed since: then it is read); `_cached` bytes of them at most CACHE.
        self._cache: dict[str, tuple[Invocation, int, int]] = {}  # by id: and its size
        self._cached = 0

    # ---- names ----
    def _subject(self, function: str) -> str:
        return f"{self.prefix}.work.{_fx(function)}"

    def _record(self, function: str, id: str) -> str:
        return f"r.{_fx(function)}.{id}"

    def _marker(self, function: str, id: str) -> str:
        return f"n.{_fx(function)}.{id}"

    def _key(self, function: str, idempotency_key: str) -> str:
        return f"k.{_fx(function)}.{hashlib.sha256(idempotency_key.encode()).hexdigest()}"

    # ---- the protocol ----
    async def open(self) -> None:
        await self._nc.connect(
            self.url,
            name=f"ember-queue-{self.prefix}",
            error_cb=self._connection_error,
            max_reconnect_attempts=START_ATTEMPTS,
        )
        self._nc.options["max_reconnect_attempts"] = -1  # once up, a server restart is waited out
        self.max_record = self._nc.max_payload
        await self._replies.start()
        await self._js.add_stream(
            name=self._work,
            subjects=[f"{self.prefix}.work.*"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
        )
        await self._js.add_stream(
            name=self._ended, subjects=[self._ended_subject], storage=api.StorageType.FILE
        )
        self._kv = await self._js.create_key_value(
            bucket=self._bucket, history=1, storage=api.StorageType.FILE, direct=True
        )
        await self._recover()

    async def close(self) -> None:
        await self._nc.close()  # flushes what is buffered (acks) first

    async def _connection_error(self, exc: Exception) -> None:
        log.warning("the NATS queue at %s: %s", self.url, str(exc) or type(exc).__name__)

    async def put(self, inv: Invocation) -> Invocation:
        with self._storing(inv.id):
            if inv.idempotency_key:
                first = await self._first_with_key(inv)
                if first is not None:
                    return first
            if inv.status in ENDED:  # a trigger's event that ended at its first attempt
                await self._ending(inv)
                await self._replies.publish(self._subject_of(inv), _encode(inv), last=0)
                return inv
            inv.seq = await self._replies.publish(self._subject(inv.function), inv.id.encode())
            data = _encode(inv)
            revision = await self._replies.publish(self._subject_of(inv), data, last=0)
            self._queued_of(inv.function).add(inv)
            self._keep(inv, revision, len(data))
            return inv

    async def take(self, function: str, limit: int) -> Invocations:
        now = time.time()
        queued = self._queued.get(function)
        due = queued.earliest(0) if queued else None
        if limit <= 0 or due is None or due > now:  # nothing to ask the server for
            return []
        puller = await self._puller(function)
        taken: list[Invocation] = []
        async with puller.lock:
            while len(taken) < limit:
                wanted = limit - len(taken)
                msgs = await puller.pull(wanted)
                claimed = await _each(lambda msg: self._claim(function, msg, now), msgs)
                taken += [inv for inv in claimed if inv is not None]
                if len(msgs) < wanted:
                    break
        return sorted(taken, key=lambda i: (i.not_before, i.seq))

    async def next_due(self, function: str) -> float | None:
        queued = self._queued.get(function)
        return queued.earliest(0) if queued else None

    async def save(self, inv: Invocation) -> None:
        held = self._held.get(inv.id)
        if held is None:
            await self._save_ended(inv)
            return
        if inv.status in ENDED:
            await self._ending(inv)
        data = _encode(inv)
        try:
            held.revision = await self._replies.publish(
                self._subject_of(inv), data, last=held.revision
            )
        except KeyWrongLastSequenceError:
            if await self._entry(inv.function, inv.id) is not None:
                raise
            del self._held[inv.id]  # forgotten while it ran
            return
        if inv.status == QUEUED:
            del self._held[inv.id]
            self._queued_of(inv.function).add(inv)
            self._keep(inv, held.revision, len(data))
            await self._nak(held.msg, inv.not_before - time.time())
        elif inv.status in ENDED:
            del self._held[inv.id]
            await held.msg.ack()

    async def get(self, id: str) -> Invocation | None:
        found = await self._find(id)
        return None if found is None else found[0]

    async def list(self, function: str, status: str | None = None, limit: int = 100) -> Invocations:
        found = [inv for inv, _ in await self._records(function)]
        wanted = [inv for inv in found if status is None or inv.status == status]
        return sorted(wanted, key=lambda i: i.seq, reverse=True)[:limit]

    async def cancel(self, id: str, now: float) -> Invocation | None:
        while True:
            found = await self._find(id)
            if found is None or found[0].status != QUEUED:
                return None
            inv, revision = found
            self._drop(id)
            inv.status, inv.ended, inv.reason = CANCELLED, now, "cancelled before it ran"
            await self._ending(inv)
            try:
                await self._kv.update(self._record(inv.function, id), _encode(inv), last=revision)
            except KeyWrongLastSequenceError:
                continue  # taken (or forgotten) meanwhile: look again
            self._queued_of(inv.function).discard(id)
            return inv  # its message is dropped by the take that meets it

    async def replay(self, function: str, ids: Sequence[str] | None, now: float) -> Invocations:
        wanted = None if ids is None else set(ids)
        dead = [
            (inv, revision)
            for inv, revision in await self._records(function)
            if inv.status == DEAD and (wanted is None or inv.id in wanted)
        ]
        dead.sort(key=lambda found: found[0].seq)
        replayed = await _each(lambda found: self._requeue(*found, now), dead)
        return [inv for inv in replayed if inv is not None]

    async def purge(self, function: str) -> int:
        dead = [found for found in await self._records(function) if found[0].status == DEAD]
        return sum(await _each(lambda found: self._delete(*found), dead))

    async def backlog(self) -> dict[str, Backlog]:
        return {
            function: Backlog(len(queued), queued.earliest(1) or 0.0)
            for function, queued in self._queued.items()
            if queued
        }

    async def unsent(self) -> Invocations:
        markers = await self._scan_all(f"{self._kv_prefix}n.*.*")
        found = await _each(self._unsent_one, markers)
        return sorted((inv for inv in found if inv is not None), key=lambda i: i.seq)

    async def prune(self, ended_before: float) -> int:
        end = (await self._js.stream_info(self._ended)).state.last_seq
        entries, last = await self._ended_entries(ended_before, end)
        pruned = sum(await _each(lambda entry: self._prune_one(*entry, ended_before), entries))
        if last:
            await self._purge(self._ended, self._ended_subject, before=last + 1)
        return pruned

    async def forget(self, function: str) -> int:
        fx = _fx(function)
        forgotten = await self._purge(self._kv_stream, f"{self._kv_prefix}r.{fx}.*")
        await self._purge(self._kv_stream, f"{self._kv_prefix}*.{fx}.*")  # keys and markers
        await self._purge(self._work, self._subject(function))
        for id in self._queued.pop(function, _Queued()).items:
            self._drop(id)
        return forgotten

    async def publish(self, subject: str, data: bytes) -> None:
        """A destination's record, sent on core NATS (at most once: whoever wants it kept puts
        a stream on the subject); flushed, so it has left when this returns. The queue's own
        subjects are refused: a record there would be taken for an invocation."""
        if subject.startswith(("$", f"{self.prefix}.work.")) or subject == self._ended_subject:
            raise ValueError(f"{subject!r} is a subject of JetStream or of Ember's queue")
        await self._nc.publish(subject, data)
        await self._nc.flush()

    # ---- records ----
    @contextlib.contextmanager
    def _storing(self, id: str) -> Iterator[None]:
        """While a new record is written after its message: a take meeting that message, or a
        put meeting its idempotency key, waits for the record."""
        done = asyncio.get_running_loop().create_future()
        self._writing[id] = done
        try:
            yield
        finally:
            del self._writing[id]
            done.set_result(None)

    async def _entry(self, function: str, id: str) -> Found | None:
        """The record and its revision, or None (never stored, forgotten or pruned)."""
        writing = self._writing.get(id)
        if writing is not None:
            await asyncio.shield(writing)
        try:
            entry = await self._kv.get(self._record(function, id))
        except KeyNotFoundError:
            return None
        assert entry.value is not None and entry.revision is not None
        return _decode(entry.value), entry.revision

    async def _find(self, id: str) -> Found | None:
        """By id alone: the server's subject index finds the one key `r.*.<id>` matches (an
        "id" that is no key token, a wildcard say, matches nothing)."""
        if not _TOKEN.fullmatch(id):
            return None
        try:
            msg = await self._js.get_msg(self._kv_stream, subject=f"{self._kv_prefix}r.*.{id}")
        except NotFoundError:
            return None
        assert msg.data is not None and msg.seq is not None
        return _decode(msg.data), msg.seq

    async def _records(self, function: str) -> Records:
        subject = f"{self._kv_prefix}r.{_fx(function)}.*"
        msgs = await self._scan_all(subject)
        return [(_decode(msg.data), msg.metadata.sequence.stream) for msg in msgs]

    async def _first_with_key(self, inv: Invocation) -> Invocation | None:
        """The invocation that first used inv's idempotency key, or None: inv has it now."""
        key = self._key(inv.function, inv.idempotency_key)
        while True:
            try:
                await self._kv.create(key, inv.id.encode())
                return None
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                continue  # pruned meanwhile
            assert entry.value is not None
            found = await self._entry(inv.function, entry.value.decode())
            if found is not None:
                return found[0]
            try:  # the put that made the key died before storing its record: the key is free
                await self._kv.update(key, inv.id.encode(), last=entry.revision)
                return None
            except KeyWrongLastSequenceError:
                continue

    async def _ending(self, inv: Invocation) -> None:
        """Before an ended record is written: its entry for `prune` and, while its callback is
        unsent, its marker for `unsent`. A crash between leaves one too many, never too few."""
        writes: list[Awaitable[Any]] = [self._log_ended(inv)]
        if inv.notify:
            writes.append(self._kv.put(self._marker(inv.function, inv.id), inv.id.encode()))
        await asyncio.gather(*writes)

    async def _log_ended(self, inv: Invocation) -> None:
        await self._log.add(inv.function, inv.id, inv.ended)

    async def _save_ended(self, inv: Invocation) -> None:
        """The save of one not running here: an ended one whose callback and destinations
        were sent (or one forgotten meanwhile: nothing to save)."""
        found = await self._entry(inv.function, inv.id)
        if found is None:
            return
        current, revision = found
        marker = self._marker(inv.function, inv.id)
        if inv.notify:
            await self._kv.put(marker, inv.id.encode())
        await self._kv.update(self._record(inv.function, inv.id), _encode(inv), last=revision)
        if current.notify and not inv.notify:
            await self._purge(self._kv_stream, self._kv_prefix + marker)

    async def _requeue(self, inv: Invocation, revision: int, now: float) -> Invocation | None:
        """A dead one queued again as if new (its age counts from now), or None if it changed
        meanwhile. Its message goes first, as in `put`."""
        inv.status, inv.attempts, inv.not_before = QUEUED, [], now
        inv.ended, inv.result, inv.reason, inv.notify = 0.0, None, "", False
        inv.accepted = now
        with self._storing(inv.id):
            await self._js.publish(self._subject(inv.function), inv.id.encode())
            try:
                await self._kv.update(
                    self._record(inv.function, inv.id), _encode(inv), last=revision
                )
            except KeyWrongLastSequenceError:
                return None
            self._queued_of(inv.function).add(inv)
            return inv

    async def _delete(self, inv: Invocation, revision: int) -> int:
        """Forget a record unless it changed since `revision` (a purge up to that revision);
        its idempotency key goes with it."""
        subject = self._kv_prefix + self._record(inv.function, inv.id)
        deleted = await self._purge(self._kv_stream, subject, before=revision + 1)
        if deleted and inv.idempotency_key:
            key = self._kv_prefix + self._key(inv.function, inv.idempotency_key)
            await self._purge(self._kv_stream, key)
        return deleted

    async def _ended_entries(self, cutoff: float, end: int) -> tuple[Entries, int]:
        """The ended entries (function, id) from the oldest up to the first that ended at or
        after `cutoff` or was logged after sequence `end`, and the sequence of the last of them.
        One logged after a later-ended one waits for it: ended times are the order they were
        logged in, but for clock steps and callbacks sent late (logged again by _prune_one)."""
        entries: list[tuple[str, str]] = []
        last = 0
        scan = self._scan(self._ended, _reader(self._ended_subject, api.DeliverPolicy.ALL))
        async with contextlib.aclosing(scan) as batches:
            async for batch in batches:
                for msg in batch:
                    seq = msg.metadata.sequence.stream
                    for function, id, ended in _decode_ended(msg.data):
                        if ended >= cutoff or seq > end:
                            return entries, last  # (a message's first entries come again)
                        entries.append((function, id))
                    last = seq
        return entries, last

    async def _prune_one(self, function: str, id: str, ended_before: float) -> int:
        found = await self._entry(function, id)
        if found is None:
            return 0
        inv, revision = found
        if inv.status not in ENDED or inv.ended >= ended_before:
            return 0  # replayed since (a later entry has it if it ended again)
        if inv.notify:
            await self._log_ended(inv)  # looked at again once those logged before it are
            return 0
        return await self._delete(inv, revision)

    async def _unsent_one(self, marker: Msg) -> Invocation | None:
        _, fx, id = marker.subject[len(self._kv_prefix) :].split(".")
        found = await self._entry(bytes.fromhex(fx).decode(), id)
        if found is not None and found[0].notify:
            return found[0]
        # left by a crash, a replay or a purge; a purge up to it spares one set again since
        await self._purge(
            self._kv_stream, marker.subject, before=marker.metadata.sequence.stream + 1
        )
        return None

    async def _purge(self, stream: str, subject: str, before: int = 0) -> int:
        """Remove `subject`'s messages (those before sequence `before`, if given); how many."""
        request: dict[str, Any] = {"filter": subject}
        if before:
            request["seq"] = before
        reply = await self._nc.request(
            f"$JS.API.STREAM.PURGE.{stream}", msgspec.json.encode(request), timeout=TIMEOUT
        )
        answer = msgspec.json.decode(reply.data)
        if "error" in answer:
            APIError.from_error(answer["error"])
        return int(answer["purged"])

    # ---- work messages ----
    def _subject_of(self, inv: Invocation) -> str:
        """Its record's subject in the bucket's stream."""
        return self._kv_prefix + self._record(inv.function, inv.id)

    def _keep(self, inv: Invocation, revision: int, size: int) -> None:
        """Cache a queued invocation just written (a copy: the caller keeps its own)."""
        size += CACHED
        if self._cached + size <= CACHE:
            self._cached += size
            copy = msgspec.structs.replace(inv, attempts=list(inv.attempts))
            self._cache[inv.id] = (copy, revision, size)

    def _drop(self, id: str) -> Found | None:
        """A cached invocation taken out of the cache, or None."""
        cached = self._cache.pop(id, None)
        if cached is None:
            return None
        self._cached -= cached[2]
        return cached[0], cached[1]

    def _queued_of(self, function: str) -> _Queued:
        queued = self._queued.get(function)
        if queued is None:
            queued = self._queued[function] = _Queued()
        return queued

    async def _puller(self, function: str) -> _Puller:
        async with self._pullers_lock:
            puller = self._pullers.get(function)
            if puller is None:
                fx = _fx(function)
                await self._js.add_consumer(
                    self._work,
                    api.ConsumerConfig(
                        durable_name=fx,
                        filter_subject=self._subject(function),
                        ack_policy=api.AckPolicy.EXPLICIT,
                        ack_wait=ACK_WAIT,
                        max_ack_pending=-1,  # every delayed retry is pending
                        max_deliver=-1,
                    ),
                )
                puller = self._pullers[function] = _Puller(self._nc, self._work, fx)
                await puller.start()
            return puller

    async def _claim(self, function: str, msg: Msg, now: float) -> Invocation | None:
        """What a work message handed out means: one to run now (marked running, its message
        held), one not yet due (nak'd until then), or nothing (acked: its record ended, was
        forgotten, or has another message)."""
        id = msg.data.decode()
        while True:
            held = self._held.get(id)
            if held is not None:
                if held.msg.metadata.sequence.stream != msg.metadata.sequence.stream:
                    await msg.ack()  # a second message for a running one
                return None  # else its own message again, after ACK_WAIT: still held
            found = self._drop(id) or await self._entry(function, id)
            if found is None or found[0].status != QUEUED:
                await msg.ack()
                return None
            inv, revision = found
            if inv.not_before > now:
                await self._nak(msg, inv.not_before - now)
                return None
            inv.status = RUNNING
            try:
                revision = await self._replies.publish(
                    self._kv_prefix + self._record(function, id), _encode(inv), last=revision
                )
            except KeyWrongLastSequenceError:
                continue  # cancelled, forgotten or claimed through a second message: again
            self._held[id] = _Held(msg, revision)
            self._queued_of(function).discard(id)
            return inv

    async def _nak(self, msg: Msg, delay: float) -> None:
        """Deliver `msg` again after `delay` s. Sent as a request: the server has it when this
        returns, so a pull that follows sees the message when it is due."""
        payload = b"-NAK"
        if delay > 0:
            payload += b" " + msgspec.json.encode({"delay": int(delay * 1e9)})
        await self._replies.request(msg.reply, payload)

    async def _recover(self) -> None:
        """Every work message read afresh, through one consumer made for it once the others
        are deleted (what a previous server held is released with them): the schedule is
        rebuilt from the records, what was left running is queued again with an interrupted
        attempt. Deleting that consumer releases the messages for the functions' own."""
        while consumers := await self._js.consumers_info(self._work):
            for info in consumers:
                await self._js.delete_consumer(self._work, info.name)
        reader = api.ConsumerConfig(
            filter_subject=f"{self.prefix}.work.*",
            ack_policy=api.AckPolicy.EXPLICIT,  # (a work queue allows no other)
            ack_wait=ACK_WAIT,
            max_ack_pending=-1,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        seen: set[bytes] = set()  # ids
        now = time.time()
        async with contextlib.aclosing(self._scan(self._work, reader)) as batches:
            async for batch in batches:
                fresh = []
                for msg in batch:
                    if msg.data in seen:
                        await msg.ack()  # a second message for one invocation
                    else:
                        seen.add(msg.data)
                        fresh.append(msg)
                await _each(lambda msg: self._restore(msg, now), fresh)

    async def _restore(self, msg: Msg, now: float) -> None:
        function = bytes.fromhex(msg.subject.rsplit(".", 1)[1]).decode()
        id = msg.data.decode()
        found = await self._entry(function, id)
        if found is None or found[0].status not in (QUEUED, RUNNING):
            await msg.ack()  # its record ended, or never was
            return
        inv, revision = found
        if inv.status == RUNNING:
            inv.interrupted(now)
            await self._kv.update(self._record(function, id), _encode(inv), last=revision)
        self._queued_of(function).add(inv)

    # ---- scans ----
    async def _scan(self, stream: str, config: api.ConsumerConfig) -> AsyncGenerator[Msgs, None]:
        """What a consumer made for this read delivers, in batches; it is deleted after."""
        info = await self._js.add_consumer(stream, config)
        puller = _Puller(self._nc, stream, info.name)
        await puller.start()
        try:
            while True:
                batch = await puller.pull(PULL)
                if batch:
                    yield batch
                if len(batch) < PULL or batch[-1].metadata.num_pending == 0:
                    return
        finally:
            await puller.close()
            await self._js.delete_consumer(stream, info.name)

    async def _scan_all(self, subject: str) -> Msgs:
        """The KV bucket's keys that match `subject`, each at its last revision."""
        out: list[Msg] = []
        async with contextlib.aclosing(self._scan(self._kv_stream, _reader(subject))) as batches:
            async for batch in batches:
                out += batch
        return out
