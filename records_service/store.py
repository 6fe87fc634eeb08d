"""The only module that speaks SQL: one connection per process, migrations, writes, queries.

Every write goes through `Store._write`, which opens `BEGIN IMMEDIATE` (so a write never
starts as a reader and fails with SQLITE_BUSY at upgrade), waits for other writers up to the
busy bound, and commits or rolls back, logging which. Stored records keep their response
JSON (`doc`) next to the indexed columns, so a list is answered by joining stored bodies
instead of rebuilding and re-encoding every record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

from .errors import AlreadyVoided, DuplicateRecord, StoreBusy, StoreUnavailable, VersionMismatch
from .validate import VOIDED_STATUS, client_fields, timestamp_from_sort_key, timestamp_sort_key

log = logging.getLogger("records_service.store")

T = TypeVar("T")

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}

# Checkpoints (copying the WAL back into the database, with an fsync) are ours, not SQLite's:
# under steady load readers rarely let the WAL restart, SQLite's automatic checkpoint then runs
# after nearly every commit, and its fsync dominated a write. A process checkpoints after a
# commit once it has made CHECKPOINT_EVERY_COMMITS commits and CHECKPOINT_EVERY_S seconds passed.
CHECKPOINT_EVERY_COMMITS = 100
CHECKPOINT_EVERY_S = 1.0

# Writers take turns on a file lock (`<database>-writer`) before BEGIN IMMEDIATE. SQLite's own
# busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, so under steady writes from several
# workers most of a write's time was spent asleep after the lock was already free (POST p99
# ~100-170 ms with the CPU a third idle). Trying the file lock every 50 us, backing off to 1 ms,
# hands the turn over almost at once; the deadline is still RECORDS_BUSY_TIMEOUT_MS.
WRITER_PAUSE_FIRST_S = 0.00005
WRITER_PAUSE_MAX_S = 0.001

# Part of migration 2 (so frozen like it): take OLD out of its clinic_counts group, dropping an
# emptied group and recomputing first/last when OLD was at an edge. Used by two triggers.
_V2_UNCOUNT_OLD = """
        UPDATE clinic_counts SET records = records - 1
            WHERE clinic_id = OLD.clinic_id AND test_type = OLD.test_type AND status = OLD.status;
        DELETE FROM clinic_counts
            WHERE clinic_id = OLD.clinic_id AND test_type = OLD.test_type AND status = OLD.status AND records = 0;
        UPDATE clinic_counts SET
                first_collected_at = (SELECT min(collected_at) FROM records WHERE clinic_id = OLD.clinic_id
                                      AND test_type = OLD.test_type AND status = OLD.status),
                last_collected_at = (SELECT max(collected_at) FROM records WHERE clinic_id = OLD.clinic_id
                                     AND test_type = OLD.test_type AND status = OLD.status)
            WHERE clinic_id = OLD.clinic_id AND test_type = OLD.test_type AND status = OLD.status
                AND OLD.collected_at IN (first_collected_at, last_collected_at);
"""

# Part of migration 6 (so frozen like it), and of the audit query: what writing a version was.
_V6_ACTION = ("CASE WHEN {row}.version = 1 THEN 'create' WHEN {row}.status = 'entered-in-error' THEN 'void'"
              " ELSE 'correct' END")

# Version N's script moves the schema from N-1 to N. Never edit one that has shipped: add one.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE records (
        seq          INTEGER PRIMARY KEY,   -- ingest order: lists are ordered and paged by it
        test_id      TEXT NOT NULL UNIQUE,
        clinic_id    TEXT NOT NULL,
        patient_id   TEXT NOT NULL,
        test_type    TEXT NOT NULL,
        status       TEXT NOT NULL,
        collected_at TEXT NOT NULL,         -- fixed-width UTC, so text order is time order
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL,
        version      INTEGER NOT NULL,
        request_id   TEXT NOT NULL,
        doc          TEXT NOT NULL          -- the record exactly as the API returns it
    );
    CREATE INDEX records_by_clinic ON records (clinic_id, seq);
    """,
    # Records at scale: filters, keyset paging, stats. Every query names its clinic and pages by
    # seq, so both indexes lead with (clinic_id, ...) and end in seq order. The clinic index also
    # carries the filtered columns: a status, test type or time filter, and the stats, are
    # answered from the index without reading rows that do not match. It carries `doc` too, so a
    # page is read from the index alone: a clinic's records lie scattered through the table (they
    # arrive interleaved with every other clinic's), and fetching them row by row took 3x longer
    # (measured: ~120 us against ~42 us a 100-record page; the file grows ~30%). Patients get their own
    # index because one patient is a needle in a big clinic. Two indexes, not one per filter:
    # every index costs every insert (batch ingest and seed are bound by index upkeep).
    # `meta` holds the key that signs paging cursors, made once here so all workers share it.
    # `clinic_counts` answers /tests/_stats without reading a clinic's records: the store adds
    # new records to it in the transaction that inserts them (one upsert per clinic, type and
    # status of a batch: an INSERT trigger would cost ~5 us a row); triggers move a record
    # between groups when it is changed in place or removed, which is rare.
    2: """
    DROP INDEX records_by_clinic;
    CREATE INDEX records_by_clinic ON records (clinic_id, seq, status, test_type, collected_at, doc);
    CREATE INDEX records_by_patient ON records (clinic_id, patient_id, seq);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('cursor_secret', randomblob(32));
    CREATE TABLE clinic_counts (
        clinic_id          TEXT NOT NULL,
        test_type          TEXT NOT NULL,
        status             TEXT NOT NULL,
        records            INTEGER NOT NULL,
        first_collected_at TEXT NOT NULL,   -- sort keys, like records.collected_at
        last_collected_at  TEXT NOT NULL,
        PRIMARY KEY (clinic_id, test_type, status)
    ) WITHOUT ROWID;
    INSERT INTO clinic_counts
        SELECT clinic_id, test_type, status, count(*), min(collected_at), max(collected_at)
        FROM records GROUP BY clinic_id, test_type, status;
    CREATE TRIGGER records_recounted AFTER UPDATE OF clinic_id, test_type, status, collected_at ON records
    BEGIN
        INSERT INTO clinic_counts VALUES (NEW.clinic_id, NEW.test_type, NEW.status, 1, NEW.collected_at, NEW.collected_at)
            ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET records = records + 1,
                first_collected_at = min(first_collected_at, excluded.first_collected_at),
                last_collected_at = max(last_collected_at, excluded.last_collected_at);
        {uncount_old}
    END;
    CREATE TRIGGER records_uncounted AFTER DELETE ON records
    BEGIN
        {uncount_old}
    END;
    """.format(uncount_old=_V2_UNCOUNT_OLD.strip()),
    # Every version of every record, append-only. Triggers on `records` write it, so every way
    # of creating or changing a record (single, batch, seed) keeps history without knowing it.
    # rowid order is write order: /audit lists one request's writes in the order it made them.
    # (Migration 6 changed this: history keeps a version once it is superseded.)
    3: """
    CREATE TABLE record_versions (
        test_id    TEXT NOT NULL,
        version    INTEGER NOT NULL,
        action     TEXT NOT NULL CHECK (action IN ('create', 'correct', 'void')),
        request_id TEXT NOT NULL,
        at         TEXT NOT NULL,           -- the updated_at of this version
        doc        TEXT NOT NULL,           -- the record as the API returned it at this version
        PRIMARY KEY (test_id, version)
    );
    CREATE INDEX record_versions_by_request ON record_versions (request_id);
    INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        SELECT test_id, version, 'create', request_id, updated_at, doc FROM records ORDER BY seq;
    CREATE TRIGGER records_keep_created AFTER INSERT ON records BEGIN
        INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        VALUES (NEW.test_id, NEW.version, 'create', NEW.request_id, NEW.updated_at, NEW.doc);
    END;
    CREATE TRIGGER records_one_version_at_a_time BEFORE UPDATE ON records
    WHEN NEW.version IS NOT OLD.version + 1 OR NEW.seq IS NOT OLD.seq OR NEW.test_id IS NOT OLD.test_id
      OR NEW.clinic_id IS NOT OLD.clinic_id OR NEW.patient_id IS NOT OLD.patient_id
      OR NEW.created_at IS NOT OLD.created_at BEGIN
        SELECT RAISE(ABORT, 'a record changes only by a new version that keeps its identity');
    END;
    CREATE TRIGGER records_keep_changed AFTER UPDATE ON records BEGIN
        INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        VALUES (NEW.test_id, NEW.version,
                CASE NEW.status WHEN 'entered-in-error' THEN 'void' ELSE 'correct' END,
                NEW.request_id, NEW.updated_at, NEW.doc);
    END;
    CREATE TRIGGER records_never_deleted BEFORE DELETE ON records BEGIN
        SELECT RAISE(ABORT, 'records are never deleted; void them');
    END;
    CREATE TRIGGER record_versions_never_updated BEFORE UPDATE ON record_versions BEGIN
        SELECT RAISE(ABORT, 'record versions are append-only');
    END;
    CREATE TRIGGER record_versions_never_deleted BEFORE DELETE ON record_versions BEGIN
        SELECT RAISE(ABORT, 'record versions are append-only');
    END;
    """,
    4: """
    CREATE TABLE api_keys (
        key_id        TEXT PRIMARY KEY,     -- public: listings and logs name a key by it
        name          TEXT NOT NULL,
        roles         TEXT NOT NULL,        -- JSON array of ingest, read, admin
        clinics       TEXT,                 -- JSON array of clinic ids, NULL for every clinic
        secret_sha256 TEXT NOT NULL,        -- hex SHA-256 of the secret, never the secret
        created_at    TEXT NOT NULL,
        revoked_at    TEXT                  -- NULL while the key is valid
    );
    """,
    # The dashboard's ingest-per-hour counter, kept by a trigger so every way of creating a
    # record (one POST, a batch, seed) counts it and the dashboard never scans `records`. A
    # record counts once, at ingest, in the UTC hour of its `created_at`; records are never
    # deleted, and corrections and voids keep created_at. Records per clinic come from
    # migration 2's clinic_counts. `check` recounts both, to prove them. (Migration 7 moved the
    # counting from this trigger into the store's insert.)
    5: """
    CREATE TABLE hourly_ingest (
        hour    TEXT PRIMARY KEY,           -- created_at's first 13 characters: 2025-06-01T12
        total   INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO hourly_ingest (hour, total) SELECT substr(created_at, 1, 13), count(*) FROM records GROUP BY 1;
    CREATE TRIGGER records_counted AFTER INSERT ON records BEGIN
        INSERT INTO hourly_ingest (hour, total) VALUES (substr(NEW.created_at, 1, 13), 1)
            ON CONFLICT (hour) DO UPDATE SET total = total + 1;
    END;
    """,
    # History keeps a version when it is superseded, not when it is written: the current
    # version is the records row itself, so creating a record writes it once, not twice (the
    # copy and its two indexes were about a third of a POST: measured 205 -> 170 us in-process).
    # Audit finds current versions through a request index on records. Superseded versions
    # are still append-only; copies made before this migration of versions still current stay
    # where they are, and the queries read a version from history only once it is superseded.
    6: """
    CREATE INDEX records_by_request ON records (request_id);
    DROP TRIGGER records_keep_created;
    DROP TRIGGER records_keep_changed;
    CREATE TRIGGER records_keep_superseded AFTER UPDATE ON records
    WHEN NOT EXISTS (SELECT 1 FROM record_versions WHERE test_id = OLD.test_id AND version = OLD.version) BEGIN
        INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        VALUES (OLD.test_id, OLD.version, {action}, OLD.request_id, OLD.updated_at, OLD.doc);
    END;
    """.format(action=_V6_ACTION.format(row="OLD")),
    # The store counts new records into hourly_ingest itself, as it does into clinic_counts
    # (one upsert per hour of a batch): migration 5's trigger cost ~4 us a row, a sixth of a
    # row's insert in batch ingest and seeding.
    7: """
    DROP TRIGGER records_counted;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)


class Stored(NamedTuple):
    """A record's current version: what a single-record request checks and answers."""

    clinic_id: str
    version: int
    doc: str  # the record as the API returns it


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in _BUSY_CODES


class Store:
    """Owns this process's SQLite connection, opened lazily so it is never carried across fork()."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._writer_lock: int | None = None  # this process's descriptor of the writers' lock file
        self._pid: int | None = None
        self._file_id: tuple[int, int] | None = None
        self._cursor_secret: bytes | None = None
        self._commits_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpoint_to_finish = False  # see _checkpoint_now_and_then

    # -- connection and schema -------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid() and _file_id(self._path) != self._file_id:
            # The file or its directory was removed (or swapped) under us: an open connection
            # would go on acknowledging writes into an unlinked file, so open the path afresh.
            log.warning("the database file is no longer at its path; reopening")
            self.close()
        if self._conn is None or self._pid != os.getpid():
            self._conn = None
            self._cursor_secret = None
            self._writer_lock = self._open_writer_lock()
            try:
                self._conn = self._open()
            except BaseException:
                os.close(self._writer_lock)
                self._writer_lock = None
                raise
            self._pid = os.getpid()
            self._file_id = _file_id(self._path)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; _write says BEGIN and COMMIT itself.
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=self._busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open database: {exc}") from exc
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()  # a half-prepared connection is retried from scratch at the next request
            raise
        log.info("database ready", extra={"schema_version": SCHEMA_VERSION})
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Settings and migrations for a new connection; StoreBusy or StoreUnavailable when they fail."""
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                self._switch_to_wal(conn)
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._synchronous == 'FULL' else 'NORMAL'}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # see CHECKPOINT_EVERY_COMMITS
            migrate(conn)
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise StoreBusy() from exc
            raise StoreUnavailable(f"cannot open database: {exc}") from exc

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """Switch a new file to WAL, taking a writer's turn for it.

        Workers starting at once on a new file all switch it, which needs an exclusive lock,
        and SQLite refuses the losers at once, without its busy handler (a deadlock guard: 58 of
        1,500 such connections failed in a test). A file already in WAL mode never gets here,
        so a worker starting while a write waits for the database starts and reads at once.
        """
        if not self._take_writer_turn(time.monotonic() + self._busy_timeout_ms / 1000):
            raise StoreBusy()
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreUnavailable("the database could not be switched to WAL mode")
        finally:
            fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def _open_writer_lock(self) -> int:
        try:
            return os.open(self._path + "-writer", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the writers' lock file: {exc.strerror}") from exc

    def open(self) -> None:
        """Open (and migrate) now rather than at the first request."""
        self._connection()

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
            os.close(self._writer_lock)
        self._conn = None
        self._writer_lock = None

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one BEGIN IMMEDIATE transaction; the only place that begins or commits."""
        conn = self._connection()
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        if not self._take_writer_turn(deadline):
            log.warning("another writer held the database past %d ms; write refused", self._busy_timeout_ms)
            raise StoreBusy()
        try:
            self._begin_immediate(conn, deadline)
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                log.info("transaction rolled back")
                raise
            if self._checkpoint_to_finish:
                self._checkpoint_to_finish = False
                _checkpoint(conn)
        finally:
            fcntl.flock(self._writer_lock, fcntl.LOCK_UN)
        self._checkpoint_now_and_then(conn)
        return result

    def _begin_immediate(self, conn: sqlite3.Connection, deadline: float) -> None:
        """BEGIN IMMEDIATE, which waits only for a writer outside the service (a shell, a script),
        and no longer than what is left of the bound once the turn was taken (StoreBusy after)."""
        left_ms = round((deadline - time.monotonic()) * 1000)
        shortened = left_ms < self._busy_timeout_ms - 1  # the turn took a while: wait less
        if shortened:
            conn.execute(f"PRAGMA busy_timeout = {max(left_ms, 0)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                log.warning("database busy past %d ms; write refused", self._busy_timeout_ms)
                raise StoreBusy() from exc
            raise
        finally:
            if shortened:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")

    def _take_writer_turn(self, deadline: float) -> bool:
        """Take the writers' file lock, trying often (see WRITER_PAUSE_FIRST_S); False at the deadline."""
        pause = WRITER_PAUSE_FIRST_S
        while True:
            try:
                fcntl.flock(self._writer_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    return False
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, WRITER_PAUSE_MAX_S)

    def _checkpoint_now_and_then(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database once enough commits and time have passed, in two steps.

        The bulk of the copy, and its fsync, runs here, after the turn was given back, while
        other writers carry on (inside the turn, ~100 ms under load, it stalled every writer:
        POST p99 ~110 ms). Writers append meanwhile, so the WAL could never start over: this
        process's next write, still inside its turn, copies just what they appended, and the
        writer after it can restart the WAL.
        """
        self._commits_since_checkpoint += 1
        now = time.monotonic()
        if self._commits_since_checkpoint < CHECKPOINT_EVERY_COMMITS or now - self._last_checkpoint < CHECKPOINT_EVERY_S:
            return
        self._commits_since_checkpoint = 0
        self._last_checkpoint = now
        _checkpoint(conn)
        self._checkpoint_to_finish = True

    def _read(self, sql: str, params: Iterable = ()) -> list[tuple]:
        try:
            return self._connection().execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise StoreBusy() from exc
            raise

    # -- records ---------------------------------------------------------------------------

    def insert(self, record: dict, *, request_id: str, now: str) -> str:
        """Store a new record at version 1 and return its JSON; DuplicateRecord if the id exists."""

        def work(conn: sqlite3.Connection) -> str:
            try:
                return _insert_row(conn, record, request_id, now)
            except sqlite3.IntegrityError:
                existing = conn.execute("SELECT doc FROM records WHERE test_id = ?", (record["test_id"],)).fetchone()
                raise DuplicateRecord(json.loads(existing[0])) from None

        try:
            doc = self._write(work)
        except DuplicateRecord:
            log.info("record not stored: test_id exists", extra={"test_id": record["test_id"]})
            raise
        log.info("committed", extra={"test_id": record["test_id"], "version": 1})
        return doc

    def correct(self, record: dict, *, expected: frozenset[int], request_id: str, now: str) -> Stored:
        """Store validated client fields as the record's next version, if its current version is
        one of `expected`; VersionMismatch otherwise."""
        return self._revise(record["test_id"], expected, lambda current: record, "correct", request_id, now)

    def void(self, test_id: str, *, expected: frozenset[int], request_id: str, now: str) -> Stored:
        """Store the next version with status entered-in-error, if the current version is one of
        `expected` (VersionMismatch otherwise); AlreadyVoided if it is entered-in-error already."""

        def entered_in_error(current: dict) -> dict:
            if current["status"] == VOIDED_STATUS:
                raise AlreadyVoided()
            return {**client_fields(current), "status": VOIDED_STATUS}

        return self._revise(test_id, expected, entered_in_error, "void", request_id, now)

    def _revise(self, test_id: str, expected: frozenset[int], change: Callable[[dict], dict], action: str,
                request_id: str, now: str) -> Stored:
        """Replace the current version in place (the row keeps its seq, so lists keep their order).

        The version is compared inside the write transaction, so of two writers that read the
        same version exactly one succeeds. The record must exist: callers have read it, and
        records are never deleted. The history row is written by the AFTER UPDATE trigger.
        """

        def work(conn: sqlite3.Connection) -> Stored:
            clinic_id, stored_doc = conn.execute(
                "SELECT clinic_id, doc FROM records WHERE test_id = ?", (test_id,)).fetchone()
            current = json.loads(stored_doc)
            if current["version"] not in expected:
                raise VersionMismatch(current["version"])
            fields = change(current)
            version = current["version"] + 1
            doc = _stored_doc(fields, created_at=current["created_at"], updated_at=now, version=version,
                              request_id=request_id)
            conn.execute(
                "UPDATE records SET test_type = ?, status = ?, collected_at = ?, updated_at = ?, version = ?,"
                " request_id = ?, doc = ? WHERE test_id = ?",
                (fields["test_type"], fields["status"], timestamp_sort_key(fields["collected_at"]), now, version,
                 request_id, doc, test_id),
            )
            return Stored(clinic_id, version, doc)

        try:
            stored = self._write(work)
        except VersionMismatch as exc:
            log.info("record not changed: version mismatch", extra={"test_id": test_id, "version": exc.current})
            raise
        except AlreadyVoided:
            log.info("record not changed: already voided", extra={"test_id": test_id})
            raise
        log.info("committed", extra={"test_id": test_id, "version": stored.version, "action": action})
        return stored

    def current(self, test_id: str) -> Stored | None:
        rows = self._read("SELECT clinic_id, version, doc FROM records WHERE test_id = ?", (test_id,))
        return Stored(*rows[0]) if rows else None

    def history_json(self, test_id: str) -> tuple[str, int]:
        """Every version of a record, oldest first, as a JSON array text and its length."""
        rows = self._read(_HISTORY_SQL, (test_id,))
        return "[" + ",".join(doc for _, doc in rows) + "]", len(rows)

    def audit(self, request_id: str) -> list[dict]:
        """What one request wrote, in the order it wrote it, with each record's clinic.

        A request writes one version of one record, or creates records in seq order (a batch),
        so (seq, version) order is write order."""
        rows = self._read(_AUDIT_SQL, (request_id,))
        return [{"test_id": t, "version": v, "action": a, "at": at, "clinic_id": c} for t, v, a, at, c, _ in rows]

    def insert_batch(self, records: list[dict], *, request_id: str, now: str, atomic: bool) -> dict[str, dict]:
        """Store new records (valid, distinct test_ids) in one transaction, in their order.

        Returns the stored record for every test_id that already existed: those are not stored.
        With `atomic`, nothing at all is stored when any already existed. The rows are built
        before the write lock is taken, so other writers wait only for the SQL.
        """
        rows = [_row(record, request_id, now) for record in records]
        test_ids = json.dumps([record["test_id"] for record in records])

        def work(conn: sqlite3.Connection) -> dict[str, str]:
            existing = dict(conn.execute(_EXISTING_SQL, (test_ids,)))
            if existing and atomic:
                raise _NothingStored(existing)
            _insert_rows(conn, [row for row in rows if row[0] not in existing])
            return existing

        try:
            existing = self._write(work)
        except _NothingStored as refused:
            existing = refused.existing
            log.info("batch not stored: test_ids exist", extra={"existing": len(existing)})
        else:
            log.info("committed", extra={"stored": len(records) - len(existing), "existing": len(existing)})
        return {test_id: json.loads(doc) for test_id, doc in existing.items()}

    def existing(self, test_ids: list[str]) -> dict[str, dict]:
        """The stored record of each of these test_ids that exists."""
        rows = self._read(_EXISTING_SQL, (json.dumps(test_ids),))
        return {test_id: json.loads(doc) for test_id, doc in rows}

    def bulk_insert(self, rows: Iterable[tuple], chunk_rows: int = 50_000) -> Iterator[int]:
        """Insert prepared rows (`_row`'s shape) in transactions of `chunk_rows`, yielding the running
        count after each commit. For the seed command, which prepares its rows faster than `_row`."""
        rows = iter(rows)
        total = 0
        conn = self._connection()
        # For the load only: a cache that holds the indexes being extended (the default 2 MiB
        # re-reads them from the OS for every row).
        conn.execute("PRAGMA cache_size = -262144")
        try:
            while chunk := list(islice(rows, chunk_rows)):
                self._write(lambda conn: _insert_rows(conn, chunk))
                total += len(chunk)
                yield total
        finally:
            conn.execute("PRAGMA cache_size = -2000")
            _checkpoint(conn)

    def list_page(self, filters: dict[str, str], after_seq: int, limit: int) -> tuple[str, int, int | None]:
        """One page of matching records, oldest ingested first: (JSON array text, its length, the
        seq the next page starts after, or None when this is the last page)."""
        sql, params = select_records(filters, after_seq, limit + 1)
        rows = self._read(sql, params)
        more = len(rows) > limit
        del rows[limit:]
        body = "[" + ",".join(doc for _, doc in rows) + "]"
        return body, len(rows), rows[-1][0] if more else None

    def export_docs(self, filters: dict[str, str], chunk_rows: int = 1000) -> Iterator[list[str]]:
        """Every matching record's JSON, oldest ingested first, in lists of at most `chunk_rows`.

        The query starts now, so a busy or broken database fails before a response is under way;
        rows are fetched only as the iterator is consumed, never all at once.
        """
        sql, params = select_records(filters)
        try:
            cursor = self._connection().execute(sql, params)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise StoreBusy() from exc
            raise

        def chunks() -> Iterator[list[str]]:
            try:
                while rows := cursor.fetchmany(chunk_rows):
                    yield [doc for _, doc in rows]
            finally:
                cursor.close()

        return chunks()

    def clinic_stats(self, clinic_id: str) -> dict:
        """Counts by test type and status, and the first and last collected_at, from clinic_counts."""
        rows = self._read(_STATS_SQL, (clinic_id,))
        by_test_type: dict[str, int] = {}
        by_status: dict[str, int] = {}
        for test_type, status, count, _, _ in rows:
            by_test_type[test_type] = by_test_type.get(test_type, 0) + count
            by_status[status] = by_status.get(status, 0) + count
        return {
            "clinic_id": clinic_id,
            "total": sum(by_status.values()),
            "by_test_type": dict(sorted(by_test_type.items())),
            "by_status": dict(sorted(by_status.items())),
            "first_collected_at": timestamp_from_sort_key(min(row[3] for row in rows)) if rows else None,
            "last_collected_at": timestamp_from_sort_key(max(row[4] for row in rows)) if rows else None,
        }

    def cursor_secret(self) -> bytes:
        """The key that signs paging cursors: made once by migration 2, the same in every worker."""
        if self._cursor_secret is None:
            self._cursor_secret = self._read("SELECT value FROM meta WHERE key = 'cursor_secret'")[0][0]
        return self._cursor_secret

    def count(self) -> int:
        return self._read("SELECT count(*) FROM records")[0][0]

    # -- operations ------------------------------------------------------------------------

    def readiness(self) -> dict:
        """Prove this process can read and take the write lock within the busy bound.

        Raises StoreBusy (locked past the bound) or StoreUnavailable.
        """

        def probe(conn: sqlite3.Connection) -> dict:
            conn.execute("SELECT 1 FROM records LIMIT 1").fetchall()
            return {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                    "schema_version": conn.execute("PRAGMA user_version").fetchone()[0]}

        try:
            return self._write(probe)  # commits an empty transaction: nothing is written
        except sqlite3.Error as exc:
            # Busy is StoreBusy already; anything else (read-only file system, not a database)
            # means this process cannot serve.
            raise StoreUnavailable(f"database check failed: {exc}") from exc

    def dashboard_counts(self, since_hour: str, top_clinics: int) -> dict:
        """What the dashboard shows, from the counter tables (migration 5): never a scan of records.

        `since_hour` is an hour key (`2025-06-01T12`); `clinics` holds the `top_clinics`
        largest clinics, `clinic_count` and `records` cover all of them.
        """
        try:
            clinic_count, records = self._read(
                "SELECT count(DISTINCT clinic_id), coalesce(sum(records), 0) FROM clinic_counts")[0]
            return {
                "records": records,
                "clinic_count": clinic_count,
                "clinics": self._read("SELECT clinic_id, sum(records) AS total FROM clinic_counts GROUP BY clinic_id"
                                      " ORDER BY total DESC, clinic_id LIMIT ?",
                                      (top_clinics,)),
                "hours": dict(self._read("SELECT hour, total FROM hourly_ingest WHERE hour >= ?", (since_hour,))),
                "schema_version": self._read("PRAGMA user_version")[0][0],
                "journal_mode": self._read("PRAGMA journal_mode")[0][0],
                "database_bytes": _file_size(self._path),
                "wal_bytes": _file_size(self._path + "-wal"),
            }
        except sqlite3.Error as exc:  # busy is StoreBusy already: this is a file that cannot be read
            raise StoreUnavailable(f"cannot read the dashboard counters: {exc}") from exc

    # -- API keys --------------------------------------------------------------------------
    # Only the hash of a key's secret is stored. find_key runs on every authenticated request
    # (a primary-key lookup, no cache), so a revocation holds from the next request everywhere.

    def create_key(self, *, key_id: str, name: str, roles: list[str], clinics: list[str] | None,
                   secret_sha256: str, created_at: str) -> None:
        self._write(lambda conn: conn.execute(
            "INSERT INTO api_keys (key_id, name, roles, clinics, secret_sha256, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key_id, name, json.dumps(roles), None if clinics is None else json.dumps(clinics),
             secret_sha256, created_at)))
        log.info("api key created", extra={"key_id": key_id})

    def find_key(self, key_id: str) -> dict | None:
        rows = self._read("SELECT secret_sha256, roles, clinics, revoked_at FROM api_keys WHERE key_id = ?", (key_id,))
        if not rows:
            return None
        secret_sha256, roles, clinics, revoked_at = rows[0]
        return {"secret_sha256": secret_sha256, "roles": json.loads(roles), "clinics": _clinics(clinics),
                "revoked_at": revoked_at}

    def list_keys(self) -> list[dict]:
        """Every key, oldest first, without its hash."""
        return [_key_listing(row) for row in self._read(f"SELECT {_KEY_LISTING} FROM api_keys ORDER BY created_at, key_id")]

    def revoke_key(self, key_id: str, now: str) -> tuple[dict, bool] | None:
        """Revoke a key: (its listing, whether this call revoked it), or None when there is no such key."""

        def work(conn: sqlite3.Connection) -> tuple[dict, bool] | None:
            changed = conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                   (now, key_id)).rowcount == 1
            row = conn.execute(f"SELECT {_KEY_LISTING} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            return (_key_listing(row), changed) if row else None

        result = self._write(work)
        if result and result[1]:
            log.info("api key revoked", extra={"key_id": key_id})
        return result


def _checkpoint(conn: sqlite3.Connection) -> None:
    """PASSIVE: copies what no reader still needs and never waits; what it leaves is the next
    one's work. A failure is logged, never raised: the write before it is committed."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:
        log.warning("checkpoint failed: %s", exc)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


# -- whole-database operations for the command line ----------------------------------------

def _open_existing(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A read-only connection to a database that must already exist (never creates one)."""
    if not os.path.isfile(path):
        raise StoreUnavailable(f"no database file at {path}")
    try:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                               timeout=busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
    return conn


def backup_database(source: str, dest: str, *, busy_timeout_ms: int = 5000) -> dict:
    """Copy the database at `source` into the new file `dest`, safely while it is being served.

    One backup step copies every page inside one read transaction, so the copy is the
    database as of one commit and writers carry on meanwhile (WAL). Copying a few pages per
    step would restart whenever another connection writes: under load, possibly for ever.
    The copy is built beside `dest`, switched to rollback-journal mode so it is one
    self-contained file, synced, and only then renamed into place.
    """
    if os.path.lexists(dest):
        raise FileExistsError(f"{dest} already exists; back up to a new name")
    partial = f"{dest}.partial"
    src = _open_existing(source, busy_timeout_ms)
    try:
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")
            summary = _summary(dst)
        finally:
            dst.close()
        _fsync(partial)
        os.replace(partial, dest)
        _fsync(os.path.dirname(os.path.abspath(dest)))
    except sqlite3.Error as exc:
        _remove(partial)
        if _is_busy(exc):
            raise StoreBusy() from exc
        raise StoreUnavailable(f"backup failed: {exc}") from exc
    except BaseException:
        _remove(partial)
        raise
    finally:
        src.close()
    log.info("backup written", extra=summary)
    return summary


# Each counter table against the truth it summarises, as (truth, kept) queries.
_COUNTERS = {
    "clinic_counts": ("SELECT clinic_id, test_type, status, count(*), min(collected_at), max(collected_at)"
                      " FROM records GROUP BY 1, 2, 3",
                      "SELECT clinic_id, test_type, status, records, first_collected_at, last_collected_at"
                      " FROM clinic_counts"),
    "hourly_ingest": ("SELECT substr(created_at, 1, 13), count(*) FROM records GROUP BY 1",
                      "SELECT hour, total FROM hourly_ingest"),
}


def check_database(path: str, *, busy_timeout_ms: int = 5000) -> dict:
    """Facts about the database at `path`, read-only: SQLite's integrity_check, the schema
    version, the record count and, from schema 5, how many counter rows disagree with a
    recount of `records` (0 when the triggers kept them right)."""
    conn = _open_existing(path, busy_timeout_ms)
    try:
        facts = {"integrity": [row[0] for row in conn.execute("PRAGMA integrity_check")], **_summary(conn)}
        if facts["schema_version"] >= 5:
            facts["counter_mismatches"] = {
                table: conn.execute(f"SELECT count(*) FROM ({truth} EXCEPT {kept})").fetchone()[0]
                + conn.execute(f"SELECT count(*) FROM ({kept} EXCEPT {truth})").fetchone()[0]
                for table, (truth, kept) in _COUNTERS.items()
            }
    except sqlite3.Error as exc:
        if _is_busy(exc):
            raise StoreBusy() from exc
        raise StoreUnavailable(f"cannot check {path}: {exc}") from exc
    finally:
        conn.close()
    return facts


def _summary(conn: sqlite3.Connection) -> dict:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    records = conn.execute("SELECT count(*) FROM records").fetchone()[0] if version else 0
    return {"schema_version": version, "records": records}


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


_KEY_LISTING = "key_id, name, roles, clinics, created_at, revoked_at"


def _key_listing(row: tuple) -> dict:
    key_id, name, roles, clinics, created_at, revoked_at = row
    return {"key_id": key_id, "name": name, "roles": json.loads(roles), "clinics": _clinics(clinics),
            "created_at": created_at, "revoked_at": revoked_at}


def _clinics(column: str | None) -> list[str] | None:
    return None if column is None else json.loads(column)


class _NothingStored(Exception):
    """Raised inside an atomic batch's transaction to roll it back; carries the test_ids that exist."""

    def __init__(self, existing: dict[str, str]) -> None:
        super().__init__(len(existing))
        self.existing = existing


# A record's versions: those superseded, from history, then the current one (migration 6).
_HISTORY_SQL = (
    "SELECT v.version, v.doc FROM record_versions AS v JOIN records AS r ON r.test_id = v.test_id"
    " WHERE v.test_id = ?1 AND v.version < r.version"
    " UNION ALL SELECT version, doc FROM records WHERE test_id = ?1 ORDER BY 1"
)
_AUDIT_SQL = (
    "SELECT v.test_id, v.version, v.action, v.at, r.clinic_id, r.seq FROM record_versions AS v"
    " JOIN records AS r ON r.test_id = v.test_id WHERE v.request_id = ?1 AND v.version < r.version"
    f" UNION ALL SELECT test_id, version, {_V6_ACTION.format(row='records')}, updated_at, clinic_id, seq"
    " FROM records WHERE request_id = ?1 ORDER BY 6, 2"
)
_STATS_SQL = ("SELECT test_type, status, records, first_collected_at, last_collected_at FROM clinic_counts"
              " WHERE clinic_id = ?")
_COUNT_SQL = (
    "INSERT INTO clinic_counts (clinic_id, test_type, status, records, first_collected_at, last_collected_at)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET"
    " records = records + excluded.records,"
    " first_collected_at = min(first_collected_at, excluded.first_collected_at),"
    " last_collected_at = max(last_collected_at, excluded.last_collected_at)"
)
_HOURLY_SQL = ("INSERT INTO hourly_ingest (hour, total) VALUES (?, ?)"
               " ON CONFLICT (hour) DO UPDATE SET total = total + excluded.total")
_EXISTING_SQL = "SELECT test_id, doc FROM records WHERE test_id IN (SELECT value FROM json_each(?))"
_INSERT_SQL = (
    "INSERT INTO records (test_id, clinic_id, patient_id, test_type, status, collected_at,"
    " created_at, updated_at, version, request_id, doc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)"
)


def _row(record: dict, request_id: str, now: str) -> tuple:
    """The parameters of _INSERT_SQL for one validated record at version 1; the last is its JSON."""
    return (record["test_id"], record["clinic_id"], record["patient_id"], record["test_type"], record["status"],
            timestamp_sort_key(record["collected_at"]), now, now, request_id,
            _stored_doc(record, created_at=now, updated_at=now, version=1, request_id=request_id))


def _insert_row(conn: sqlite3.Connection, record: dict, request_id: str, now: str) -> str:
    """Insert one validated record at version 1 inside the caller's transaction; return its JSON.

    Raises sqlite3.IntegrityError when the test_id is taken. Every way of creating records
    goes through here or its many-row form `_insert_rows` (same SQL, same row shape), so what
    is stored alongside a record is decided in one place.
    """
    row = _row(record, request_id, now)
    _insert_rows(conn, [row])
    return row[-1]


def _insert_rows(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    """`_insert_row` for many prepared rows at once (batch ingest, seed), inside the caller's transaction:
    the rows, their counts in clinic_counts (one upsert per clinic, test type and status) and in
    hourly_ingest (one per hour of created_at)."""
    conn.executemany(_INSERT_SQL, rows)
    groups: dict[tuple[str, str, str], list] = {}
    hours: dict[str, int] = {}
    for row in rows:
        key, collected, hour = (row[1], row[3], row[4]), row[5], row[6][:13]
        group = groups.get(key)
        if group is None:
            groups[key] = [1, collected, collected]
        else:
            group[0] += 1
            group[1] = min(group[1], collected)
            group[2] = max(group[2], collected)
        hours[hour] = hours.get(hour, 0) + 1
    conn.executemany(_COUNT_SQL, [(*key, *group) for key, group in groups.items()])
    conn.executemany(_HOURLY_SQL, hours.items())


# The filters a collection query may carry, each one parameterised condition on an indexed column.
_FILTER_SQL = {
    "clinic_id": "clinic_id = ?",
    "patient_id": "patient_id = ?",
    "test_type": "test_type = ?",
    "status": "status = ?",
    "collected_from": "collected_at >= ?",
    "collected_to": "collected_at < ?",
}
_TIME_FILTERS = ("collected_from", "collected_to")


def select_records(filters: dict[str, str], after_seq: int = 0, limit: int | None = None) -> tuple[str, list]:
    """The query for (seq, doc) of records matching `filters` (clean values, clinic_id among them),
    after `after_seq`, in seq order, and its parameters. Tests EXPLAIN exactly this."""
    unknown = set(filters) - _FILTER_SQL.keys()
    if unknown or "clinic_id" not in filters:
        raise ValueError(f"not a clinic query: {sorted(filters)}")
    conditions, params = [], []
    for name, condition in _FILTER_SQL.items():
        if name in filters:
            conditions.append(condition)
            params.append(timestamp_sort_key(filters[name]) if name in _TIME_FILTERS else filters[name])
    conditions.append("seq > ?")
    params.append(after_seq)
    sql = "SELECT seq, doc FROM records WHERE " + " AND ".join(conditions) + " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


def _stored_doc(record: dict, *, created_at: str, updated_at: str, version: int, request_id: str) -> str:
    """A version's response JSON: the client fields, then what the service adds."""
    stored = {**record, "created_at": created_at, "updated_at": updated_at, "version": version,
              "request_id": request_id}
    return json.dumps(stored, ensure_ascii=False)


def migrate(conn: sqlite3.Connection, upto: int = SCHEMA_VERSION) -> None:
    """Apply the missing migrations up to `upto` (tests build older schemas with it).

    BEGIN IMMEDIATE makes workers that start at once take turns; each re-reads the version
    inside the lock, so a migration runs exactly once.
    """
    if conn.execute("PRAGMA user_version").fetchone()[0] >= upto:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        for version in sorted(v for v in MIGRATIONS if current < v <= upto):
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            log.info("schema migrated", extra={"schema_version": version})
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split a migration into statements so they run inside our transaction.

    `executescript()` would COMMIT first. Pieces are joined until SQLite calls them complete,
    so a trigger body (`BEGIN ...; ...; END`) or a semicolon inside a string stays whole.
    """
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \t\n;"):
        raise ValueError(f"incomplete statement in migration: {pending.strip()[:60]}")
    return statements
