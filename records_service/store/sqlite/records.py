"""Record writes and queries in SQLite: every statement that reads or writes `records` and its history.

Functions take the connection of the caller's transaction (writes) or the `Database` (reads);
`SQLiteStore` wires them together. Counters are counters.py's business: a new record is only
inserted here, and a correction tells counters.py what moved.
"""

from __future__ import annotations

import json
import sqlite3
import time
from itertools import count, islice
from operator import add
from typing import Callable, Iterator

from ...validate import timestamp_sort_key
from ..base import Stored, next_version, record_conditions
from ..errors import DuplicateRecord
from . import counters
from .connection import Database, translate
from .migrations import schema_statements

_INSERT_SQL = (
    "INSERT INTO records (clinic_id, seq, test_id, patient_id, test_type, status, collected_at, version,"
    " request_id, key_id, doc) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)"
)
_EXISTING_SQL = "SELECT test_id, doc FROM records WHERE test_id IN (SELECT value FROM json_each(?))"
# A record's versions: those superseded, from history, then the current one.
_HISTORY_SQL = (
    "SELECT v.version, v.doc FROM record_versions AS v JOIN records AS r ON r.test_id = v.test_id"
    " WHERE v.test_id = ?1 AND v.version < r.version"
    " UNION ALL SELECT version, doc FROM records WHERE test_id = ?1 ORDER BY 1"
)
_ACTION = "CASE WHEN version = 1 THEN 'create' WHEN status = 'entered-in-error' THEN 'void' ELSE 'correct' END"
# One request's writes: superseded versions from history, current ones from records; a request
# writes one version of one record, or creates records in seq order (a batch).
_AUDIT_SQL = (
    "SELECT v.test_id, v.version, v.action, v.at, r.clinic_id, v.key_id, r.seq FROM record_versions AS v"
    " JOIN records AS r ON r.test_id = v.test_id WHERE v.request_id = ?1 AND v.version < r.version"
    f" UNION ALL SELECT test_id, version, {_ACTION}, json_extract(doc, '$.updated_at'), clinic_id, key_id, seq"
    " FROM records WHERE request_id = ?1 ORDER BY 7, 2"
)


def insert_rows(conn: sqlite3.Connection, rows: list[tuple], key_id: str | None) -> set[str]:
    """Insert `NewRow`-shaped rows inside the caller's transaction; return the clinics they went to.

    Raises sqlite3.IntegrityError when a test_id is taken. Each row gets the next seq of its
    clinic: the larger of the clock in microseconds (so one request's records, whatever their
    clinics, are in write order) and the clinic's last seq + 1 (so a clinic's order never goes
    back, whatever the clock does). A clinic's first record gives it a counters mark.
    """
    base = time.time_ns() // 1000
    last: dict[str, int | None] = {}
    params = []
    for n, (test_id, clinic_id, patient_id, test_type, status, collected, _created, request_id, doc) in enumerate(rows):
        if clinic_id not in last:
            last[clinic_id] = conn.execute("SELECT max(seq) FROM records WHERE clinic_id = ?", (clinic_id,)).fetchone()[0]
            if last[clinic_id] is None:
                counters.new_clinic(conn, clinic_id)
        previous = last[clinic_id]
        seq = base + n if previous is None else max(base + n, previous + 1)
        last[clinic_id] = seq
        params.append((clinic_id, seq, test_id, patient_id, test_type, status, collected, request_id, key_id, doc))
    conn.executemany(_INSERT_SQL, params)
    return set(last)


def stored(conn: sqlite3.Connection, test_id: str) -> dict:
    return json.loads(conn.execute("SELECT doc FROM records WHERE test_id = ?", (test_id,)).fetchone()[0])


def existing(conn: sqlite3.Connection, test_ids: list[str]) -> dict[str, str]:
    return dict(conn.execute(_EXISTING_SQL, (json.dumps(test_ids),)))


def revise(conn: sqlite3.Connection, test_id: str, expected: frozenset[int], change: Callable[[dict], dict],
           request_id: str, key_id: str | None, now: str) -> Stored:
    """Replace the current version in place, inside the caller's transaction (the row keeps its
    seq, so lists keep their order; the AFTER UPDATE trigger keeps the superseded version).

    The version is compared inside the write transaction, so of two writers that read the
    same version exactly one succeeds. The record must exist: callers have read it, and
    records are never deleted.
    """
    clinic_id, seq, test_type, status, collected, doc = conn.execute(
        "SELECT clinic_id, seq, test_type, status, collected_at, doc FROM records WHERE test_id = ?",
        (test_id,)).fetchone()
    fields, version, new_doc = next_version(json.loads(doc), expected, change, request_id=request_id, now=now)
    new_collected = timestamp_sort_key(fields["collected_at"])
    conn.execute(
        "UPDATE records SET test_type = ?, status = ?, collected_at = ?, version = ?, request_id = ?, key_id = ?,"
        " doc = ? WHERE clinic_id = ? AND seq = ?",
        (fields["test_type"], fields["status"], new_collected, version, request_id, key_id, new_doc, clinic_id, seq))
    counters.moved(conn, clinic_id, seq, (test_type, status, collected), (fields["test_type"], fields["status"],
                                                                          new_collected))
    return Stored(clinic_id, version, new_doc)


def duplicate(conn: sqlite3.Connection, test_id: str) -> DuplicateRecord:
    return DuplicateRecord(stored(conn, test_id))


def current(db: Database, test_id: str) -> Stored | None:
    rows = db.read("SELECT clinic_id, version, doc FROM records WHERE test_id = ?", (test_id,))
    return Stored(*rows[0]) if rows else None


def history_json(db: Database, test_id: str) -> tuple[str, int]:
    rows = db.read(_HISTORY_SQL, (test_id,))
    return "[" + ",".join(doc for _, doc in rows) + "]", len(rows)


def audit(db: Database, request_id: str) -> list[dict]:
    return [{"test_id": t, "version": v, "action": a, "at": at, "clinic_id": c, "key_id": k}
            for t, v, a, at, c, k, _ in db.read(_AUDIT_SQL, (request_id,))]


def select_records(filters: dict[str, str], after_seq: int = 0, limit: int | None = None) -> tuple[str, list]:
    """The query for (seq, doc) of records matching `filters` (clean values, clinic_id among them),
    after `after_seq`, in seq order, and its parameters. Every one is a search of the clinic's
    range of the table (or of the patient index); tests EXPLAIN exactly this."""
    conditions, params = record_conditions(filters, after_seq, "?")
    # Without statistics the planner walks the clinic's whole range for a patient: name the index.
    source = "records INDEXED BY records_by_patient" if "patient_id" in filters else "records"
    sql = f"SELECT seq, doc FROM {source} WHERE " + " AND ".join(conditions) + " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


def export_docs(db: Database, filters: dict[str, str], chunk_rows: int) -> Iterator[list[str]]:
    """Chunks of matching documents. The query starts now, so a database that cannot be read
    fails before a response is under way; an error later is raised (translated) by the iterator."""
    sql, params = select_records(filters)
    cursor = db.cursor(sql, params)

    def chunks() -> Iterator[list[str]]:
        try:
            while True:
                try:
                    rows = cursor.fetchmany(chunk_rows)
                except sqlite3.Error as exc:
                    raise translate(exc, "export failed") from exc
                if not rows:
                    return
                yield [doc for _, doc in rows]
        finally:
            cursor.close()

    return chunks()




# Built after a load, from sorted runs. records_by_request is kept: a load's rows share one
# request id (a seed's), so its entries arrive in its own order, appended (sorting after cost more).
_BUILT_AFTER_LOAD = ("records_by_test_id", "records_by_patient")
_LOAD_SQL = ("INSERT INTO records (clinic_id, seq, test_id, patient_id, test_type, status, collected_at, version,"
             " request_id, key_id, doc) VALUES (?2, ?10, ?1, ?3, ?4, ?5, ?6, 1, ?8, NULL, ?9)")


def load_into_empty(conn: sqlite3.Connection, rows: Iterator[tuple], chunk_rows: int) -> Iterator[int]:
    """Append NewRow-shaped rows to the records table of an empty database, inside the caller's
    transaction (a generator holds it across its yields), yielding the running count.

    Rows in (clinic_id, ingest) order (`seed.seed_rows_in_key_order`) each go after the one
    before, at the end of the clustered table: no staging, no sort, leaves filled. Two secondary
    indexes are dropped first and built from sorted runs once all rows are in (the same
    statements as schema.sql); the counters are tallied as the rows pass. Each row's seq is a
    base from the clock plus its place in the load, as `insert_rows` would give a batch. A
    duplicate test_id fails building the unique index, and the caller's rollback stores nothing.
    """
    for name in _BUILT_AFTER_LOAD:
        conn.execute(f"DROP INDEX {name}")
    tally = counters.Tally()
    base, total = time.time_ns() // 1000, 0
    while chunk := list(islice(rows, chunk_rows)):
        conn.executemany(_LOAD_SQL, map(add, chunk, zip(count(base + total))))
        tally.add(chunk, base + total)
        total += len(chunk)
        yield total
    for statement in schema_statements():
        if any(f"INDEX {name} ON" in statement for name in _BUILT_AFTER_LOAD):
            conn.execute(statement)
    counters.count_in(conn, tally)


def is_empty(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM records LIMIT 1").fetchone() is None
