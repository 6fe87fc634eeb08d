"""The storage interface every engine fills in, and the rules shared by all engines.

The HTTP resources, the command line, seed and the dashboard know a store only through
`Store` below: what it does, never how. What a version is, what a stored document looks like
and how a new record is prepared are decided here, once, for every engine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, TypeVar

from .errors import AlreadyVoided, StoreBusy

from ..validate import VOIDED_STATUS, client_fields, timestamp_sort_key

log = logging.getLogger("records_service.store")

T = TypeVar("T")

# How many of a process's threads may wait to write at once (the `writers` of open_store). Past
# it a write is refused (503, Retry-After) instead of holding a thread that reads need: with
# another writer holding the database, waiting writes would otherwise take every thread (issue
# 17). While slots keep being given back (writes are flowing) a write waits up to
# WRITE_SLOT_WAIT_S for one; once none has been given back for WRITES_STUCK_S, it is refused at once.
WRITE_SLOT_WAIT_S = 0.25
WRITES_STUCK_S = 0.25


class Stored(NamedTuple):
    """A record's current version: what a single-record request checks and answers."""

    clinic_id: str
    version: int
    doc: str  # the record as the API returns it


class NewRow(NamedTuple):
    """A validated record at version 1, ready for any engine's insert (seed makes plain tuples
    in this order, faster than `prepare`)."""

    test_id: str
    clinic_id: str
    patient_id: str
    test_type: str
    status: str
    collected_key: str   # `timestamp_sort_key` of collected_at: text order is time order
    created_at: str
    request_id: str
    doc: str             # the record's JSON at version 1


def stored_doc(record: dict, *, created_at: str, updated_at: str, version: int, request_id: str) -> str:
    """A version's response JSON: the client fields, then what the service adds."""
    stored = {**record, "created_at": created_at, "updated_at": updated_at, "version": version,
              "request_id": request_id}
    return json.dumps(stored, ensure_ascii=False)


def prepare(record: dict, request_id: str, now: str) -> NewRow:
    """The row of a validated record at version 1, written at `now` by request `request_id`."""
    return NewRow(record["test_id"], record["clinic_id"], record["patient_id"], record["test_type"],
                  record["status"], timestamp_sort_key(record["collected_at"]), now, request_id,
                  stored_doc(record, created_at=now, updated_at=now, version=1, request_id=request_id))


def entered_in_error(current: dict) -> dict:
    """The client fields of a void: the current ones with status entered-in-error."""
    if current["status"] == VOIDED_STATUS:
        raise AlreadyVoided()
    return {**client_fields(current), "status": VOIDED_STATUS}


def action_of(version: int, status: str) -> str:
    """What writing a version was, as /audit names it."""
    if version == 1:
        return "create"
    return "void" if status == VOIDED_STATUS else "correct"


class WriterSlots:
    """At most `writers` threads of this process inside a write at once (None: no bound); while
    writes flow, a write waits `wait_s` at most for a slot."""

    def __init__(self, writers: int | None, wait_s: float = WRITE_SLOT_WAIT_S) -> None:
        self._slots = threading.BoundedSemaphore(writers) if writers else None
        self._wait_s = wait_s
        self._slot_given_back = time.monotonic()

    def run(self, write: Callable[[], T]) -> T:
        if self._slots is None:
            return write()
        if not self._slots.acquire(blocking=False):
            flowing = time.monotonic() - self._slot_given_back < WRITES_STUCK_S
            if not (flowing and self._slots.acquire(timeout=self._wait_s)):
                log.warning("too many writes waiting for the database in this process; write refused")
                raise StoreBusy("too many writes are waiting for the database")
            self._slot_given_back = time.monotonic()
        try:
            return write()
        finally:
            self._slots.release()
            self._slot_given_back = time.monotonic()


class Store(Protocol):
    """What the service asks of its database. Every method may raise a `StoreError`
    (busy, unavailable, full, read-only, corrupt); nothing else of an engine leaks out.

    `key_id` is the public id of the API key on whose behalf a write is made (None with
    access control off); /audit reports it with each version.
    """

    engine: str  # "sqlite" or "postgresql"

    # -- life cycle ------------------------------------------------------------------------
    def open(self) -> None: """Connect (and migrate) now rather than at first use."""
    def close(self) -> None: """Close this process's connections."""
    def migrate(self) -> int: """Bring the schema up to date; the schema version. Safe when several processes race."""
    def readiness(self) -> dict: """Prove reads and writes work now: engine, schema_version (and journal_mode)."""

    # -- records ---------------------------------------------------------------------------
    def insert(self, record: dict, *, request_id: str, key_id: str | None, now: str) -> str:
        """Store a new record at version 1 and return its JSON; DuplicateRecord if the test_id exists."""
    def insert_batch(self, records: list[dict], *, request_id: str, key_id: str | None, now: str,
                     atomic: bool) -> dict[str, dict]:
        """Store new records (valid, distinct test_ids) in one transaction, in order. Returns the
        stored record of each test_id that already existed (not stored); with `atomic`, nothing
        is stored when any existed."""
    def existing(self, test_ids: list[str]) -> dict[str, dict]: """The stored record of each test_id that exists."""
    def bulk_insert(self, rows: Iterable[tuple]) -> Iterator[int]:
        """Insert `NewRow`-shaped tuples in large transactions, yielding the running count (seed)."""
    def correct(self, record: dict, *, expected: frozenset[int], request_id: str, key_id: str | None,
                now: str) -> Stored:
        """Store validated client fields as the next version if the current one is in `expected`."""
    def void(self, test_id: str, *, expected: frozenset[int], request_id: str, key_id: str | None,
             now: str) -> Stored:
        """Store the next version as entered-in-error if the current one is in `expected`."""
    def current(self, test_id: str) -> Stored | None: """The current version, or None."""
    def history_json(self, test_id: str) -> tuple[str, int]: """Every version, oldest first: JSON array text, count."""
    def audit(self, request_id: str) -> list[dict]:
        """What one request wrote, in write order: test_id, version, action, at, clinic_id, key_id."""

    # -- queries ---------------------------------------------------------------------------
    def list_page(self, filters: dict[str, str], after_seq: int, limit: int) -> tuple[str, int, int | None]:
        """One page, oldest ingested first: (JSON array text, count, the seq to continue after or None)."""
    def export_docs(self, filters: dict[str, str], chunk_rows: int = 1000) -> Iterator[list[str]]:
        """Every matching record's JSON in ingest order, a chunk at a time; fails before the first chunk
        when the database cannot be read."""
    def clinic_stats(self, clinic_id: str) -> dict: """/tests/_stats for a clinic, exact."""
    def cursor_secret(self) -> bytes: """The key that signs paging cursors, the same in every process."""
    def count(self) -> int: """How many records there are."""
    def dashboard_counts(self, since_hour: str, top_clinics: int) -> dict: """The dashboard's figures."""

    # -- imports from upstream APIs (the rules: store/imports.py) ---------------------------
    def import_progress(self, source: str) -> dict | None:
        """Where a source stands (its current or last run: position, counts, failures, watermarks), or None."""
    def import_runs(self) -> list[dict]: """Every source's progress, by name (the dashboard)."""
    def import_page(self, source: str, items: list[tuple[int, dict]], position: dict, *, request_id: str,
                    key_id: str, now: str) -> dict:
        """In one transaction: store a page's validated (index, record)s as `imports.judge` says and
        save the source's progress as `imports.advance` makes it; the progress. ImportConflict
        when another run of the source committed meanwhile."""

    # -- API keys --------------------------------------------------------------------------
    def create_key(self, *, key_id: str, name: str, roles: list[str], clinics: list[str] | None,
                   secret_sha256: str, created_at: str) -> None: ...
    def find_key(self, key_id: str) -> dict | None: ...
    def list_keys(self) -> list[dict]: ...
    def revoke_key(self, key_id: str, now: str) -> tuple[dict, bool] | None: ...

    # -- whole database --------------------------------------------------------------------
    def backup(self, dest: str) -> dict: """A consistent copy while serving, or StoreError saying which tool to use."""
    def check(self) -> dict: """Integrity, schema version, record count and counter mismatches, read-only."""
