"""Writing into a database of an older schema the way the code of that schema did, for migration tests."""

from __future__ import annotations

import sqlite3

from records_service import store


def insert_as_schemas_2_to_6(conn: sqlite3.Connection, record: dict, request_id: str, now: str) -> str:
    """Insert a record and count it in clinic_counts, as `_insert_row` did from schema 2 to 6 (the
    triggers of those schemas did the rest; schema 7 counts hourly_ingest in code too). Returns its JSON."""
    row = store._row(record, request_id, now)
    conn.execute(store._INSERT_SQL, row)
    conn.execute(store._COUNT_SQL, (row[1], row[3], row[4], 1, row[5], row[5]))
    return row[-1]
