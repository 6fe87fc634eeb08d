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
from typing import Callable, Iterable, TypeVar

from .errors import DuplicateRecord, StoreBusy, StoreUnavailable
from .validate import timestamp_sort_key

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
}
SCHEMA_VERSION = max(MIGRATIONS)


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

    # -- connection and schema -------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._conn = None
            self._conn = self._open()
            self._pid = os.getpid()
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

    def list_clinic_json(self, clinic_id: str) -> tuple[str, int]:
        """The clinic's records, oldest ingested first, as a JSON array text and its length."""
        rows = self._read("SELECT doc FROM records WHERE clinic_id = ? ORDER BY seq", (clinic_id,))
        return "[" + ",".join(row[0] for row in rows) + "]", len(rows)

    def get(self, test_id: str) -> dict | None:
        rows = self._read("SELECT doc FROM records WHERE test_id = ?", (test_id,))
        return json.loads(rows[0][0]) if rows else None

    def count(self) -> int:
        return self._read("SELECT count(*) FROM records")[0][0]

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
    stored = {**record, "created_at": now, "updated_at": now, "version": 1, "request_id": request_id}
    doc = json.dumps(stored, ensure_ascii=False)
    conn.execute(
        "INSERT INTO records (test_id, clinic_id, patient_id, test_type, status, collected_at,"
        " created_at, updated_at, version, request_id, doc)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
        (record["test_id"], record["clinic_id"], record["patient_id"], record["test_type"],
         record["status"], timestamp_sort_key(record["collected_at"]), now, now, request_id, doc),
    )
    return doc


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

    `executescript()` would COMMIT first; migrations contain no semicolons inside strings.
    """
    return [s.strip() for s in script.split(";") if s.strip()]
