"""Import pages and sources' progress in PostgreSQL: one transaction per page (store/imports.py
says what a page does; this module says it in SQL), and the runs for the dashboard. A page first
takes its source's lock, so two runs of one source take turns and the second sees the first's
progress (ImportConflict), as SQLite's single writer gives for free."""

from __future__ import annotations

import json

import psycopg

from ..base import prepare
from ..imports import PROGRESS_COLUMNS, advance, judge, progress_of, progress_row
from . import records
from .connection import Database

_SELECT = f"SELECT {', '.join(PROGRESS_COLUMNS)} FROM import_progress"
_SAVE = (f"INSERT INTO import_progress ({', '.join(PROGRESS_COLUMNS)})"
         f" VALUES ({', '.join(['%s'] * len(PROGRESS_COLUMNS))}) ON CONFLICT (source) DO UPDATE SET "
         + ", ".join(f"{name} = excluded.{name}" for name in PROGRESS_COLUMNS if name != "source"))
# Raced: created by another writer between this page's look and its insert.
RACED = "stored meanwhile by another request; not changed"


def progress(db: Database, source: str) -> dict | None:
    rows = db.read(f"{_SELECT} WHERE source = %s", (source,))
    return progress_of(rows[0]) if rows else None


def runs(db: Database) -> list[dict]:
    return [progress_of(row) for row in db.read(f'{_SELECT} ORDER BY source COLLATE "C"')]


def store_page(conn: psycopg.Connection, source: str, items: list[tuple[int, dict]], position: dict, *,
               request_id: str, key_id: str, now: str) -> tuple[dict, list[dict], set[str], int]:
    """Inside the caller's transaction: judge and write each (index, record) in page order, then
    save the source's progress. Returns (the progress, the outcomes, the clinics written to,
    how many records were created), as SQLite's does."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('import ' || %s, 0))", (source,))
    current = {test_id: json.loads(doc) for test_id, doc in
               records.existing(conn, list({record["test_id"] for _, record in items})).items()}
    pending: list = []
    outcomes = []

    def flush() -> None:
        if pending:
            inserted = records.insert_rows(conn, pending, key_id)
            for outcome in outcomes:
                if outcome["outcome"] == "created" and outcome["test_id"] not in inserted and \
                        outcome["test_id"] in {row.test_id for row in pending}:
                    outcome.update(outcome="failed", detail=RACED)
            pending.clear()

    for index, record in items:
        test_id = record["test_id"]
        outcome, detail = judge(current.get(test_id), record)
        if outcome == "created":
            pending.append(prepare(record, request_id, now))
            current[test_id] = {**record, "version": 1}
        elif outcome == "updated":
            if any(row.test_id == test_id for row in pending):
                flush()  # a test_id created earlier in this page: its row must exist to be revised
            stored = records.revise(conn, test_id, frozenset({current[test_id]["version"]}), lambda _: record,
                                    request_id, key_id, now)
            current[test_id] = json.loads(stored.doc)
        outcomes.append({"index": index, "test_id": test_id, "outcome": outcome, "detail": detail})
    flush()
    created = sum(1 for o in outcomes if o["outcome"] == "created")
    clinics = {record["clinic_id"] for (_, record), o in zip(items, outcomes) if o["outcome"] in ("created", "updated")}
    row = conn.execute(f"{_SELECT} WHERE source = %s", (source,)).fetchone()
    state = advance(progress_of(row) if row else None, source, position, outcomes, request_id=request_id, now=now)
    conn.execute(_SAVE, progress_row(state))
    return state, outcomes, clinics, created
