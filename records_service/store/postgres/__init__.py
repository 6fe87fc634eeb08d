"""The PostgreSQL engine: one database shared by every worker of every host.

`PostgresStore` is the `Store` interface over the modules beside it: connection (connections,
the busy bound, error translation), migrations (+ schema.sql), records (writes and queries),
counters (stats and the dashboard), keys, maintenance (check, the pg_dump pointer, copy).
Only this package imports psycopg, and only `open_store` imports this package: a SQLite
install never needs it.
"""

from __future__ import annotations

import json
import logging
from itertools import islice
from typing import Iterable, Iterator

import psycopg

from ..base import EngineStore, WriterSlots, prepare
from ..errors import DuplicateRecord
from . import counters, imports, keys, maintenance, records
from .connection import Database
from .migrations import SCHEMA_VERSION, current_version, migrate

log = logging.getLogger("records_service.store")


class _NothingStored(Exception):
    """An atomic batch met a test_id stored meanwhile by another writer: roll back what went in."""


class PostgresStore(EngineStore):
    engine = "postgresql"
    _records, _counters, _keys, _imports = records, counters, keys, imports

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000, writers: int | None = None) -> None:
        self.url = url
        self._busy_timeout_ms = busy_timeout_ms
        self._db = Database(url, busy_timeout_ms=busy_timeout_ms, on_connect=migrate)
        # Writes to different clinics run side by side here, but a clinic's take turns through
        # their commit (an fsync): under a burst on a loaded machine (32 clients, 4 clinics, the
        # suite beside) a slot took longer than SQLite's wait to free. So a write waits for a
        # slot up to the bound while writes flow.
        self._slots = WriterSlots(writers, wait_s=busy_timeout_ms / 1000)

    # -- life cycle ------------------------------------------------------------------------

    def migrate(self) -> int:
        self._db.connection()  # opening migrates
        return SCHEMA_VERSION

    def readiness(self) -> dict:
        """Prove this process can read and write now: a real (tiny) write, which a read-only
        server (a standby, a full disk that turned read-only) refuses."""

        def probe(conn: psycopg.Connection) -> dict:
            conn.execute("INSERT INTO meta (key, value) VALUES ('ready_probe', convert_to(now()::text, 'UTF8'))"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            return {"engine": self.engine, "schema_version": current_version(conn)}

        return self._write(probe)

    # -- writes ----------------------------------------------------------------------------

    def _write(self, work, **options):
        return self._slots.run(lambda: self._db.write(work, **options))

    def insert(self, record: dict, *, request_id: str, key_id: str | None = None, now: str) -> str:
        row = prepare(record, request_id, now)

        def work(conn: psycopg.Connection) -> None:
            if not records.insert_rows(conn, [row], key_id):
                raise DuplicateRecord(json.loads(records.existing(conn, [row.test_id])[row.test_id]))

        try:
            self._write(work)
        except DuplicateRecord:
            log.info("record not stored: test_id exists", extra={"test_id": record["test_id"]})
            raise
        log.info("committed", extra={"test_id": record["test_id"], "version": 1})
        return row.doc

    def insert_batch(self, batch: list[dict], *, request_id: str, key_id: str | None = None, now: str,
                     atomic: bool) -> dict[str, dict]:
        rows = [prepare(record, request_id, now) for record in batch]

        # An atomic batch looks for stored test_ids first, so that one taken stores nothing; any
        # other batch just inserts (a taken test_id is skipped) and fetches the skipped ones' stored
        # versions after: 1,000 look-ups fewer in the common case of none taken.
        def work(conn: psycopg.Connection) -> dict[str, str]:
            found = records.existing(conn, [row.test_id for row in rows]) if atomic else {}
            if found:
                return found
            inserted = records.insert_rows(conn, rows, key_id)
            skipped = [row.test_id for row in rows if row.test_id not in inserted]
            if skipped:  # stored before (or, in an atomic batch, by another writer meanwhile)
                found.update(records.existing(conn, skipped))
                if atomic:
                    raise _NothingStored(found)
            return found

        try:
            existing = self._write(work)
        except _NothingStored as stopped:
            existing = stopped.args[0]
        if existing and atomic:
            log.info("batch not stored: test_ids exist", extra={"existing": len(existing)})
        else:
            log.info("committed", extra={"stored": len(rows) - len(existing), "existing": len(existing)})
        return {test_id: json.loads(doc) for test_id, doc in existing.items()}

    def existing(self, test_ids: list[str]) -> dict[str, dict]:
        return {test_id: json.loads(doc) for test_id, doc in self._db.snapshot(
            lambda conn: records.existing(conn, test_ids)).items()}

    def bulk_insert(self, rows: Iterable[tuple], chunk_rows: int = 50_000) -> Iterator[int]:
        """Insert NewRow-shaped rows in transactions of `chunk_rows`, yielding the running count (seed)."""
        rows = iter(rows)
        total = 0
        while chunk := list(islice(rows, chunk_rows)):
            self._write(lambda conn: records.insert_rows(conn, chunk, None), unbounded=True)
            total += len(chunk)
            yield total


    # -- reads (the rest are EngineStore's) ---------------------------------------------

    def dashboard_counts(self, since_hour: str, top_clinics: int) -> dict:
        """What the dashboard shows, from the counters; sizes as the server reports them."""
        database_bytes, wal_bytes = self._db.read(
            "SELECT pg_database_size(current_database()),"
            " CASE WHEN pg_has_role('pg_monitor', 'member') THEN (SELECT sum(size) FROM pg_ls_waldir()) END")[0]
        return {**counters.dashboard_counts(self._db, since_hour, top_clinics),
                "schema_version": self._db.read("SELECT max(version) FROM schema_migrations")[0][0],
                "journal_mode": "PostgreSQL WAL", "database_bytes": database_bytes, "wal_bytes": wal_bytes or 0}


    # -- whole database --------------------------------------------------------------------

    def backup(self, dest: str) -> dict:
        raise maintenance.backup_hint(self.url)

    def check(self) -> dict:
        """Read-only: a connection of its own that never migrates what it checks."""
        db = Database(self.url, busy_timeout_ms=self._busy_timeout_ms)
        try:
            return maintenance.check_database(db)
        finally:
            db.close()

    def load(self, tables: dict[str, Iterable[tuple]], cursor_secret: bytes) -> dict[str, int]:
        """Fill this empty database with a copy of another's tables (`copy`); rows per table."""
        self._db.connection()  # opening migrates
        return maintenance.load_tables(self._db, tables, cursor_secret)


__all__ = ["PostgresStore", "SCHEMA_VERSION"]
