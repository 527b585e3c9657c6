"""SQLite store (WAL): one connection on one dedicated thread, schema versioned by user_version."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ember.spec import FunctionSpec, Quota, TriggerSpec
from ember.store.base import (
    Alias,
    BuildRecord,
    FunctionRecord,
    KeyRecord,
    NamespaceRecord,
    RevisionRecord,
    Rollout,
    SecretRecord,
    effective_revision,
)
from ember.telemetry.records import ActivationRecord, LogRecord
from ember.triggers.records import TriggerRecord

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
    # Namespaces (tenants): function keys become "namespace/name"; keys, secrets, quotas.
    """
    UPDATE functions SET name = 'default/' || name;
    UPDATE revisions SET function = 'default/' || function;
    UPDATE activations SET function = 'default/' || function;
    UPDATE logs SET function = 'default/' || function;
    CREATE TABLE namespaces (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
        max_functions INTEGER NOT NULL DEFAULT 0, max_instances INTEGER NOT NULL DEFAULT 0,
        max_memory_mb INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
    INSERT INTO namespaces (name, created_at) VALUES ('default', 0);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY, digest BLOB NOT NULL, name TEXT NOT NULL, scopes TEXT NOT NULL,
        rate REAL NOT NULL, burst INTEGER NOT NULL, created_at REAL NOT NULL, revoked_at REAL);
    CREATE TABLE secrets (
        namespace TEXT NOT NULL, name TEXT NOT NULL, sealed BLOB NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (namespace, name));
    """,
    # Revisions and traffic: code tree hashes, the previous revision, aliases, rollouts.
    """
    ALTER TABLE revisions ADD COLUMN tree TEXT NOT NULL DEFAULT '';
    ALTER TABLE functions ADD COLUMN previous INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE functions ADD COLUMN aliases TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE functions ADD COLUMN rollout TEXT;
    """,
    # Requirements: the layer (lock digest) a revision's code runs with.
    """
    ALTER TABLE revisions ADD COLUMN layer TEXT NOT NULL DEFAULT '';
    CREATE TABLE builds (
        function TEXT NOT NULL, revision INTEGER NOT NULL, layer TEXT NOT NULL,
        packages TEXT NOT NULL, bytes INTEGER NOT NULL, build_ms REAL NOT NULL,
        built INTEGER NOT NULL, log TEXT NOT NULL, created_at REAL NOT NULL,
        PRIMARY KEY (function, revision));
    """,
    # Async invocations: each attempt's activation names its invocation and number.
    """
    ALTER TABLE activations ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE activations ADD COLUMN call_id TEXT NOT NULL DEFAULT '';
    """,
    # Event triggers, and what their sources keep across restarts (a cron's last tick).
    """
    CREATE TABLE triggers (
        id TEXT PRIMARY KEY, function TEXT NOT NULL, name TEXT NOT NULL, origin TEXT NOT NULL,
        spec BLOB NOT NULL, paused INTEGER NOT NULL, created_at REAL NOT NULL,
        state BLOB NOT NULL DEFAULT x'', UNIQUE (function, name));
    """,
]

_spec_decoder = msgspec.json.Decoder(FunctionSpec)
_trigger_decoder = msgspec.json.Decoder(TriggerSpec)
_aliases_decoder = msgspec.json.Decoder(list[Alias])
_rollout_decoder = msgspec.json.Decoder(Rollout)
_FUNCTIONS = (
    "SELECT name, revision, created_at, updated_at, previous, aliases, rollout FROM functions"
)
_REVISIONS = "SELECT function, number, sha256, bundle, spec, created_at, tree, layer FROM revisions"

_ACTIVATION_FIELDS = [f.name for f in msgspec.structs.fields(ActivationRecord)]
_LOG_FIELDS = ["ts", "function", "revision", "request_id", "instance", "stream", "message"]


def _log_row(rec: LogRecord) -> tuple[Any, ...]:
    return (
        rec.ts,
        rec.function,
        rec.revision,
        rec.request_id,
        rec.instance,
        rec.stream,
        rec.message,
    )


ROWS_PER_INSERT = 1000  # a statement of 11,000 placeholders; SQLite's cache keeps it compiled


def _insert_rows(
    db: sqlite3.Connection, table: str, fields: list[str], rows: list[tuple[Any, ...]]
) -> None:
    """Rows in as few statements as SQLite's limit of bound values allows: the values are
    bound in C and the statement runs with the GIL released, once per 1,000 rows.
    (4 us of CPU per activation, measured; a JSON array walked with json_extract, parsed
    again for every column, took 9-10; executemany() hands the GIL back and forth per row and
    stalls the event loop under load.)"""
    per = max(
        1, min(ROWS_PER_INSERT, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(fields))
    )
    row = "(" + ", ".join("?" * len(fields)) + ")"
    head = f"INSERT INTO {table} ({', '.join(fields)}) VALUES "
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        db.execute(head + ", ".join([row] * len(chunk)), list(itertools.chain(*chunk)))


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
        rows = await self._run(lambda db: db.execute(_FUNCTIONS + " ORDER BY name").fetchall())
        return [_function(row) for row in rows]

    async def function(self, name: str) -> FunctionRecord | None:
        row = await self._run(
            lambda db: db.execute(_FUNCTIONS + " WHERE name = ?", (name,)).fetchone()
        )
        return _function(row) if row else None

    async def revisions(self, name: str) -> list[RevisionRecord]:
        rows = await self._run(
            lambda db: db.execute(
                _REVISIONS + " WHERE function = ? ORDER BY number", (name,)
            ).fetchall()
        )
        return [_revision(row) for row in rows]

    async def function_and_revisions(
        self, name: str
    ) -> tuple[FunctionRecord | None, list[RevisionRecord]]:
        """`function` and `revisions` in one read (one trip to the store's thread)."""

        def read(db: sqlite3.Connection) -> tuple[Any, list[Any]]:
            fn = db.execute(_FUNCTIONS + " WHERE name = ?", (name,)).fetchone()
            revs = db.execute(_REVISIONS + " WHERE function = ? ORDER BY number", (name,))
            return fn, revs.fetchall()

        row, rows = await self._run(read)
        return (_function(row) if row else None), [_revision(r) for r in rows]

    async def revision(self, name: str, number: int) -> RevisionRecord | None:
        row = await self._run(
            lambda db: db.execute(
                _REVISIONS + " WHERE function = ? AND number = ?", (name, number)
            ).fetchone()
        )
        return _revision(row) if row else None

    async def add_revision(
        self,
        key: str,
        spec: FunctionSpec,
        sha256: str,
        bundle: str,
        now: float,
        tree: str = "",
        serve: bool = True,
        layer: str = "",
        build: BuildRecord | None = None,
    ) -> tuple[RevisionRecord, bool]:
        def add(db: sqlite3.Connection) -> tuple[RevisionRecord, bool]:
            current = db.execute(
                "SELECT r.function, r.number, r.sha256, r.bundle, r.spec, r.created_at, r.tree, "
                "r.layer "
                "FROM functions f JOIN revisions r "
                "ON r.function = f.name AND r.number = f.revision "
                "WHERE f.name = ?",
                (key,),
            ).fetchone()
            if current is not None and current[2] == sha256:
                return _revision(current), False
            (last,) = db.execute(
                "SELECT COALESCE(MAX(number), 0) FROM revisions WHERE function = ?", (key,)
            ).fetchone()
            rec = RevisionRecord(
                function=key,
                number=last + 1,
                sha256=sha256,
                bundle=bundle,
                spec=spec,
                created_at=now,
                tree=tree,
                layer=layer,
            )
            db.execute(
                "INSERT INTO revisions "
                "(function, number, sha256, bundle, spec, created_at, tree, layer) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.function,
                    rec.number,
                    sha256,
                    bundle,
                    msgspec.json.encode(spec),
                    now,
                    tree,
                    layer,
                ),
            )
            if build is not None:
                db.execute(
                    "INSERT OR REPLACE INTO builds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _build_row(key, rec.number, build, now),
                )
            if current is None:
                db.execute(
                    "INSERT INTO functions (name, revision, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?)",
                    (key, rec.number, now, now),
                )
            elif serve:
                _serve(db, key, current[1], rec.number, now)
            return rec, True

        return await self._run(add)

    async def set_traffic(
        self,
        key: str,
        revision: int,
        previous: int,
        aliases: list[Alias],
        rollout: Rollout | None,
        now: float,
    ) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE functions SET revision = ?, previous = ?, aliases = ?, rollout = ?, "
                "updated_at = ? WHERE name = ?",
                (
                    revision,
                    previous,
                    msgspec.json.encode(aliases).decode(),
                    msgspec.json.encode(rollout).decode() if rollout is not None else None,
                    now,
                    key,
                ),
            )
        )

    async def delete_revisions(self, key: str, numbers: list[int]) -> None:
        await self._run(
            lambda db: (
                db.executemany(
                    "DELETE FROM revisions WHERE function = ? AND number = ?",
                    [(key, n) for n in numbers],
                ),
                db.executemany(
                    "DELETE FROM builds WHERE function = ? AND revision = ?",
                    [(key, n) for n in numbers],
                ),
            )
        )

    async def bundles_in_use(self) -> set[str]:
        rows = await self._run(
            lambda db: db.execute("SELECT DISTINCT bundle FROM revisions").fetchall()
        )
        return {row[0] for row in rows}

    async def builds(self, key: str) -> list[BuildRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT function, revision, layer, packages, bytes, build_ms, built, log, "
                "created_at FROM builds WHERE function = ? ORDER BY revision DESC",
                (key,),
            ).fetchall()
        )
        return [
            BuildRecord(f, n, layer, json.loads(p), b, ms, bool(built), log, at)
            for f, n, layer, p, b, ms, built, log, at in rows
        ]

    async def layer_revisions(self) -> dict[str, int]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT layer, COUNT(*) FROM revisions WHERE layer != '' GROUP BY layer"
            ).fetchall()
        )
        return {layer: count for layer, count in rows}

    async def delete_function(self, name: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            gone = db.execute("DELETE FROM functions WHERE name = ?", (name,)).rowcount
            db.execute("DELETE FROM revisions WHERE function = ?", (name,))
            db.execute("DELETE FROM builds WHERE function = ?", (name,))
            db.execute("DELETE FROM triggers WHERE function = ?", (name,))
            return gone > 0

        return await self._run(delete)

    async def write_telemetry(
        self, activations: list[ActivationRecord], logs: list[LogRecord]
    ) -> None:
        def write(db: sqlite3.Connection) -> None:
            if activations:
                rows = [msgspec.structs.astuple(a) for a in activations]
                _insert_rows(db, "activations", _ACTIVATION_FIELDS, rows)
            if logs:
                _insert_rows(db, "logs", _LOG_FIELDS, [_log_row(rec) for rec in logs])

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

    # ---- namespaces ----
    async def namespaces(self) -> list[NamespaceRecord]:
        rows = await self._run(lambda db: db.execute(_NAMESPACES + " ORDER BY name").fetchall())
        return [_namespace(row) for row in rows]

    async def ensure_namespace(self, name: str, now: float) -> NamespaceRecord:
        def ensure(db: sqlite3.Connection) -> NamespaceRecord:
            db.execute(
                "INSERT INTO namespaces (name, created_at) VALUES (?, ?) "
                "ON CONFLICT(name) DO NOTHING",
                (name, now),
            )
            return _namespace(db.execute(_NAMESPACES + " WHERE name = ?", (name,)).fetchone())

        return await self._run(ensure)

    async def set_quota(self, name: str, quota: Quota) -> NamespaceRecord | None:
        def update(db: sqlite3.Connection) -> NamespaceRecord | None:
            db.execute(
                "UPDATE namespaces SET max_functions = ?, max_instances = ?, max_memory_mb = ? "
                "WHERE name = ?",
                (quota.functions, quota.instances, quota.memory_mb, name),
            )
            row = db.execute(_NAMESPACES + " WHERE name = ?", (name,)).fetchone()
            return _namespace(row) if row else None

        return await self._run(update)

    # ---- API keys ----
    async def add_key(self, key: KeyRecord) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    key.digest,
                    key.name,
                    msgspec.json.encode(key.scopes).decode(),
                    key.rate,
                    key.burst,
                    key.created_at,
                    key.revoked_at,
                ),
            )
        )

    async def keys(self) -> list[KeyRecord]:
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        )
        return [
            KeyRecord(
                id=row[0],
                digest=row[1],
                name=row[2],
                scopes=msgspec.json.decode(row[3], type=list[str]),
                rate=row[4],
                burst=row[5],
                created_at=row[6],
                revoked_at=row[7],
            )
            for row in rows
        ]

    async def revoke_key(self, key_id: str, now: float) -> bool:
        return await self._run(
            lambda db: (
                db.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    (now, key_id),
                ).rowcount
                > 0
            )
        )

    # ---- secrets (sealed by the caller; the store never sees a value) ----
    async def put_secret(self, namespace: str, name: str, sealed: bytes, now: float) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?, ?) ON CONFLICT(namespace, name) "
                "DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
                (namespace, name, sealed, now, now),
            )
        )

    async def secrets(self, namespace: str | None = None) -> list[SecretRecord]:
        where, args = ("WHERE namespace = ?", (namespace,)) if namespace else ("", ())
        rows = await self._run(
            lambda db: db.execute(
                f"SELECT * FROM secrets {where} ORDER BY namespace, name", args
            ).fetchall()
        )
        return [SecretRecord(*row) for row in rows]

    async def delete_secret(self, namespace: str, name: str) -> bool:
        return await self._run(
            lambda db: (
                db.execute(
                    "DELETE FROM secrets WHERE namespace = ? AND name = ?", (namespace, name)
                ).rowcount
                > 0
            )
        )

    async def triggers(self) -> list[TriggerRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT id, function, name, origin, spec, paused, created_at FROM triggers"
                " ORDER BY function, name"
            ).fetchall()
        )
        return [
            TriggerRecord(id, fn, name, origin, _trigger_decoder.decode(spec), bool(p), created)
            for id, fn, name, origin, spec, p, created in rows
        ]

    async def put_trigger(self, rec: TriggerRecord) -> None:
        spec = msgspec.json.encode(rec.spec)
        await self._run(
            lambda db: db.execute(
                "INSERT INTO triggers (id, function, name, origin, spec, paused, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(function, name) DO UPDATE SET"
                " id = excluded.id, origin = excluded.origin, spec = excluded.spec,"
                " paused = excluded.paused",
                (rec.id, rec.function, rec.name, rec.origin, spec, int(rec.paused), rec.created),
            )
        )

    async def delete_trigger(self, function: str, name: str) -> bool:
        return await self._run(
            lambda db: (
                db.execute(
                    "DELETE FROM triggers WHERE function = ? AND name = ?", (function, name)
                ).rowcount
                > 0
            )
        )

    async def trigger_state(self, id: str) -> bytes:
        row = await self._run(
            lambda db: db.execute("SELECT state FROM triggers WHERE id = ?", (id,)).fetchone()
        )
        return bytes(row[0]) if row else b""

    async def set_trigger_state(self, id: str, state: bytes) -> None:
        await self._run(
            lambda db: db.execute("UPDATE triggers SET state = ? WHERE id = ?", (state, id))
        )


_NAMESPACES = (
    "SELECT id, name, max_functions, max_instances, max_memory_mb, created_at FROM namespaces"
)


def _namespace(row: Any) -> NamespaceRecord:
    ns_id, name, functions, instances, memory_mb, created_at = row
    return NamespaceRecord(
        id=ns_id,
        name=name,
        quota=Quota(functions=functions, instances=instances, memory_mb=memory_mb),
        created_at=created_at,
    )


def _revision(row: Any) -> RevisionRecord:
    function, number, sha256, bundle, spec, created_at, tree, layer = row
    return RevisionRecord(
        function=function,
        number=number,
        sha256=sha256,
        bundle=bundle,
        spec=_spec_decoder.decode(spec),
        created_at=created_at,
        tree=tree,
        layer=layer,
    )


def _build_row(key: str, number: int, build: BuildRecord, now: float) -> tuple[Any, ...]:
    b, packages = build, json.dumps(build.packages)
    return (key, number, b.layer, packages, b.bytes, b.build_ms, int(b.built), b.log, now)


def _serve(db: sqlite3.Connection, key: str, serving: int, number: int, now: float) -> None:
    """Revision `number` serves all of function `key`: weights go (aliases stay as pointers)
    and what served most until now becomes `previous`."""
    raw = db.execute("SELECT aliases FROM functions WHERE name = ?", (key,)).fetchone()[0]
    aliases = _aliases_decoder.decode(raw)
    kept = [msgspec.structs.replace(a, weight=0) for a in aliases]
    db.execute(
        "UPDATE functions SET revision = ?, previous = ?, aliases = ?, updated_at = ? "
        "WHERE name = ?",
        (
            number,
            effective_revision(serving, aliases),
            msgspec.json.encode(kept).decode(),
            now,
            key,
        ),
    )


def _function(row: Any) -> FunctionRecord:
    name, revision, created_at, updated_at, previous, aliases, rollout = row
    return FunctionRecord(
        name=name,
        revision=revision,
        created_at=created_at,
        updated_at=updated_at,
        previous=previous,
        aliases=_aliases_decoder.decode(aliases),
        rollout=_rollout_decoder.decode(rollout) if rollout else None,
    )
