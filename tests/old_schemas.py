"""Writing into a database of an older schema the way the code of that schema did, for migration tests.

Frozen copies of the insert of schemas 1 to 7 (a rowid table with created_at and updated_at
columns), so tests can build the databases that older releases left behind.
"""

from __future__ import annotations

import sqlite3

from records_service.store import prepare
from records_service.store.sqlite.migrations import migrate

INSERT_SQL = (
    "INSERT INTO records (test_id, clinic_id, patient_id, test_type, status, collected_at,"
    " created_at, updated_at, version, request_id, doc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)"
)
COUNT_SQL = (
    "INSERT INTO clinic_counts (clinic_id, test_type, status, records, first_collected_at, last_collected_at)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET"
    " records = records + excluded.records,"
    " first_collected_at = min(first_collected_at, excluded.first_collected_at),"
    " last_collected_at = max(last_collected_at, excluded.last_collected_at)"
)
HOURLY_SQL = ("INSERT INTO hourly_ingest (hour, total) VALUES (?, ?)"
              " ON CONFLICT (hour) DO UPDATE SET total = total + excluded.total")


def old_row(new_row: tuple) -> tuple:
    """A NewRow (or a seed row) in the shape schemas 1 to 7 inserted: updated_at beside created_at."""
    test_id, clinic_id, patient_id, test_type, status, collected, created_at, request_id, doc = new_row
    return test_id, clinic_id, patient_id, test_type, status, collected, created_at, created_at, request_id, doc


def insert_as_schema(version: int, conn: sqlite3.Connection, record: dict, request_id: str, now: str) -> str:
    """Insert a record as the code of schema `version` (1 to 7) did, counters and all; returns its JSON.

    Schema 1 inserted the row alone; 2 to 6 also counted it in clinic_counts (their triggers did
    the rest); 7 counted hourly_ingest in code too."""
    row = old_row(prepare({"unit": None, "notes": None, **record}, request_id, now))
    conn.execute(INSERT_SQL, row)
    if version >= 2:
        conn.execute(COUNT_SQL, (row[1], row[3], row[4], 1, row[5], row[5]))
    if version >= 7:
        conn.execute(HOURLY_SQL, (now[:13], 1))
    return row[-1]


def insert_as_schemas_2_to_6(conn: sqlite3.Connection, record: dict, request_id: str, now: str) -> str:
    return insert_as_schema(6, conn, record, request_id, now)


def database_at(path, version: int) -> sqlite3.Connection:
    """A new WAL database at schema `version`, built by the migrations of that time; the caller closes it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn, upto=version)
    return conn
