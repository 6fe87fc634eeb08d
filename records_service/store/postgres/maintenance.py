"""Whole-database operations for the command line on PostgreSQL: `check`, `backup` (a pointer
to pg_dump) and loading a copy of a SQLite database (`copy`)."""

from __future__ import annotations

import logging
from typing import Iterable

import psycopg

from ...config import redact_url
from ..errors import StoreError
from . import counters
from .connection import Database
from .migrations import SCHEMA_VERSION, current_version

log = logging.getLogger("records_service.store")

# The tables `copy` fills, in order, and their columns (the same names on both engines).
COPIED_TABLES = {
    "records": ("clinic_id", "seq", "test_id", "patient_id", "test_type", "status", "collected_at", "version",
                "request_id", "key_id", "doc"),
    "record_versions": ("test_id", "version", "action", "request_id", "at", "doc", "key_id"),
    "api_keys": ("key_id", "name", "roles", "clinics", "secret_sha256", "created_at", "revoked_at"),
}


def backup_hint(url: str) -> StoreError:
    """What `backup` says on PostgreSQL, in one line: the server's own tool makes the consistent copy."""
    return StoreError(f"on PostgreSQL use pg_dump, which copies consistently while the service runs: "
                      f"pg_dump --format=custom --file=DEST '{redact_url(url)}'")


def check_database(db: Database) -> dict:
    """Facts about the database, read-only and in one snapshot: the schema version, the record
    count and, at the current schema, how many counter rows disagree with a recount."""

    def read(conn: psycopg.Connection) -> dict:
        version = current_version(conn)
        facts = {"integrity": ["ok"], "schema_version": version,
                 "records": conn.execute("SELECT count(*) FROM records").fetchone()[0] if version else 0,
                 "expected_schema_version": SCHEMA_VERSION}
        if version == SCHEMA_VERSION:
            facts["counter_mismatches"] = counters.mismatches(conn)
        return facts

    return db.snapshot(read, unbounded=True)


def load_tables(db: Database, tables: dict[str, Iterable[tuple]], cursor_secret: bytes) -> dict[str, int]:
    """Load rows of COPIED_TABLES (in their column order) into this empty database in one
    transaction with COPY, keep the source's cursor key (cursors handed out go on working),
    and count the counters from the records. Returns how many rows each table got."""

    def work(conn: psycopg.Connection) -> dict[str, int]:
        if conn.execute("SELECT EXISTS (SELECT 1 FROM records) OR EXISTS (SELECT 1 FROM api_keys)").fetchone()[0]:
            raise StoreError(f"{redact_url(db.url)} already holds records or keys; copy only into an empty database")
        loaded = {}
        for table, columns in COPIED_TABLES.items():
            loaded[table] = _copy_rows(conn, table, columns, tables[table])
        conn.execute("UPDATE meta SET value = %s WHERE key = 'cursor_secret'", (cursor_secret,))
        for statement in counters.RECOUNT:
            conn.execute(statement)
        conn.execute("ANALYZE records")  # the planner's statistics, at once rather than at autovacuum's pace
        return loaded

    return db.write(work, unbounded=True)


def _copy_rows(conn: psycopg.Connection, table: str, columns: tuple[str, ...], rows: Iterable[tuple]) -> int:
    count = 0
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count

