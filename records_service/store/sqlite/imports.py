"""Import pages and sources' progress in SQLite: one transaction per page (store/imports.py says
what a page does; this module says it in SQL), and the runs for the dashboard."""

from __future__ import annotations

import json
import sqlite3

from ..base import prepare
from ..imports import PROGRESS_COLUMNS, advance, judge, progress_of, progress_row
from . import records
from .connection import Database

_SELECT = f"SELECT {', '.join(PROGRESS_COLUMNS)} FROM import_progress"
_SAVE = (f"INSERT OR REPLACE INTO import_progress ({', '.join(PROGRESS_COLUMNS)})"
         f" VALUES ({', '.join('?' * len(PROGRESS_COLUMNS))})")


def progress(db: Database, source: str) -> dict | None:
    rows = db.read(f"{_SELECT} WHERE source = ?", (source,))
    return progress_of(rows[0]) if rows else None


def runs(db: Database) -> list[dict]:
    return [progress_of(row) for row in db.read(f"{_SELECT} ORDER BY source")]


def store_page(conn: sqlite3.Connection, source: str, items: list[tuple[int, dict]], position: dict, *,
               request_id: str, key_id: str, now: str) -> tuple[dict, list[dict], set[str], int]:
    """Inside the caller's transaction: judge and write each (index, record) in page order, then
    save the source's progress. Returns (the progress, the outcomes, the clinics written to,
    how many records were created)."""
    current = {test_id: json.loads(doc) for test_id, doc in
               records.existing(conn, list({record["test_id"] for _, record in items})).items()}
    pending: list = []   # new rows not yet inserted: one insert for the page, unless a later item revises one
    pending_ids: set[str] = set()
    clinics: set[str] = set()
    outcomes = []

    def flush() -> None:
        if pending:
            clinics.update(records.insert_rows(conn, pending, key_id))
            pending.clear()
            pending_ids.clear()

    for index, record in items:
        test_id = record["test_id"]
        outcome, detail = judge(current.get(test_id), record)
        if outcome == "created":
            row = prepare(record, request_id, now)
            pending.append(row)
            pending_ids.add(test_id)
            current[test_id] = {**record, "version": 1}  # what judging a later item of this page needs
        elif outcome == "updated":
            if test_id in pending_ids:
                flush()  # a test_id created earlier in this page: its row must exist to be revised
            stored = records.revise(conn, test_id, frozenset({current[test_id]["version"]}), lambda _: record,
                                    request_id, key_id, now)
            current[test_id] = json.loads(stored.doc)
            clinics.add(stored.clinic_id)
        outcomes.append({"index": index, "test_id": test_id, "outcome": outcome, "detail": detail})
    created = sum(1 for o in outcomes if o["outcome"] == "created")
    flush()
    row = conn.execute(f"{_SELECT} WHERE source = ?", (source,)).fetchone()
    state = advance(progress_of(row) if row else None, source, position, outcomes, request_id=request_id, now=now)
    conn.execute(_SAVE, progress_row(state))
    return state, outcomes, clinics, created
