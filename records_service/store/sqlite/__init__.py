"""The SQLite engine: one file in WAL mode, a connection per thread, writers in turns.

`SQLiteStore` is the `Store` interface over the modules beside it: connection (connections,
the writers' turn, checkpoints, error translation), migrations (+ schema.sql), records
(writes and queries), counters (stats and the dashboard), keys, maintenance (backup, check).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from itertools import islice
from typing import Iterable, Iterator

from ..base import EngineStore, WriterSlots, prepare
from ..errors import DuplicateRecord, StoreFull
from . import counters, imports, keys, maintenance, records
from .connection import MIN_FREE_BYTES, Database, file_size
from .migrations import SCHEMA_VERSION, migrate

log = logging.getLogger("records_service.store")

# A process folds the tails of the clinics it wrote to (counters.py) once this long has passed
# since its last fold, or once it has written this many records: tails stay a few hundred rows.
FOLD_EVERY_S = 1.0
FOLD_EVERY_RECORDS = 2000
LOAD_CACHE_KIB = 1 << 20


class SQLiteStore(EngineStore):
    engine = "sqlite"
    _records, _counters, _keys, _imports = records, counters, keys, imports

    def __init__(self, path: str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000,
                 writers: int | None = None) -> None:
        self._db = Database(path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
        self.path = self._db.path
        self._busy_timeout_ms = busy_timeout_ms
        self._slots = WriterSlots(writers)
        self._touched: set[str] = set()
        self._touched_records = 0
        self._touched_lock = threading.Lock()
        self._last_fold = time.monotonic()

    # -- life cycle ------------------------------------------------------------------------

    def migrate(self) -> int:
        """Migrate, then count every clinic's tail (what a process killed before its fold left)."""
        self._db.connection()  # opening migrates
        counted = self._write(lambda conn: counters.fold(conn))
        if counted:
            log.info("counters caught up", extra={"records": counted})
        return SCHEMA_VERSION

    def readiness(self) -> dict:
        """Prove this process can read and write now: a real (tiny) write, and room to write more."""
        free = self._db.free_bytes()
        if free < MIN_FREE_BYTES:
            raise StoreFull(f"only {free} bytes free beside {self.path}")

        def probe(conn: sqlite3.Connection) -> dict:
            conn.execute("INSERT INTO meta (key, value) VALUES ('ready_probe', strftime('%Y-%m-%dT%H:%M:%fZ'))"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            return {"engine": self.engine, "schema_version": conn.execute("PRAGMA user_version").fetchone()[0],
                    "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0]}

        return self._write(probe)

    # -- writes ----------------------------------------------------------------------------

    def _write(self, work):
        return self._slots.run(lambda: self._db.write(work))

    def _wrote(self, clinics: Iterable[str], count: int) -> None:
        """Note where records went; fold those clinics' tails when one is due (outside the caller's write)."""
        with self._touched_lock:
            self._touched.update(clinics)
            self._touched_records += count
            due = (self._touched_records >= FOLD_EVERY_RECORDS
                   or time.monotonic() - self._last_fold >= FOLD_EVERY_S) and self._touched
            if not due:
                return
            clinics, self._touched, self._touched_records = self._touched, set(), 0
            self._last_fold = time.monotonic()
        try:
            self._db.write(lambda conn: counters.fold(conn, clinics))
        except Exception as exc:  # the records are committed; their tails stay counted when read
            log.warning("counters not folded now: %s", exc)
            with self._touched_lock:
                self._touched.update(clinics)

    def insert(self, record: dict, *, request_id: str, key_id: str | None = None, now: str) -> str:
        row = prepare(record, request_id, now)

        def work(conn: sqlite3.Connection) -> set[str]:
            try:
                return records.insert_rows(conn, [row], key_id)
            except sqlite3.IntegrityError:
                raise records.duplicate(conn, record["test_id"]) from None

        try:
            clinics = self._write(work)
        except DuplicateRecord:
            log.info("record not stored: test_id exists", extra={"test_id": record["test_id"]})
            raise
        log.info("committed", extra={"test_id": record["test_id"], "version": 1})
        self._wrote(clinics, 1)
        return row.doc

    def insert_batch(self, batch: list[dict], *, request_id: str, key_id: str | None = None, now: str,
                     atomic: bool) -> dict[str, dict]:
        rows = [prepare(record, request_id, now) for record in batch]
        test_ids = [row.test_id for row in rows]

        def work(conn: sqlite3.Connection) -> tuple[dict[str, str], set[str]]:
            existing = records.existing(conn, test_ids)
            if existing and atomic:
                return existing, set()
            return existing, records.insert_rows(conn, [row for row in rows if row.test_id not in existing], key_id)

        existing, clinics = self._write(work)
        if existing and atomic:
            log.info("batch not stored: test_ids exist", extra={"existing": len(existing)})
        else:
            log.info("committed", extra={"stored": len(rows) - len(existing), "existing": len(existing)})
            self._wrote(clinics, len(rows) - len(existing))
        return {test_id: json.loads(doc) for test_id, doc in existing.items()}

    def existing(self, test_ids: list[str]) -> dict[str, dict]:
        return {test_id: json.loads(doc) for test_id, doc in self._db.snapshot(
            lambda conn: records.existing(conn, test_ids)).items()}

    def bulk_insert(self, rows: Iterable[tuple], chunk_rows: int = 50_000) -> Iterator[int]:
        """Insert NewRow-shaped rows, yielding the running count as it goes, then count them in (seed).

        Into an empty database they are appended in one transaction (`records.load_into_empty`:
        fastest, and leaves full, with rows in (clinic_id, ingest) order); into one that holds
        records, they go in transactions of `chunk_rows` like any batch."""
        rows = iter(rows)
        conn = self._db.connection()
        # For the load only: a cache that holds every page it writes, up to LOAD_CACHE_KIB (the
        # default 2 MiB re-reads the pages being extended for every row; 256 MiB spilled a
        # million records' 650 MB, then read them back to build the indexes: 36% more CPU).
        conn.execute(f"PRAGMA cache_size = -{LOAD_CACHE_KIB}")
        try:
            if self._db.snapshot(records.is_empty):
                with self._db.transaction(load=True) as conn:
                    if records.is_empty(conn):  # still, now that this transaction holds the writers' turn
                        yield from records.load_into_empty(conn, rows, chunk_rows)
                        return
            total = 0
            while chunk := list(islice(rows, chunk_rows)):
                self._write(lambda conn: records.insert_rows(conn, chunk, None))
                total += len(chunk)
                yield total
            self._write(lambda conn: counters.fold(conn))
        finally:
            conn.execute("PRAGMA cache_size = -2000")

    # -- reads (the rest are EngineStore's) ---------------------------------------------

    def dashboard_counts(self, since_hour: str, top_clinics: int) -> dict:
        """What the dashboard shows, from the counters: never a scan of records."""
        return {**counters.dashboard_counts(self._db, since_hour, top_clinics),
                "schema_version": self._db.read("PRAGMA user_version")[0][0],
                "journal_mode": self._db.read("PRAGMA journal_mode")[0][0],
                "database_bytes": file_size(self.path),
                "wal_bytes": file_size(self.path + "-wal")}

    # -- whole database --------------------------------------------------------------------

    def backup(self, dest: str) -> dict:
        return maintenance.backup_database(self.path, dest, busy_timeout_ms=self._busy_timeout_ms)

    def check(self) -> dict:
        return maintenance.check_database(self.path, busy_timeout_ms=self._busy_timeout_ms)


__all__ = ["SQLiteStore", "SCHEMA_VERSION", "migrate"]
