"""The default queue: `EMBER_HOME/queue.db`, SQLite in WAL mode with `synchronous=FULL`.

Writes go through one connection on one thread and are group-committed: whatever the event
loop asked for while the previous transaction was being fsync'd goes in the next one, each in
its own savepoint, so 32 producers cost one fsync per round, not 32 (`put` returns once its
transaction is on disk). Reads (`get`, `list`, `backlog`, ...) use a second connection on a
thread of their own: WAL lets them see the last commit without holding up the writer, so a
count over a backlog of 100,000 never delays an acceptance. A row keeps the whole record as
msgpack; the columns beside it are what the queue looks things up by.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ember.queue.base import (
    CANCELLED,
    DEAD,
    QUEUED,
    RUNNING,
    Backlog,
    Invocation,
    Invocations,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    function TEXT NOT NULL,
    status TEXT NOT NULL,
    not_before REAL NOT NULL,
    accepted REAL NOT NULL,
    ended REAL NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    notify INTEGER NOT NULL DEFAULT 0,
    record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS invocations_due
    ON invocations (function, not_before, seq) WHERE status = 'queued';
CREATE UNIQUE INDEX IF NOT EXISTS invocations_idempotent
    ON invocations (function, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS invocations_by_function ON invocations (function, status, seq);
CREATE INDEX IF NOT EXISTS invocations_ended ON invocations (ended) WHERE ended > 0;
CREATE INDEX IF NOT EXISTS invocations_queued
    ON invocations (function, accepted) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS invocations_unsent ON invocations (seq) WHERE notify = 1;
"""

DELETE_STEP = 2000  # rows one transaction of a purge, prune or forget deletes at most
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Invocation).decode
_COLUMNS = "seq, status, record"


def _row(row: tuple[int, str, bytes]) -> Invocation:
    inv = _decode(row[2])
    inv.seq, inv.status = row[0], row[1]
    return inv


class SQLiteQueue:
    name = "sqlite"
    max_record = 0  # a row may hold up to 1 GB: the async body limit is the bound

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ember-queue")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ember-queue-read")
        self._db: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._committing: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by open

    # ---- the thread ----
    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._rdb is not None
            return fn(self._rdb)

        return await asyncio.get_running_loop().run_in_executor(self._reader, call)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `fn` in the next group commit; the future is done once that commit is durable.
        (A future, not a coroutine: the dispatcher adds callbacks to it, no task per call.)"""
        loop = self._loop  # kept: asyncio.get_running_loop() costs a getpid() each call
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, future))
        if self._committing is None:
            self._committing = loop.create_task(self._commit_rounds())
        return future

    async def _commit_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    outcomes = await loop.run_in_executor(self._thread, self._commit, batch)
                except BaseException as exc:  # the commit itself failed: nothing is durable
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(
                                exc
                                if isinstance(exc, Exception)
                                else RuntimeError("the queue stopped")
                            )
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._committing = None

    def _commit(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Any]]
    ) -> list[tuple[bool, Any]]:
        """The batch in one transaction. Operations fail only on a bug or a full disk: when
        one does, the transaction is rolled back and each is run again in a transaction of
        its own, so only it fails (cheaper than a savepoint around each, every time)."""
        db = self._db
        assert db is not None
        try:
            return self._transaction(db, batch, alone=False)
        except _OperationFailed:
            return [self._transaction(db, [op], alone=True)[0] for op in batch]

    def _transaction(
        self,
        db: sqlite3.Connection,
        batch: list[tuple[Callable[[sqlite3.Connection], Any], Any]],
        alone: bool,
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for fn, _ in batch:
                try:
                    outcomes.append((True, fn(db)))
                except Exception as exc:
                    if not alone:
                        raise _OperationFailed from exc
                    db.execute("ROLLBACK")
                    return [(False, exc)]
            db.execute("COMMIT")  # synchronous=FULL: on disk when this returns
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    # ---- the protocol ----
    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
            self._db = db

        def connect_reader() -> None:
            rdb = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            rdb.execute("PRAGMA busy_timeout=5000")
            self._rdb = rdb

        loop = self._loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, connect)
        await loop.run_in_executor(self._reader, connect_reader)
        await self._write(_recover)

    async def close(self) -> None:
        if self._committing is not None:
            await self._committing
        loop = asyncio.get_running_loop()
        if self._rdb is not None:
            await loop.run_in_executor(self._reader, self._rdb.close)
            self._rdb = None
        if self._db is not None:
            await loop.run_in_executor(self._thread, self._db.close)
            self._db = None
        self._reader.shutdown(wait=True)
        self._thread.shutdown(wait=True)

    def put(self, inv: Invocation) -> asyncio.Future[Invocation]:
        def insert(db: sqlite3.Connection) -> Invocation:
            if inv.idempotency_key:
                first = db.execute(
                    f"SELECT {_COLUMNS} FROM invocations"
                    " WHERE function = ? AND idempotency_key = ?",
                    (inv.function, inv.idempotency_key),
                ).fetchone()
                if first is not None:
                    return _row(first)
            cur = db.execute(
                "INSERT INTO invocations (id, function, status, not_before, accepted, ended,"
                " idempotency_key, notify, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    inv.id,
                    inv.function,
                    inv.status,
                    inv.not_before,
                    inv.accepted,
                    inv.ended,
                    inv.idempotency_key or None,
                    int(inv.notify),
                    _encode(inv),
                ),
            )
            inv.seq = cur.lastrowid or 0
            return inv

        return self._write(insert)

    async def take(self, function: str, limit: int) -> Invocations:
        due = time.time()

        def claim(db: sqlite3.Connection) -> Invocations:
            rows = db.execute(
                f"UPDATE invocations SET status = '{RUNNING}' WHERE seq IN (SELECT seq FROM"
                " invocations WHERE function = ? AND status = 'queued' AND not_before <= ?"
                f" ORDER BY not_before, seq LIMIT ?) RETURNING {_COLUMNS}",
                (function, due, limit),
            ).fetchall()
            out = sorted((_row(r) for r in rows), key=lambda i: (i.not_before, i.seq))
            return out

        if limit <= 0:
            return []
        return await self._write(claim)

    async def next_due(self, function: str) -> float | None:
        row = await self._read(
            lambda db: db.execute(
                "SELECT min(not_before) FROM invocations WHERE function = ? AND status = 'queued'",
                (function,),
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    def save(self, inv: Invocation) -> asyncio.Future[None]:
        record = _encode(inv)

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE invocations SET status = ?, not_before = ?, ended = ?, notify = ?,"
                " record = ? WHERE seq = ?",
                (inv.status, inv.not_before, inv.ended, int(inv.notify), record, inv.seq),
            )

        return self._write(update)

    async def get(self, id: str) -> Invocation | None:
        row = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE id = ?", (id,)
            ).fetchone()
        )
        return _row(row) if row else None

    async def list(self, function: str, status: str | None = None, limit: int = 100) -> Invocations:
        if status is None:
            sql = f"SELECT {_COLUMNS} FROM invocations WHERE function = ? ORDER BY seq DESC LIMIT ?"
            args: tuple[Any, ...] = (function, limit)
        else:
            sql = (
                f"SELECT {_COLUMNS} FROM invocations WHERE function = ? AND status = ?"
                " ORDER BY seq DESC LIMIT ?"
            )
            args = (function, status, limit)
        rows = await self._read(lambda db: db.execute(sql, args).fetchall())
        return [_row(r) for r in rows]

    async def cancel(self, id: str, now: float) -> Invocation | None:
        def cancel(db: sqlite3.Connection) -> Invocation | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE id = ? AND status = '{QUEUED}'", (id,)
            ).fetchone()
            if row is None:
                return None
            inv = _row(row)
            inv.status, inv.ended, inv.reason = CANCELLED, now, "cancelled before it ran"
            db.execute(
                "UPDATE invocations SET status = ?, ended = ?, record = ? WHERE seq = ?",
                (inv.status, now, _encode(inv), inv.seq),
            )
            return inv

        return await self._write(cancel)

    async def replay(self, function: str, ids: Sequence[str] | None, now: float) -> Invocations:
        def replay(db: sqlite3.Connection) -> Invocations:
            sql = f"SELECT {_COLUMNS} FROM invocations WHERE function = ? AND status = '{DEAD}'"
            rows = db.execute(sql + " ORDER BY seq", (function,)).fetchall()
            wanted = None if ids is None else set(ids)
            out = []
            for row in rows:
                inv = _row(row)
                if wanted is not None and inv.id not in wanted:
                    continue
                inv.status, inv.attempts, inv.not_before = QUEUED, [], now
                inv.ended, inv.result, inv.reason, inv.notify = 0.0, None, "", False
                inv.accepted = now  # its age counts from the replay: max_age would expire it
                db.execute(
                    "UPDATE invocations SET status = ?, not_before = ?, accepted = ?, ended = 0,"
                    " notify = 0, record = ? WHERE seq = ?",
                    (QUEUED, now, now, _encode(inv), inv.seq),
                )
                out.append(inv)
            return out

        return await self._write(replay)

    async def purge(self, function: str) -> int:
        return await self._delete(f"function = ? AND status = '{DEAD}'", (function,))

    async def backlog(self) -> dict[str, Backlog]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT function, count(*), min(accepted) FROM invocations"
                f" WHERE status = '{QUEUED}' GROUP BY function"
            ).fetchall()
        )
        return {row[0]: Backlog(row[1], row[2]) for row in rows}

    async def unsent(self) -> Invocations:
        rows = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE notify = 1 ORDER BY seq"
            ).fetchall()
        )
        return [_row(r) for r in rows]

    async def prune(self, ended_before: float) -> int:
        return await self._delete("ended > 0 AND ended < ? AND notify = 0", (ended_before,))

    async def forget(self, function: str) -> int:
        return await self._delete("function = ?", (function,))

    async def _delete(self, where: str, args: tuple[Any, ...]) -> int:
        """Delete in transactions of DELETE_STEP rows, so removing a backlog of 100,000
        holds the writer (every acceptance) up for milliseconds at a time, not a second."""
        sql = (
            f"DELETE FROM invocations WHERE seq IN (SELECT seq FROM invocations WHERE {where}"
            f" LIMIT {DELETE_STEP})"
        )
        total = 0
        while True:
            gone = await self._write(lambda db: db.execute(sql, args).rowcount)
            total += gone
            if gone < DELETE_STEP:
                return total


class _OperationFailed(Exception):
    """One operation of a group commit raised: the batch is run again one by one."""


def _recover(db: sqlite3.Connection) -> int:
    """What a stopped server left running is queued again, with an `interrupted` attempt."""
    now = time.time()
    rows = db.execute(f"SELECT {_COLUMNS} FROM invocations WHERE status = '{RUNNING}'").fetchall()
    for row in rows:
        inv = _row(row)
        inv.interrupted(now)
        db.execute(
            "UPDATE invocations SET status = ?, not_before = ?, record = ? WHERE seq = ?",
            (QUEUED, now, _encode(inv), inv.seq),
        )
    return len(rows)
