"""The only module that speaks SQL: one connection per process, migrations, writes, queries.

Every write goes through `Store._write`, which opens `BEGIN IMMEDIATE` (so a write never
starts as a reader and fails with SQLITE_BUSY at upgrade), waits for other writers up to the
busy bound, and commits or rolls back, logging which. Stored records keep their response
JSON (`doc`) next to the indexed columns, so a list is answered by joining stored bodies
instead of rebuilding and re-encoding every record.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, TypeVar

from .errors import AlreadyVoided, DuplicateRecord, StoreBusy, StoreUnavailable, VersionMismatch
from .validate import VOIDED_STATUS, client_fields, timestamp_sort_key

log = logging.getLogger("records_service.store")

T = TypeVar("T")

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}

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
    # Every version of every record, append-only. Triggers on `records` write it, so every way
    # of creating or changing a record (single, batch, seed) keeps history without knowing it.
    # rowid order is write order: /audit lists one request's writes in the order it made them.
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
    # Counters for the dashboard, kept by a trigger so every way of creating a record (one
    # POST, a batch, seed) counts it, and the dashboard never scans `records`. A record is
    # counted once, at ingest, in the UTC hour of its `created_at`. Records are never deleted
    # and corrections and voids update the row in place, keeping clinic_id and created_at:
    # they count nothing. `check` recounts, to prove it.
    5: """
    CREATE TABLE clinic_counts (
        clinic_id TEXT PRIMARY KEY,
        total     INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE hourly_ingest (
        hour    TEXT PRIMARY KEY,           -- created_at's first 13 characters: 2025-06-01T12
        total   INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO clinic_counts (clinic_id, total) SELECT clinic_id, count(*) FROM records GROUP BY clinic_id;
    INSERT INTO hourly_ingest (hour, total) SELECT substr(created_at, 1, 13), count(*) FROM records GROUP BY 1;
    CREATE TRIGGER records_counted AFTER INSERT ON records BEGIN
        INSERT INTO clinic_counts (clinic_id, total) VALUES (NEW.clinic_id, 1)
            ON CONFLICT (clinic_id) DO UPDATE SET total = total + 1;
        INSERT INTO hourly_ingest (hour, total) VALUES (substr(NEW.created_at, 1, 13), 1)
            ON CONFLICT (hour) DO UPDATE SET total = total + 1;
    END;
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
        self._pid: int | None = None
        self._file_id: tuple[int, int] | None = None

    # -- connection and schema -------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid() and _file_id(self._path) != self._file_id:
            # The file or its directory was removed (or swapped) under us: an open connection
            # would go on acknowledging writes into an unlinked file, so open the path afresh.
            log.warning("the database file is no longer at its path; reopening")
            self.close()
        if self._conn is None or self._pid != os.getpid():
            self._conn = None
            self._conn = self._open()
            self._pid = os.getpid()
            self._file_id = _file_id(self._path)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; _write says BEGIN and COMMIT itself.
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=self._busy_timeout_ms / 1000)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreUnavailable("the database could not be switched to WAL mode")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._synchronous == 'FULL' else 'NORMAL'}")
            migrate(conn)
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise StoreBusy() from exc
            raise StoreUnavailable(f"cannot open database: {exc}") from exc
        return conn

    def open(self) -> None:
        """Open (and migrate) now rather than at the first request."""
        self._connection()

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one BEGIN IMMEDIATE transaction; the only place that begins or commits."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                log.warning("database busy past %d ms; write refused", self._busy_timeout_ms)
                raise StoreBusy() from exc
            raise
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            log.info("transaction rolled back")
            raise
        return result

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

    def list_clinic_json(self, clinic_id: str) -> tuple[str, int]:
        """The clinic's records, oldest ingested first, as a JSON array text and its length."""
        return _json_array(self._read("SELECT doc FROM records WHERE clinic_id = ? ORDER BY seq", (clinic_id,)))

    def current(self, test_id: str) -> Stored | None:
        rows = self._read("SELECT clinic_id, version, doc FROM records WHERE test_id = ?", (test_id,))
        return Stored(*rows[0]) if rows else None

    def history_json(self, test_id: str) -> tuple[str, int]:
        """Every version of a record, oldest first, as a JSON array text and its length."""
        return _json_array(self._read("SELECT doc FROM record_versions WHERE test_id = ? ORDER BY version", (test_id,)))

    def audit(self, request_id: str) -> list[dict]:
        """What one request wrote, in the order it wrote it, with each record's clinic."""
        rows = self._read(
            "SELECT v.test_id, v.version, v.action, v.at, r.clinic_id FROM record_versions AS v"
            " JOIN records AS r ON r.test_id = v.test_id WHERE v.request_id = ? ORDER BY v.rowid", (request_id,))
        return [{"test_id": t, "version": v, "action": a, "at": at, "clinic_id": c} for t, v, a, at, c in rows]

    def get(self, test_id: str) -> dict | None:
        rows = self._read("SELECT doc FROM records WHERE test_id = ?", (test_id,))
        return json.loads(rows[0][0]) if rows else None

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
                "SELECT count(*), coalesce(sum(total), 0) FROM clinic_counts")[0]
            return {
                "records": records,
                "clinic_count": clinic_count,
                "clinics": self._read("SELECT clinic_id, total FROM clinic_counts ORDER BY total DESC, clinic_id LIMIT ?",
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
    "clinic_counts": ("SELECT clinic_id, count(*) FROM records GROUP BY 1",
                      "SELECT clinic_id, total FROM clinic_counts"),
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


def _insert_row(conn: sqlite3.Connection, record: dict, request_id: str, now: str) -> str:
    """Insert one validated record at version 1 inside the caller's transaction; return its JSON.

    Raises sqlite3.IntegrityError when the test_id is taken. Every way of creating records
    goes through here, so what is stored alongside a record is decided in one place.
    """
    doc = _stored_doc(record, created_at=now, updated_at=now, version=1, request_id=request_id)
    conn.execute(
        "INSERT INTO records (test_id, clinic_id, patient_id, test_type, status, collected_at,"
        " created_at, updated_at, version, request_id, doc)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
        (record["test_id"], record["clinic_id"], record["patient_id"], record["test_type"],
         record["status"], timestamp_sort_key(record["collected_at"]), now, now, request_id, doc),
    )
    return doc


def _stored_doc(record: dict, *, created_at: str, updated_at: str, version: int, request_id: str) -> str:
    """A version's response JSON: the client fields, then what the service adds."""
    stored = {**record, "created_at": created_at, "updated_at": updated_at, "version": version,
              "request_id": request_id}
    return json.dumps(stored, ensure_ascii=False)


def _json_array(rows: list[tuple]) -> tuple[str, int]:
    """Stored JSON documents (first column) joined into one array text, and how many."""
    return "[" + ",".join(row[0] for row in rows) + "]", len(rows)


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
