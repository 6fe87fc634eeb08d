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
from functools import lru_cache
from json.encoder import c_make_encoder, encode_basestring
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, TypeVar

from .errors import AlreadyVoided, StoreBusy, VersionMismatch

from ..validate import VOIDED_STATUS, client_fields, timestamp_from_sort_key, timestamp_sort_key

log = logging.getLogger("records_service.store")

T = TypeVar("T")

# How many of a process's threads may wait to write at once (the `writers` of open_store). Past
# it a write is refused (503, Retry-After) instead of holding a thread that reads need: with
# another writer holding the database, waiting writes would otherwise take every thread (issue
# 17). While slots keep being given back (writes are flowing) a write waits up to
# WRITE_SLOT_WAIT_S for one; once the slots have all been held, none taken nor given back, for
# WRITES_STUCK_S, it is refused at once.
# Slots come back a commit's worth at a time (SQLite commits a process's waiting writes together;
# PostgreSQL's writes to one clinic take turns through their commits), and on a busy machine one
# SQLite group took up to ~150 ms with its wait for the turn: WRITES_STUCK_S leaves room for that.
WRITE_SLOT_WAIT_S = 0.25
WRITES_STUCK_S = 0.5


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


def _encoder() -> Callable[[object], str]:
    """`json.dumps(value, ensure_ascii=False)`, for the flat documents a record is: the C encoder
    built once (json.dumps builds an encoder per call, then one more in C), without the circular
    reference check that a flat dict of scalars does not need."""
    default = json.JSONEncoder().default  # (what json.dumps raises for a value it cannot encode)
    if c_make_encoder is None:
        return json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
    encode = c_make_encoder(None, default, encode_basestring, None, ": ", ", ", False, False, True)
    return lambda value: "".join(encode(value, 0))


_encode = _encoder()
_SERVICE_FIELDS = frozenset({"created_at", "updated_at", "version", "request_id"})


def stored_doc(record: dict, *, created_at: str, updated_at: str, version: int, request_id: str) -> str:
    """A version's response JSON: the client fields, then what the service adds.

    The text is `json.dumps({**record, <service fields>}, ensure_ascii=False)`, made as the
    record's JSON with the service fields' JSON after it, which is the same for every record
    one request writes (so encoded once for a batch).
    """
    if not record or not _SERVICE_FIELDS.isdisjoint(record):  # (a service field would keep its place)
        return _encode({**record, "created_at": created_at, "updated_at": updated_at, "version": version,
                        "request_id": request_id})
    return _encode(record)[:-1] + _service_fields_json(created_at, updated_at, version, request_id)


@lru_cache(maxsize=64)
def _service_fields_json(created_at: str, updated_at: str, version: int, request_id: str) -> str:
    """`, "created_at": ..., "request_id": ...}`: the end of a stored document's JSON."""
    return ", " + _encode({"created_at": created_at, "updated_at": updated_at, "version": version,
                           "request_id": request_id})[1:]


def next_version(current: dict, expected: frozenset[int], change: Callable[[dict], dict], *, request_id: str,
                 now: str) -> tuple[dict, int, str]:
    """The client fields, number and JSON of the version that supersedes `current`, written at
    `now` by `request_id`, when `current`'s version is one of `expected`; VersionMismatch otherwise."""
    if current["version"] not in expected:
        raise VersionMismatch(current["version"])
    fields = change(current)
    version = current["version"] + 1
    return fields, version, stored_doc(fields, created_at=current["created_at"], updated_at=now, version=version,
                                       request_id=request_id)


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


class WriterSlots:
    """At most `writers` threads of this process inside a write at once (None: no bound). While
    writes flow, a write waits up to `wait_s` for a slot; once the slots have all been held,
    none taken nor given back, for `stuck_s`, it is refused (at once, or after waiting that
    long), so waiting writes never keep the threads reads need."""

    def __init__(self, writers: int | None, wait_s: float = WRITE_SLOT_WAIT_S, stuck_s: float = WRITES_STUCK_S) -> None:
        self._slots = threading.BoundedSemaphore(writers) if writers else None
        self._wait_s = wait_s
        self._stuck_s = stuck_s
        # When a slot was last taken or given back. Counting from the last one given back alone,
        # a burst of writes after a quiet spell found the slots "stuck" since before the burst,
        # and the writes past the slots were refused at once.
        self._slots_moved = time.monotonic()

    def run(self, write: Callable[[], T]) -> T:
        if self._slots is None:
            return write()
        if not self._take():
            log.warning("too many writes waiting for the database in this process; write refused")
            raise StoreBusy("too many writes are waiting for the database")
        try:
            return write()
        finally:
            self._slots.release()
            self._slots_moved = time.monotonic()

    def _take(self) -> bool:
        """A slot: at once; or, if writes are flowing, within `wait_s`, giving up once this write
        has waited `stuck_s` and the slots have not moved for as long."""
        if self._slots.acquire(blocking=False):
            self._slots_moved = time.monotonic()
            return True
        arrived = time.monotonic()
        if arrived - self._slots_moved >= self._stuck_s:
            return False
        deadline = arrived + self._wait_s
        while True:
            if self._slots.acquire(timeout=max(0.0, min(self._stuck_s / 5, deadline - time.monotonic()))):
                self._slots_moved = time.monotonic()
                return True
            now = time.monotonic()
            if now >= deadline or (now - arrived >= self._stuck_s and now - self._slots_moved >= self._stuck_s):
                return False


# The filters a collection query may carry, each one condition on a column (`{p}`: the
# engine's placeholder), in the order every engine writes them.
_FILTER_SQL = {
    "clinic_id": "clinic_id = {p}",
    "patient_id": "patient_id = {p}",
    "test_type": "test_type = {p}",
    "status": "status = {p}",
    "collected_from": "collected_at >= {p}",
    "collected_to": "collected_at < {p}",
}
_TIME_FILTERS = ("collected_from", "collected_to")


def record_conditions(filters: dict[str, str], after_seq: int, placeholder: str) -> tuple[list[str], list]:
    """The WHERE conditions (and their parameters) of records matching `filters` (clean values,
    clinic_id among them) after `after_seq`: the one reading of the filters for every engine."""
    unknown = set(filters) - _FILTER_SQL.keys()
    if unknown or "clinic_id" not in filters:
        raise ValueError(f"not a clinic query: {sorted(filters)}")
    conditions, params = [], []
    for name, condition in _FILTER_SQL.items():
        if name in filters:
            conditions.append(condition.format(p=placeholder))
            params.append(timestamp_sort_key(filters[name]) if name in _TIME_FILTERS else filters[name])
    conditions.append(f"seq > {placeholder}")
    params.append(after_seq)
    return conditions, params


def page_of(rows: list[tuple], limit: int) -> tuple[str, int, int | None]:
    """A page from up to `limit` + 1 (seq, doc) rows: JSON array text, count, the seq to go on after."""
    more = len(rows) > limit
    del rows[limit:]
    return "[" + ",".join(doc for _, doc in rows) + "]", len(rows), rows[-1][0] if more else None


def clinic_stats_of(clinic_id: str, groups: Iterable[tuple[str, str, int]], first: str | None,
                    last: str | None) -> dict:
    """/tests/_stats from (test_type, status, count) groups and the first and last collected_at sort keys."""
    by_test_type: dict[str, int] = {}
    by_status: dict[str, int] = {}
    for test_type, status, count in groups:
        by_test_type[test_type] = by_test_type.get(test_type, 0) + count
        by_status[status] = by_status.get(status, 0) + count
    return {
        "clinic_id": clinic_id,
        "total": sum(by_status.values()),
        "by_test_type": dict(sorted(by_test_type.items())),
        "by_status": dict(sorted(by_status.items())),
        "first_collected_at": timestamp_from_sort_key(first) if first else None,
        "last_collected_at": timestamp_from_sort_key(last) if last else None,
    }


def key_found(row: tuple) -> dict:
    """A key as authentication needs it, from (secret_sha256, roles, clinics, revoked_at)."""
    secret_sha256, roles, clinics, revoked_at = row
    return {"secret_sha256": secret_sha256, "roles": json.loads(roles), "clinics": _clinics(clinics),
            "revoked_at": revoked_at}


KEY_LISTING = "key_id, name, roles, clinics, created_at, revoked_at"


def key_listing(row: tuple) -> dict:
    """A key as `keys list` shows it (never its hash), from the KEY_LISTING columns."""
    key_id, name, roles, clinics, created_at, revoked_at = row
    return {"key_id": key_id, "name": name, "roles": json.loads(roles), "clinics": _clinics(clinics),
            "created_at": created_at, "revoked_at": revoked_at}


def _clinics(column: str | None) -> list[str] | None:
    return None if column is None else json.loads(column)


class EngineStore:
    """What both engines' stores do alike, over their own modules (`_records`, `_counters`,
    `_keys`, each taking the engine's database first) and their own `_write`: corrections, reads
    and keys, and the log lines that tell of them."""

    _db: object
    _records: object
    _counters: object
    _keys: object
    _imports: object
    _cursor_secret: bytes | None = None

    def _write(self, work):
        raise NotImplementedError

    def _wrote(self, clinics: Iterable[str], count: int) -> None:
        """Told after a commit where `count` new records went (SQLite folds its counters then)."""

    def open(self) -> None:
        self._db.connection()

    def close(self) -> None:
        self._db.close()

    def correct(self, record: dict, *, expected: frozenset[int], request_id: str, key_id: str | None = None,
                now: str) -> Stored:
        return self._revise(record["test_id"], expected, lambda current: record, "correct", request_id, key_id, now)

    def void(self, test_id: str, *, expected: frozenset[int], request_id: str, key_id: str | None = None,
             now: str) -> Stored:
        return self._revise(test_id, expected, entered_in_error, "void", request_id, key_id, now)

    def _revise(self, test_id, expected, change, action, request_id, key_id, now) -> Stored:
        try:
            stored = self._write(lambda conn: self._records.revise(conn, test_id, expected, change, request_id,
                                                                   key_id, now))
        except VersionMismatch as exc:
            log.info("record not changed: version mismatch", extra={"test_id": test_id, "version": exc.current})
            raise
        except AlreadyVoided:
            log.info("record not changed: already voided", extra={"test_id": test_id})
            raise
        log.info("committed", extra={"test_id": test_id, "version": stored.version, "action": action})
        return stored

    def current(self, test_id: str) -> Stored | None:
        return self._records.current(self._db, test_id)

    def history_json(self, test_id: str) -> tuple[str, int]:
        return self._records.history_json(self._db, test_id)

    def audit(self, request_id: str) -> list[dict]:
        return self._records.audit(self._db, request_id)

    def list_page(self, filters: dict[str, str], after_seq: int, limit: int) -> tuple[str, int, int | None]:
        sql, params = self._records.select_records(filters, after_seq, limit + 1)
        return page_of(self._db.read(sql, params), limit)

    def export_docs(self, filters: dict[str, str], chunk_rows: int = 1000) -> Iterator[list[str]]:
        return self._records.export_docs(self._db, filters, chunk_rows)

    def clinic_stats(self, clinic_id: str) -> dict:
        return self._counters.clinic_stats(self._db, clinic_id)

    def cursor_secret(self) -> bytes:
        """The key that signs paging cursors: made once with the schema, the same in every worker."""
        if self._cursor_secret is None:
            self._cursor_secret = bytes(self._db.read("SELECT value FROM meta WHERE key = 'cursor_secret'")[0][0])
        return self._cursor_secret

    def count(self) -> int:
        return self._db.read("SELECT count(*) FROM records")[0][0]

    def import_progress(self, source: str) -> dict | None:
        return self._imports.progress(self._db, source)

    def import_runs(self) -> list[dict]:
        return self._imports.runs(self._db)

    def import_page(self, source: str, items: list[tuple[int, dict]], position: dict, *, request_id: str,
                    key_id: str, now: str) -> dict:
        state, outcomes, clinics, created = self._write(lambda conn: self._imports.store_page(
            conn, source, items, position, request_id=request_id, key_id=key_id, now=now))
        log.info("committed", extra={"page": position["page"], "records_created": created,
                                     "updated": sum(1 for o in outcomes if o["outcome"] == "updated"),
                                     "unchanged": sum(1 for o in outcomes if o["outcome"] == "unchanged")})
        self._wrote(clinics, created)
        return state

    def create_key(self, **key) -> None:
        self._keys.create_key(self._db, **key)
        log.info("api key created", extra={"key_id": key["key_id"]})

    def find_key(self, key_id: str) -> dict | None:
        return self._keys.find_key(self._db, key_id)

    def list_keys(self) -> list[dict]:
        return self._keys.list_keys(self._db)

    def revoke_key(self, key_id: str, now: str) -> tuple[dict, bool] | None:
        result = self._keys.revoke_key(self._db, key_id, now)
        if result and result[1]:
            log.info("api key revoked", extra={"key_id": key_id})
        return result


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
