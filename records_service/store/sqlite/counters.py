"""Exact counters without a counter write in each insert: /tests/_stats, the dashboard, `check`.

Each clinic has a mark (`clinic_marks.counted_seq`): its records up to the mark are counted in
clinic_counts (by test type and status), clinic_times (their collected_at, so first and last
stay exact) and hourly_ingest (by hour of ingest). Records after the mark, the clinic's tail,
are counted when read: a clinic's tail is the last few rows of its range of the table, so a
read costs one short range search more. `fold` moves tails under the counters, now and then,
in a transaction of its own: a POST writes 4 pages instead of 7 (issue 14), and the counters
are written once per fold instead of once per record.

A correction or void of a counted record moves it between groups here (`moved`): a few index
updates, never a scan of the clinic. One of a record still in the tail needs nothing.
Every read of the counters runs in one read transaction, so a fold in between cannot make a
record count twice or not at all.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from itertools import count
from operator import itemgetter
from typing import Iterable

from ..base import clinic_stats_of
from .connection import Database

_HOUR = "substr(json_extract(r.doc, '$.created_at'), 1, 13)"  # of records AS r
_MARK = "coalesce((SELECT counted_seq FROM clinic_marks WHERE clinic_id = ?1), 0)"

# A fold in four statements, whatever the number of clinics: each reads the marks of the clinics
# in json array ?1, which the last one moves. Clinic by clinic it took six statements each
# (hundreds of clinics a second a process under POSTs), all inside the writers' turn.
_MARKS_TO_FOLD = (
    "WITH marks AS (SELECT m.clinic_id, m.counted_seq FROM json_each(?1) AS j"
    " JOIN clinic_marks AS m ON m.clinic_id = j.value)"
)
_TAIL_ROWS = "marks AS m JOIN records AS r ON r.clinic_id = m.clinic_id AND r.seq > m.counted_seq"
_FOLD_COUNTS = (
    f"{_MARKS_TO_FOLD} INSERT INTO clinic_counts (clinic_id, test_type, status, records)"
    f" SELECT r.clinic_id, r.test_type, r.status, count(*) FROM {_TAIL_ROWS} GROUP BY 1, 2, 3"
    " ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET records = records + excluded.records"
)
_FOLD_HOURS = (
    f"{_MARKS_TO_FOLD} INSERT INTO hourly_ingest (hour, total)"
    f" SELECT {_HOUR}, count(*) FROM {_TAIL_ROWS} GROUP BY 1"
    " ON CONFLICT (hour) DO UPDATE SET total = total + excluded.total"
)
_FOLD_TIMES = (  # one row for each record counted
    f"{_MARKS_TO_FOLD} INSERT INTO clinic_times (clinic_id, collected_at, seq)"
    f" SELECT r.clinic_id, r.collected_at, r.seq FROM {_TAIL_ROWS}"
)
_FOLD_MOVE_MARKS = (
    f"{_MARKS_TO_FOLD} UPDATE clinic_marks SET counted_seq = (SELECT max(seq) FROM records"
    " WHERE records.clinic_id = clinic_marks.clinic_id)"
    " WHERE clinic_id IN (SELECT clinic_id FROM marks) AND EXISTS (SELECT 1 FROM records"
    " WHERE records.clinic_id = clinic_marks.clinic_id AND records.seq > clinic_marks.counted_seq)"
)


FOLD_STATEMENTS = (_FOLD_COUNTS, _FOLD_HOURS, _FOLD_TIMES, _FOLD_MOVE_MARKS)


def new_clinic(conn: sqlite3.Connection, clinic_id: str) -> None:
    """Give a clinic receiving its first record a mark, before the record: nothing counted yet."""
    conn.execute("INSERT OR IGNORE INTO clinic_marks (clinic_id, counted_seq) VALUES (?, 0)", (clinic_id,))


def fold(conn: sqlite3.Connection, clinics: Iterable[str] | None = None) -> int:
    """Count the tails of `clinics` (every clinic when None) into the counters, inside the
    caller's transaction; returns how many records it counted."""
    if clinics is None:
        clinics = [clinic_id for clinic_id, in conn.execute("SELECT clinic_id FROM clinic_marks")]
    params = (json.dumps(sorted(clinics)),)
    conn.execute(_FOLD_COUNTS, params)
    conn.execute(_FOLD_HOURS, params)
    before = conn.total_changes  # a statement led by WITH has no rowcount in sqlite3
    conn.execute(_FOLD_TIMES, params)
    counted = conn.total_changes - before
    conn.execute(_FOLD_MOVE_MARKS, params)
    return counted


class Tally:
    """The counters of rows loaded into an empty database (`records.load_into_empty`), counted as
    they pass in C-level passes over each chunk, then written by `count_in` in one go: the
    set-wise alternative, a fold, scans every clinic's rows after the load."""

    def __init__(self) -> None:
        self.groups: Counter = Counter()    # (clinic_id, test_type, status) -> records
        self.created: Counter = Counter()   # created_at -> records
        self.last_seq: dict[str, int] = {}  # clinic_id -> its largest seq (seqs rise as rows come)

    def add(self, rows: list[tuple], first_seq: int) -> None:
        """NewRow-shaped rows stored with seqs first_seq, first_seq + 1, ..."""
        self.groups.update(map(itemgetter(1, 3, 4), rows))
        self.created.update(map(itemgetter(6), rows))
        self.last_seq.update(zip(map(itemgetter(1), rows), count(first_seq)))


def count_in(conn: sqlite3.Connection, tally: Tally) -> None:
    """Count every record of a database that held none before the tallied load, inside its transaction."""
    conn.executemany("INSERT INTO clinic_counts (clinic_id, test_type, status, records) VALUES (?, ?, ?, ?)",
                     ((*group, records) for group, records in tally.groups.items()))
    hours: Counter = Counter()
    for created_at, records in tally.created.items():
        hours[created_at[:13]] += records  # as _HOUR reads it from the document
    conn.executemany("INSERT INTO hourly_ingest (hour, total) VALUES (?, ?)", hours.items())
    conn.executemany("INSERT INTO clinic_marks (clinic_id, counted_seq) VALUES (?, ?)", tally.last_seq.items())
    conn.execute("INSERT INTO clinic_times (clinic_id, collected_at, seq) SELECT clinic_id, collected_at, seq"
                 " FROM records ORDER BY 1, 2, 3")


def moved(conn: sqlite3.Connection, clinic_id: str, seq: int, old: tuple[str, str, str],
          new: tuple[str, str, str]) -> None:
    """A record of the clinic changed from (test_type, status, collected_at) `old` to `new`:
    move it in the counters if it is counted, inside the caller's transaction."""
    (old_type, old_status, old_collected), (new_type, new_status, new_collected) = old, new
    counted = conn.execute("SELECT counted_seq >= ? FROM clinic_marks WHERE clinic_id = ?",
                           (seq, clinic_id)).fetchone()
    if not counted or not counted[0]:
        return
    if (old_type, old_status) != (new_type, new_status):
        conn.execute("UPDATE clinic_counts SET records = records - 1 WHERE clinic_id = ? AND test_type = ? AND status = ?",
                     (clinic_id, old_type, old_status))
        conn.execute("DELETE FROM clinic_counts WHERE clinic_id = ? AND test_type = ? AND status = ? AND records = 0",
                     (clinic_id, old_type, old_status))
        conn.execute("INSERT INTO clinic_counts (clinic_id, test_type, status, records) VALUES (?, ?, ?, 1)"
                     " ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET records = records + 1",
                     (clinic_id, new_type, new_status))
    if old_collected != new_collected:
        conn.execute("DELETE FROM clinic_times WHERE clinic_id = ? AND collected_at = ? AND seq = ?",
                     (clinic_id, old_collected, seq))
        conn.execute("INSERT INTO clinic_times (clinic_id, collected_at, seq) VALUES (?, ?, ?)",
                     (clinic_id, new_collected, seq))


# A clinic's groups: counted ones, then its tail's (with the tail's first and last collected_at).
_STATS_SQL = (
    "SELECT test_type, status, records, NULL, NULL FROM clinic_counts WHERE clinic_id = ?1"
    " UNION ALL SELECT test_type, status, count(*), min(collected_at), max(collected_at) FROM records"
    f" WHERE clinic_id = ?1 AND seq > {_MARK} GROUP BY test_type, status"
)
_TIMES_SQL = ("SELECT (SELECT min(collected_at) FROM clinic_times WHERE clinic_id = ?1),"
              " (SELECT max(collected_at) FROM clinic_times WHERE clinic_id = ?1)")


def clinic_stats(db: Database, clinic_id: str) -> dict:
    def read(conn: sqlite3.Connection) -> tuple[list, tuple]:
        return conn.execute(_STATS_SQL, (clinic_id,)).fetchall(), conn.execute(_TIMES_SQL, (clinic_id,)).fetchone()

    groups, counted_times = db.snapshot(read)
    firsts = [t for t in (counted_times[0], *(g[3] for g in groups)) if t is not None]
    lasts = [t for t in (counted_times[1], *(g[4] for g in groups)) if t is not None]
    return clinic_stats_of(clinic_id, [g[:3] for g in groups], min(firsts, default=None), max(lasts, default=None))


# Every clinic's tail, for figures over all clinics.
_TAILS = "clinic_marks AS m JOIN records AS r ON r.clinic_id = m.clinic_id AND r.seq > m.counted_seq"
_CLINIC_TOTALS_SQL = (
    "SELECT clinic_id, sum(n) AS total FROM (SELECT clinic_id, records AS n FROM clinic_counts"
    f" UNION ALL SELECT r.clinic_id, count(*) FROM {_TAILS} GROUP BY r.clinic_id) GROUP BY clinic_id"
)
_HOURS_SQL = (
    "SELECT hour, sum(n) FROM (SELECT hour, total AS n FROM hourly_ingest WHERE hour >= ?1"
    f" UNION ALL SELECT {_HOUR} AS hour, count(*) FROM {_TAILS}"
    " GROUP BY 1 HAVING hour >= ?1) GROUP BY hour"
)


def dashboard_counts(db: Database, since_hour: str, top_clinics: int) -> dict:
    def read(conn: sqlite3.Connection) -> dict:
        clinic_count, records = conn.execute(
            f"SELECT count(*), coalesce(sum(total), 0) FROM ({_CLINIC_TOTALS_SQL})").fetchone()
        return {
            "records": records,
            "clinic_count": clinic_count,
            "clinics": conn.execute(f"{_CLINIC_TOTALS_SQL} ORDER BY total DESC, clinic_id LIMIT ?",
                                    (top_clinics,)).fetchall(),
            "hours": dict(conn.execute(_HOURS_SQL, (since_hour,)).fetchall()),
        }

    return db.snapshot(read)


# Each counter table against the truth it summarises, as (truth, kept) queries, for `check`.
COUNTER_CHECKS = {
    "clinic_counts": ("SELECT clinic_id, test_type, status, count(*) FROM records GROUP BY 1, 2, 3",
                      "SELECT clinic_id, test_type, status, sum(n) FROM ("
                      "SELECT clinic_id, test_type, status, records AS n FROM clinic_counts UNION ALL"
                      f" SELECT r.clinic_id, r.test_type, r.status, count(*) FROM {_TAILS} GROUP BY 1, 2, 3)"
                      " GROUP BY 1, 2, 3"),
    "clinic_times": ("SELECT r.clinic_id, r.collected_at, r.seq FROM clinic_marks AS m JOIN records AS r"
                     " ON r.clinic_id = m.clinic_id AND r.seq <= m.counted_seq",
                     "SELECT clinic_id, collected_at, seq FROM clinic_times"),
    "hourly_ingest": (f"SELECT {_HOUR}, count(*) FROM records AS r GROUP BY 1",
                      "SELECT hour, sum(n) FROM (SELECT hour, total AS n FROM hourly_ingest UNION ALL"
                      f" SELECT {_HOUR}, count(*) FROM {_TAILS}"
                      " GROUP BY 1) GROUP BY hour"),
    "clinic_marks": ("SELECT DISTINCT clinic_id FROM records", "SELECT clinic_id FROM clinic_marks"),
}


def mismatches(conn: sqlite3.Connection) -> dict[str, int]:
    """How many rows of each counter disagree with a recount of `records` (0 when all is well)."""
    return {table: conn.execute(f"SELECT count(*) FROM ({truth} EXCEPT {kept})").fetchone()[0]
            + conn.execute(f"SELECT count(*) FROM ({kept} EXCEPT {truth})").fetchone()[0]
            for table, (truth, kept) in COUNTER_CHECKS.items()}
