"""Whole-database operations for the command line: a consistent backup while serving, and `check`."""

from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreUnavailable
from . import counters
from .connection import translate
from .migrations import SCHEMA_VERSION

log = logging.getLogger("records_service.store")


def _open_existing(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A read-only connection to a database that must already exist (never creates one)."""
    if not os.path.isfile(path):
        raise StoreUnavailable(f"no database file at {path}")
    try:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                               timeout=busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    except sqlite3.Error as exc:
        raise translate(exc, f"cannot open {path}") from exc
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
        raise translate(exc, "backup failed") from exc
    except BaseException:
        _remove(partial)
        raise
    finally:
        src.close()
    log.info("backup written", extra=summary)
    return summary


def check_database(path: str, *, busy_timeout_ms: int = 5000) -> dict:
    """Facts about the database at `path`, read-only: SQLite's integrity_check, the schema
    version, the record count and, at the current schema, how many counter rows disagree
    with a recount of `records` (0 when they are right)."""
    conn = _open_existing(path, busy_timeout_ms)
    try:
        facts = {"integrity": [row[0] for row in conn.execute("PRAGMA integrity_check")], **_summary(conn),
                 "expected_schema_version": SCHEMA_VERSION}
        if facts["schema_version"] == SCHEMA_VERSION:
            facts["counter_mismatches"] = counters.mismatches(conn)
    except sqlite3.Error as exc:
        raise translate(exc, f"cannot check {path}") from exc
    finally:
        conn.close()
    return facts


@contextmanager
def tables_of(path: str, tables: dict[str, tuple[str, ...]], *, busy_timeout_ms: int = 5000):
    """Rows of `tables` (name -> columns) of the database at `path`, and its cursor key, all as
    of one commit (one read transaction), for copying it elsewhere while it may be served."""
    conn = _open_existing(path, busy_timeout_ms)
    try:
        conn.execute("BEGIN")
        secret = conn.execute("SELECT value FROM meta WHERE key = 'cursor_secret'").fetchone()[0]
        yield {table: conn.execute(f"SELECT {', '.join(columns)} FROM {table}") for table, columns in tables.items()}, secret
    except sqlite3.Error as exc:
        raise translate(exc, f"cannot read {path}") from exc
    finally:
        conn.close()


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
