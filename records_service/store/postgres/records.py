"""Record writes and queries in PostgreSQL: every statement that reads or writes `records` and its history.

Write functions take the connection of the caller's transaction, reads the `Database`;
`PostgresStore` wires them together. The documents, history and audit they return are
byte for byte those of the SQLite engine: both build them with `base.stored_doc`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Callable, Iterable, Iterator

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from ...validate import timestamp_sort_key
from ..base import Stored, next_version, record_conditions
from . import counters
from .connection import Database, translate

# One statement inserts a whole batch from arrays (sent in binary: text arrays would be escaped
# element by element, ~0.1 s of the worker's CPU for 1,000 records) and counts what went in;
# RETURNING names what went in. Each row's seq is the larger of the clock in microseconds plus its
# place in the request (`base`: one request's records, whatever their clinics, are in write order)
# and its clinic's last seq plus its place among the request's rows of that clinic (`nth`: a
# clinic's order never goes back, whatever the clock does): SQLite's rule. The clinic's last seq is
# its row of clinic_seq (kept by a trigger on records), read by this statement, so after the
# clinic's lock was taken: no other writer's uncommitted seq can be behind it.
def _insert_sql(skip_taken: bool) -> str:
    """The batch insert. `skip_taken`: a taken test_id is skipped (ON CONFLICT, at the price of a
    look-up per row before its insert) and only what went in is counted; otherwise a taken one
    fails the statement (a unique violation), so every row went in and is counted from the arrays."""
    conflict = "ON CONFLICT (test_id) DO NOTHING " if skip_taken else ""
    counted = "stored JOIN t USING (test_id)" if skip_taken else "t"
    return f"""
WITH t AS (
    SELECT * FROM unnest(%(clinic_id)b::text[], %(base)b::int8[], %(nth)b::int8[], %(test_id)b::text[],
                         %(patient_id)b::text[], %(test_type)b::text[], %(status)b::text[], %(collected_at)b::text[],
                         %(hour)b::text[], %(request_id)b::text[], %(doc)b::text[]) WITH ORDINALITY
        AS u (clinic_id, base, nth, test_id, patient_id, test_type, status, collected_at, hour, request_id, doc, n)
), stored AS (
    INSERT INTO records (clinic_id, seq, test_id, patient_id, test_type, status, collected_at, version,
                         request_id, key_id, doc)
    SELECT t.clinic_id, greatest(t.base, coalesce(s.last_seq, 0) + t.nth),
           t.test_id, t.patient_id, t.test_type, t.status, t.collected_at, 1, t.request_id, %(key_id)s, t.doc
    FROM t LEFT JOIN clinic_seq AS s USING (clinic_id) ORDER BY t.n
    {conflict}RETURNING test_id
), counted AS (
    INSERT INTO clinic_counts (clinic_id, test_type, status, records)
    SELECT t.clinic_id, t.test_type, t.status, count(*) FROM {counted} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET records = clinic_counts.records + excluded.records
), hours AS (
    INSERT INTO clinic_hours (clinic_id, hour, records)
    SELECT t.clinic_id, t.hour, count(*) FROM {counted} GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (clinic_id, hour) DO UPDATE SET records = clinic_hours.records + excluded.records
)
SELECT test_id FROM stored
"""


_INSERT_ALL_SQL = _insert_sql(skip_taken=False)
_INSERT_SQL = _insert_sql(skip_taken=True)
_EXISTING_SQL = "SELECT test_id, doc FROM records WHERE test_id = ANY(%s)"
_HISTORY_SQL = (
    "SELECT v.version, v.doc FROM record_versions AS v JOIN records AS r ON r.test_id = v.test_id"
    " WHERE v.test_id = %(id)s AND v.version < r.version"
    " UNION ALL SELECT version, doc FROM records WHERE test_id = %(id)s ORDER BY 1"
)
_ACTION = "CASE WHEN version = 1 THEN 'create' WHEN status = 'entered-in-error' THEN 'void' ELSE 'correct' END"
_AUDIT_SQL = (
    "SELECT v.test_id, v.version, v.action, v.at, r.clinic_id, v.key_id, r.seq FROM record_versions AS v"
    " JOIN records AS r ON r.test_id = v.test_id WHERE v.request_id = %(id)s AND v.version < r.version"
    f" UNION ALL SELECT test_id, version, {_ACTION}, doc::json ->> 'updated_at', clinic_id, key_id, seq"
    " FROM records WHERE request_id = %(id)s ORDER BY 7, 2"
)


# Take each clinic's write lock, in one order (no deadlock); then shorten lock_timeout by the time
# that took, so the busy bound covers every wait of the transaction together, as on SQLite.
_LOCK_CLINICS_SQL = (
    "SELECT set_config('lock_timeout', greatest(1, round(1000 * extract(epoch FROM"
    " current_setting('lock_timeout')::interval - (clock_timestamp() - now()))))::bigint || 'ms', true)"
    " FROM (SELECT count(pg_advisory_xact_lock(hashtextextended(c, 0))) FROM unnest(%s::text[]) AS c) AS locked"
)


def lock_clinics(conn: psycopg.Connection, clinics: list[str]) -> None:
    """Take each clinic's write lock until the transaction ends.

    Within a clinic, records are then committed in seq order: a reader paging past seq N
    never misses a record committed later with a smaller one.
    """
    conn.execute(_LOCK_CLINICS_SQL, (sorted(clinics),))


def insert_rows(conn: psycopg.Connection, rows: list[tuple], key_id: str | None) -> set[str]:
    """Insert `NewRow`-shaped rows inside the caller's transaction, counted in; return the
    test_ids inserted (one already taken is not: stored before, or by a writer that committed
    meanwhile).

    Everything that does not need the clinics' locks is done before taking them: the arrays are
    built here, and the lock and the insert go in one round trip (a pipeline), so the locks are
    held for the insert's own time and the commit. The insert first assumes no test_id is taken
    (the common case, and the cheaper statement: ~12% less CPU), in a savepoint; if one is, it is
    rolled back to the savepoint (the clinics' locks stay) and done again skipping the taken ones."""
    if not rows:
        return set()
    base = time.time_ns() // 1000
    test_id, clinic_id, patient_id, test_type, status, collected, created, request_id, doc = zip(*rows)
    params = {"clinic_id": list(clinic_id), "base": [base + n for n in range(len(rows))],
              "nth": _places_in_clinic(clinic_id), "test_id": list(test_id), "patient_id": list(patient_id),
              "test_type": list(test_type), "status": list(status), "collected_at": list(collected),
              "hour": [at[:13] for at in created], "request_id": list(request_id), "doc": list(doc), "key_id": key_id}
    try:
        with conn.pipeline():
            lock_clinics(conn, list(set(clinic_id)))
            conn.execute("SAVEPOINT insert_rows")
            inserted = conn.execute(_INSERT_ALL_SQL, params)
            conn.execute("RELEASE SAVEPOINT insert_rows")
    except pg_errors.UniqueViolation as exc:
        if exc.diag.constraint_name != "records_by_test_id":
            raise
        conn.execute("ROLLBACK TO SAVEPOINT insert_rows")
        inserted = conn.execute(_INSERT_SQL, params)
    return {stored for (stored,) in inserted.fetchall()}


def _places_in_clinic(clinics: Iterable[str]) -> list[int]:
    """Each row's place (1, 2, ...) among the rows of its clinic, in order."""
    seen: Counter[str] = Counter()
    places = []
    for clinic in clinics:
        seen[clinic] += 1
        places.append(seen[clinic])
    return places


def existing(conn: psycopg.Connection, test_ids: list[str]) -> dict[str, str]:
    return dict(conn.execute(_EXISTING_SQL, (test_ids,)).fetchall())


def revise(conn: psycopg.Connection, test_id: str, expected: frozenset[int], change: Callable[[dict], dict],
           request_id: str, key_id: str | None, now: str) -> Stored:
    """Replace the current version in place, inside the caller's transaction (the row keeps its
    seq; the trigger keeps the superseded version). The row is locked (FOR UPDATE) before its
    version is compared, so of writers that read the same version exactly one succeeds; the
    others wait for it, then see its version and get VersionMismatch."""
    clinic_id, test_type, status, doc = conn.execute(
        "SELECT clinic_id, test_type, status, doc FROM records WHERE test_id = %s FOR UPDATE", (test_id,)).fetchone()
    fields, version, new_doc = next_version(json.loads(doc), expected, change, request_id=request_id, now=now)
    conn.execute(
        "UPDATE records SET test_type = %s, status = %s, collected_at = %s, version = %s, request_id = %s,"
        " key_id = %s, doc = %s WHERE test_id = %s",
        (fields["test_type"], fields["status"], timestamp_sort_key(fields["collected_at"]), version, request_id,
         key_id, new_doc, test_id))
    counters.moved(conn, clinic_id, (test_type, status), (fields["test_type"], fields["status"]))
    return Stored(clinic_id, version, new_doc)


def current(db: Database, test_id: str) -> Stored | None:
    rows = db.read("SELECT clinic_id, version, doc FROM records WHERE test_id = %s", (test_id,))
    return Stored(*rows[0]) if rows else None


def history_json(db: Database, test_id: str) -> tuple[str, int]:
    rows = db.read(_HISTORY_SQL, {"id": test_id})
    return "[" + ",".join(doc for _, doc in rows) + "]", len(rows)


def audit(db: Database, request_id: str) -> list[dict]:
    rows = db.read(_AUDIT_SQL, {"id": request_id})
    return [{"test_id": t, "version": v, "action": a, "at": at, "clinic_id": c, "key_id": k}
            for t, v, a, at, c, k, _ in rows]


def select_records(filters: dict[str, str], after_seq: int = 0, limit: int | None = None) -> tuple[str, list]:
    """The query for (seq, doc) of records matching `filters` (clean values, clinic_id among
    them) after `after_seq`, in seq order, and its parameters."""
    conditions, params = record_conditions(filters, after_seq, "%s")
    sql = "SELECT seq, doc FROM records WHERE " + " AND ".join(conditions) + " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT %s"
        params.append(limit)
    return sql, params


def export_docs(db: Database, filters: dict[str, str], chunk_rows: int) -> Iterator[list[str]]:
    """Chunks of matching documents from a server-side cursor, so memory stays flat however
    many match. The first chunk is fetched now, so a database that cannot be read fails before
    a response is under way; an error later is raised (translated) by the iterator. The
    cursor lives in a read-only transaction of this thread's connection until the last chunk
    (or the iterator's close); a transaction left open by an iterator never started is rolled
    back at the connection's next use."""
    sql, params = select_records(filters)
    conn = db.connection()
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cursor = conn.cursor(name="export")
        cursor.execute(sql, params)
        first = cursor.fetchmany(chunk_rows)
    except psycopg.Error as exc:
        _end(db, conn)
        raise translate(exc, "export failed") from exc

    def chunks() -> Iterator[list[str]]:
        rows = first
        try:
            while rows:
                yield [doc for _, doc in rows]
                try:
                    rows = cursor.fetchmany(chunk_rows)
                except psycopg.Error as exc:
                    raise translate(exc, "export failed") from exc
        finally:
            _end(db, conn)

    return chunks()


def _end(db: Database, conn: psycopg.Connection) -> None:
    """End the export's transaction (its cursor with it); a broken connection is dropped."""
    if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()
    db.drop_if_broken()
