"""Exact counters in PostgreSQL: /tests/_stats, the dashboard and `check`.

Unlike SQLite's (folded tails, to spare each insert its counter writes), these are upserted by
the statement that inserts the records (records._INSERT_SQL), under the clinic's lock the
insert holds anyway: they never contend across clinics, and every read is exact at once. A
clinic's first and last collected_at come from an index (records_by_collected), not a counter.
"""

from __future__ import annotations

import psycopg

from ..base import clinic_stats_of
from .connection import Database

def moved(conn: psycopg.Connection, clinic_id: str, old: tuple[str, str], new: tuple[str, str]) -> None:
    """A record of the clinic changed from (test_type, status) `old` to `new`: move it between groups."""
    if old == new:
        return
    conn.execute("UPDATE clinic_counts SET records = records - 1 WHERE clinic_id = %s AND test_type = %s AND status = %s",
                 (clinic_id, *old))
    conn.execute("DELETE FROM clinic_counts WHERE clinic_id = %s AND test_type = %s AND status = %s AND records = 0",
                 (clinic_id, *old))
    conn.execute("INSERT INTO clinic_counts (clinic_id, test_type, status, records) VALUES (%s, %s, %s, 1)"
                 " ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET records = clinic_counts.records + 1",
                 (clinic_id, *new))


def clinic_stats(db: Database, clinic_id: str) -> dict:
    def read(conn: psycopg.Connection) -> tuple[list, tuple]:
        groups = conn.execute("SELECT test_type, status, records FROM clinic_counts WHERE clinic_id = %s",
                              (clinic_id,)).fetchall()
        times = conn.execute("SELECT (SELECT min(collected_at) FROM records WHERE clinic_id = %(c)s),"
                             " (SELECT max(collected_at) FROM records WHERE clinic_id = %(c)s)",
                             {"c": clinic_id}).fetchone()
        return groups, times

    groups, (first, last) = db.snapshot(read)
    return clinic_stats_of(clinic_id, groups, first, last)


_CLINIC_TOTALS_SQL = "SELECT clinic_id, sum(records)::bigint AS total FROM clinic_counts GROUP BY clinic_id"


def dashboard_counts(db: Database, since_hour: str, top_clinics: int) -> dict:
    def read(conn: psycopg.Connection) -> dict:
        clinic_count, records = conn.execute(
            f"SELECT count(*), coalesce(sum(total), 0)::bigint FROM ({_CLINIC_TOTALS_SQL}) AS t").fetchone()
        return {
            "records": records,
            "clinic_count": clinic_count,
            "clinics": [tuple(row) for row in conn.execute(
                f'{_CLINIC_TOTALS_SQL} ORDER BY total DESC, clinic_id COLLATE "C" LIMIT %s', (top_clinics,))],
            "hours": dict(conn.execute("SELECT hour, sum(records)::bigint FROM clinic_hours WHERE hour >= %s"
                                       " GROUP BY hour", (since_hour,)).fetchall()),
        }

    return db.snapshot(read)


# Each counter table against the truth it summarises, as (truth, kept) queries, for `check`.
COUNTER_CHECKS = {
    "clinic_counts": ("SELECT clinic_id, test_type, status, count(*) FROM records GROUP BY 1, 2, 3",
                      "SELECT clinic_id, test_type, status, records FROM clinic_counts"),
    "clinic_hours": ("SELECT clinic_id, substr(doc::json ->> 'created_at', 1, 13), count(*) FROM records GROUP BY 1, 2",
                     "SELECT clinic_id, hour, records FROM clinic_hours"),
    # Not a counter, but kept the same way (by a trigger) and checked the same way.
    "clinic_seq": ("SELECT clinic_id, max(seq) FROM records GROUP BY 1", "SELECT clinic_id, last_seq FROM clinic_seq"),
}

# Counters recounted from the records (after `copy` loads them; clinic_seq's trigger fills it).
RECOUNT = (
    f"INSERT INTO clinic_counts (clinic_id, test_type, status, records) {COUNTER_CHECKS['clinic_counts'][0]}",
    f"INSERT INTO clinic_hours (clinic_id, hour, records) {COUNTER_CHECKS['clinic_hours'][0]}",
)


def mismatches(conn: psycopg.Connection) -> dict[str, int]:
    """How many rows of each counter disagree with a recount of `records` (0 when all is well)."""
    return {table: conn.execute(f"SELECT count(*) FROM (({truth}) EXCEPT ({kept})) AS a").fetchone()[0]
            + conn.execute(f"SELECT count(*) FROM (({kept}) EXCEPT ({truth})) AS b").fetchone()[0]
            for table, (truth, kept) in COUNTER_CHECKS.items()}
