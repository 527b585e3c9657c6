"""SQLite store (WAL): one connection on one dedicated thread, schema versioned by user_version."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ember.spec import FunctionSpec
from ember.store.base import FunctionRecord, RevisionRecord
from ember.telemetry.records import ActivationRecord, LogRecord

T = TypeVar("T")

MIGRATIONS = [
    """
    CREATE TABLE functions (
        name TEXT PRIMARY KEY, revision INTEGER NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE revisions (
        function TEXT NOT NULL, number INTEGER NOT NULL, sha256 TEXT NOT NULL,
        bundle TEXT NOT NULL, spec BLOB NOT NULL, created_at REAL NOT NULL,
        PRIMARY KEY (function, number));
    CREATE TABLE activations (
        id TEXT NOT NULL, function TEXT NOT NULL, revision INTEGER NOT NULL,
        start REAL NOT NULL, duration_ms REAL NOT NULL, status INTEGER NOT NULL,
        tier TEXT NOT NULL, instance TEXT NOT NULL, peak_memory_kb INTEGER NOT NULL,
        billed_ms INTEGER NOT NULL, error TEXT);
    CREATE INDEX activations_by_function ON activations (function, start);
    CREATE TABLE logs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, function TEXT NOT NULL,
        revision INTEGER NOT NULL, request_id TEXT NOT NULL, instance TEXT NOT NULL,
        stream TEXT NOT NULL, message TEXT NOT NULL);
    CREATE INDEX logs_by_function ON logs (function, id);
    """,
]

_spec_decoder = msgspec.json.Decoder(FunctionSpec)

_ACTIVATION_FIELDS = [f.name for f in msgspec.structs.fields(ActivationRecord)]
_LOG_FIELDS = ["ts", "function", "revision", "request_id", "instance", "stream", "message"]


def _insert_from_json(table: str, fields: list[str]) -> str:
    values = ", ".join(f"json_extract(value, '$.{name}')" for name in fields)
    return f"INSERT INTO {table} ({', '.join(fields)}) SELECT {values} FROM json_each(?)"


_INSERT_ACTIVATIONS = _insert_from_json("activations", _ACTIVATION_FIELDS)
_INSERT_LOGS = _insert_from_json("logs", _LOG_FIELDS)


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ember-store")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None
            with self._db:  # one transaction
                return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
            db.isolation_level = "DEFERRED"
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)

    async def functions(self) -> list[FunctionRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT name, revision, created_at, updated_at FROM functions ORDER BY name"
            ).fetchall()
        )
        return [FunctionRecord(*row) for row in rows]

    async def function(self, name: str) -> FunctionRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT name, revision, created_at, updated_at FROM functions WHERE name = ?",
                (name,),
            ).fetchone()
        )
        return FunctionRecord(*row) if row else None

    async def revisions(self, name: str) -> list[RevisionRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT function, number, sha256, bundle, spec, created_at FROM revisions "
                "WHERE function = ? ORDER BY number",
                (name,),
            ).fetchall()
        )
        return [_revision(row) for row in rows]

    async def revision(self, name: str, number: int) -> RevisionRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT function, number, sha256, bundle, spec, created_at FROM revisions "
                "WHERE function = ? AND number = ?",
                (name, number),
            ).fetchone()
        )
        return _revision(row) if row else None

    async def add_revision(
        self, spec: FunctionSpec, sha256: str, bundle: str, now: float
    ) -> tuple[RevisionRecord, bool]:
        def add(db: sqlite3.Connection) -> tuple[RevisionRecord, bool]:
            current = db.execute(
                "SELECT r.function, r.number, r.sha256, r.bundle, r.spec, r.created_at "
                "FROM functions f JOIN revisions r "
                "ON r.function = f.name AND r.number = f.revision "
                "WHERE f.name = ?",
                (spec.name,),
            ).fetchone()
            if current is not None and current[2] == sha256:
                return _revision(current), False
            (last,) = db.execute(
                "SELECT COALESCE(MAX(number), 0) FROM revisions WHERE function = ?", (spec.name,)
            ).fetchone()
            rec = RevisionRecord(
                function=spec.name,
                number=last + 1,
                sha256=sha256,
                bundle=bundle,
                spec=spec,
                created_at=now,
            )
            db.execute(
                "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?)",
                (rec.function, rec.number, sha256, bundle, msgspec.json.encode(spec), now),
            )
            db.execute(
                "INSERT INTO functions VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "revision = excluded.revision, updated_at = excluded.updated_at",
                (spec.name, rec.number, now, now),
            )
            return rec, True

        return await self._run(add)

    async def delete_function(self, name: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            gone = db.execute("DELETE FROM functions WHERE name = ?", (name,)).rowcount
            db.execute("DELETE FROM revisions WHERE function = ?", (name,))
            return gone > 0

        return await self._run(delete)

    async def write_telemetry(
        self, activations: list[ActivationRecord], logs: list[LogRecord]
    ) -> None:
        # One statement per table over a JSON array: SQLite walks it in C with the GIL released
        # once, where executemany() hands the GIL back and forth for every row and stalls the
        # event loop thread under load.
        def write(db: sqlite3.Connection) -> None:
            if activations:
                db.execute(_INSERT_ACTIVATIONS, (msgspec.json.encode(activations),))
            if logs:
                db.execute(_INSERT_LOGS, (msgspec.json.encode(logs),))

        if activations or logs:
            await self._run(write)

    async def activations(self, name: str, limit: int) -> list[ActivationRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT * FROM activations WHERE function = ? ORDER BY start DESC LIMIT ?",
                (name, limit),
            ).fetchall()
        )
        return [ActivationRecord(*row) for row in rows]

    async def logs(self, name: str, since: float, after_id: int, limit: int) -> list[LogRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT ts, function, revision, request_id, instance, stream, message, id "
                "FROM logs "
                "WHERE function = ? AND ts >= ? AND id > ? ORDER BY id LIMIT ?",
                (name, since, after_id, limit),
            ).fetchall()
        )
        return [LogRecord(*row) for row in rows]

    async def prune(self, keep_activations: int, keep_logs: int) -> None:
        def prune(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM activations WHERE rowid <= (SELECT MAX(rowid) FROM activations) - ?",
                (keep_activations,),
            )
            db.execute("DELETE FROM logs WHERE id <= (SELECT MAX(id) FROM logs) - ?", (keep_logs,))

        await self._run(prune)


def _revision(row: Any) -> RevisionRecord:
    function, number, sha256, bundle, spec, created_at = row
    return RevisionRecord(
        function=function,
        number=number,
        sha256=sha256,
        bundle=bundle,
        spec=_spec_decoder.decode(spec),
        created_at=created_at,
    )
