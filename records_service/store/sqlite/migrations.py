"""Schema versions: the current schema is schema.sql; MIGRATIONS upgrade databases made by older code.

A new database is created from schema.sql in one transaction. An older one gets every missing
migration, in order, in one transaction: BEGIN IMMEDIATE makes processes that start at once
take turns, and each re-reads the version inside the lock, so a migration runs exactly once.
Version N's script moves the schema from N-1 to N. Never edit one that has shipped: add one,
and change schema.sql to match (a test compares the two).
"""

from __future__ import annotations

import logging
import sqlite3
from importlib import resources

log = logging.getLogger("records_service.store")

# Part of migration 2 (so frozen like it): take OLD out of its clinic_counts group, dropping an
# emptied group and recomputing first/last when OLD was at an edge. Used by two triggers.
_V2_UNCOUNT_OLD = """
        UPDATE clinic_counts SET records = records - 1
            WHERE clinic_id = OLD.clinic_id AND test_type = OLD.test_type AND status = OLD.status;
        DELETE FROM clinic_counts
            WHERE clinic_id = OLD.clinic_id AND test_type = OLD.test_type AND status = OLD.status AND records = 0;
        UPDATE clinic_counts SET
                first_collected_at = (SELECT min(collected_at) FROM records WHERE clinic_id = OLD.clinic_id
                                      AND test_type = OLD.test_type AND status = OLD.status),
                last_collected_at = (SELECT max(collected_at) FROM records WHERE clinic_id = OLD.clinic_id
                                     AND test_type = OLD.test_type AND status = OLD.status)
            WHERE clinic_id = OLD.clinic_id AND test_type = OLD.test_type AND status = OLD.status
                AND OLD.collected_at IN (first_collected_at, last_collected_at);
"""

# Part of migration 6 (so frozen like it), and of the audit query: what writing a version was.
_V6_ACTION = ("CASE WHEN {row}.version = 1 THEN 'create' WHEN {row}.status = 'entered-in-error' THEN 'void'"
              " ELSE 'correct' END")

# Version N's script moves the schema from N-1 to N. Never edit one that has shipped: add one.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE records (
        seq          INTEGER PRIMARY KEY,   -- ingest order: lists are ordered and paged by it
        test_id      TEXT NOT NULL UNIQUE,
        clinic_id    TEXT NOT NULL,
        patient_id   TEXT NOT NULL,
        test_type    TEXT NOT NULL,
        status       TEXT NOT NULL,
        collected_at TEXT NOT NULL,         -- fixed-width UTC, so text order is time order
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL,
        version      INTEGER NOT NULL,
        request_id   TEXT NOT NULL,
        doc          TEXT NOT NULL          -- the record exactly as the API returns it
    );
    CREATE INDEX records_by_clinic ON records (clinic_id, seq);
    """,
    # Records at scale: filters, keyset paging, stats. Every query names its clinic and pages by
    # seq, so both indexes lead with (clinic_id, ...) and end in seq order. The clinic index also
    # carries the filtered columns: a status, test type or time filter, and the stats, are
    # answered from the index without reading rows that do not match. It carries `doc` too, so a
    # page is read from the index alone: a clinic's records lie scattered through the table (they
    # arrive interleaved with every other clinic's), and fetching them row by row took 3x longer
    # (measured: ~120 us against ~42 us a 100-record page; the file grows ~30%). Patients get their own
    # index because one patient is a needle in a big clinic. Two indexes, not one per filter:
    # every index costs every insert (batch ingest and seed are bound by index upkeep).
    # `meta` holds the key that signs paging cursors, made once here so all workers share it.
    # `clinic_counts` answers /tests/_stats without reading a clinic's records: the store adds
    # new records to it in the transaction that inserts them (one upsert per clinic, type and
    # status of a batch: an INSERT trigger would cost ~5 us a row); triggers move a record
    # between groups when it is changed in place or removed, which is rare.
    2: """
    DROP INDEX records_by_clinic;
    CREATE INDEX records_by_clinic ON records (clinic_id, seq, status, test_type, collected_at, doc);
    CREATE INDEX records_by_patient ON records (clinic_id, patient_id, seq);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('cursor_secret', randomblob(32));
    CREATE TABLE clinic_counts (
        clinic_id          TEXT NOT NULL,
        test_type          TEXT NOT NULL,
        status             TEXT NOT NULL,
        records            INTEGER NOT NULL,
        first_collected_at TEXT NOT NULL,   -- sort keys, like records.collected_at
        last_collected_at  TEXT NOT NULL,
        PRIMARY KEY (clinic_id, test_type, status)
    ) WITHOUT ROWID;
    INSERT INTO clinic_counts
        SELECT clinic_id, test_type, status, count(*), min(collected_at), max(collected_at)
        FROM records GROUP BY clinic_id, test_type, status;
    CREATE TRIGGER records_recounted AFTER UPDATE OF clinic_id, test_type, status, collected_at ON records
    BEGIN
        INSERT INTO clinic_counts VALUES (NEW.clinic_id, NEW.test_type, NEW.status, 1, NEW.collected_at, NEW.collected_at)
            ON CONFLICT (clinic_id, test_type, status) DO UPDATE SET records = records + 1,
                first_collected_at = min(first_collected_at, excluded.first_collected_at),
                last_collected_at = max(last_collected_at, excluded.last_collected_at);
        {uncount_old}
    END;
    CREATE TRIGGER records_uncounted AFTER DELETE ON records
    BEGIN
        {uncount_old}
    END;
    """.format(uncount_old=_V2_UNCOUNT_OLD.strip()),
    # Every version of every record, append-only. Triggers on `records` write it, so every way
    # of creating or changing a record (single, batch, seed) keeps history without knowing it.
    # rowid order is write order: /audit lists one request's writes in the order it made them.
    # (Migration 6 changed this: history keeps a version once it is superseded.)
    3: """
    CREATE TABLE record_versions (
        test_id    TEXT NOT NULL,
        version    INTEGER NOT NULL,
        action     TEXT NOT NULL CHECK (action IN ('create', 'correct', 'void')),
        request_id TEXT NOT NULL,
        at         TEXT NOT NULL,           -- the updated_at of this version
        doc        TEXT NOT NULL,           -- the record as the API returned it at this version
        PRIMARY KEY (test_id, version)
    );
    CREATE INDEX record_versions_by_request ON record_versions (request_id);
    INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        SELECT test_id, version, 'create', request_id, updated_at, doc FROM records ORDER BY seq;
    CREATE TRIGGER records_keep_created AFTER INSERT ON records BEGIN
        INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        VALUES (NEW.test_id, NEW.version, 'create', NEW.request_id, NEW.updated_at, NEW.doc);
    END;
    CREATE TRIGGER records_one_version_at_a_time BEFORE UPDATE ON records
    WHEN NEW.version IS NOT OLD.version + 1 OR NEW.seq IS NOT OLD.seq OR NEW.test_id IS NOT OLD.test_id
      OR NEW.clinic_id IS NOT OLD.clinic_id OR NEW.patient_id IS NOT OLD.patient_id
      OR NEW.created_at IS NOT OLD.created_at BEGIN
        SELECT RAISE(ABORT, 'a record changes only by a new version that keeps its identity');
    END;
    CREATE TRIGGER records_keep_changed AFTER UPDATE ON records BEGIN
        INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        VALUES (NEW.test_id, NEW.version,
                CASE NEW.status WHEN 'entered-in-error' THEN 'void' ELSE 'correct' END,
                NEW.request_id, NEW.updated_at, NEW.doc);
    END;
    CREATE TRIGGER records_never_deleted BEFORE DELETE ON records BEGIN
        SELECT RAISE(ABORT, 'records are never deleted; void them');
    END;
    CREATE TRIGGER record_versions_never_updated BEFORE UPDATE ON record_versions BEGIN
        SELECT RAISE(ABORT, 'record versions are append-only');
    END;
    CREATE TRIGGER record_versions_never_deleted BEFORE DELETE ON record_versions BEGIN
        SELECT RAISE(ABORT, 'record versions are append-only');
    END;
    """,
    4: """
    CREATE TABLE api_keys (
        key_id        TEXT PRIMARY KEY,     -- public: listings and logs name a key by it
        name          TEXT NOT NULL,
        roles         TEXT NOT NULL,        -- JSON array of ingest, read, admin
        clinics       TEXT,                 -- JSON array of clinic ids, NULL for every clinic
        secret_sha256 TEXT NOT NULL,        -- hex SHA-256 of the secret, never the secret
        created_at    TEXT NOT NULL,
        revoked_at    TEXT                  -- NULL while the key is valid
    );
    """,
    # The dashboard's ingest-per-hour counter, kept by a trigger so every way of creating a
    # record (one POST, a batch, seed) counts it and the dashboard never scans `records`. A
    # record counts once, at ingest, in the UTC hour of its `created_at`; records are never
    # deleted, and corrections and voids keep created_at. Records per clinic come from
    # migration 2's clinic_counts. `check` recounts both, to prove them. (Migration 7 moved the
    # counting from this trigger into the store's insert.)
    5: """
    CREATE TABLE hourly_ingest (
        hour    TEXT PRIMARY KEY,           -- created_at's first 13 characters: 2025-06-01T12
        total   INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO hourly_ingest (hour, total) SELECT substr(created_at, 1, 13), count(*) FROM records GROUP BY 1;
    CREATE TRIGGER records_counted AFTER INSERT ON records BEGIN
        INSERT INTO hourly_ingest (hour, total) VALUES (substr(NEW.created_at, 1, 13), 1)
            ON CONFLICT (hour) DO UPDATE SET total = total + 1;
    END;
    """,
    # History keeps a version when it is superseded, not when it is written: the current
    # version is the records row itself, so creating a record writes it once, not twice (the
    # copy and its two indexes were about a third of a POST: measured 205 -> 170 us in-process).
    # Audit finds current versions through a request index on records. Superseded versions
    # are still append-only; copies made before this migration of versions still current stay
    # where they are, and the queries read a version from history only once it is superseded.
    6: """
    CREATE INDEX records_by_request ON records (request_id);
    DROP TRIGGER records_keep_created;
    DROP TRIGGER records_keep_changed;
    CREATE TRIGGER records_keep_superseded AFTER UPDATE ON records
    WHEN NOT EXISTS (SELECT 1 FROM record_versions WHERE test_id = OLD.test_id AND version = OLD.version) BEGIN
        INSERT INTO record_versions (test_id, version, action, request_id, at, doc)
        VALUES (OLD.test_id, OLD.version, {action}, OLD.request_id, OLD.updated_at, OLD.doc);
    END;
    """.format(action=_V6_ACTION.format(row="OLD")),
    # The store counts new records into hourly_ingest itself, as it does into clinic_counts
    # (one upsert per hour of a batch): migration 5's trigger cost ~4 us a row, a sixth of a
    # row's insert in batch ingest and seeding.
    7: """
    DROP TRIGGER records_counted;
    """,
}
# Schema 8: each record's document is stored once. The table is clustered by (clinic_id, seq),
# so a page is read from neighbouring leaves instead of a covering index that copied every
# document (bytes per record ~1,124 -> see docs/performance.md). created_at and updated_at are
# read from the document; key_id is new (audit says whose write it was). The counters stop
# being written by every insert (4 pages a POST instead of 7): clinic_counts loses first/last
# (clinic_times keeps them exact), and a clinic's newest records are counted when read until
# they are folded in (counters.py). The triggers that kept clinic_counts (2) are gone with the
# old table; so is records_uncounted, which could never fire (records are never deleted).
MIGRATIONS[8] = """
    ALTER TABLE records RENAME TO records_v7;
    CREATE TABLE records (
        clinic_id    TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        test_id      TEXT NOT NULL,
        patient_id   TEXT NOT NULL,
        test_type    TEXT NOT NULL,
        status       TEXT NOT NULL,
        collected_at TEXT NOT NULL,
        version      INTEGER NOT NULL,
        request_id   TEXT NOT NULL,
        key_id       TEXT,
        doc          TEXT NOT NULL,
        PRIMARY KEY (clinic_id, seq)
    ) WITHOUT ROWID;
    INSERT INTO records (clinic_id, seq, test_id, patient_id, test_type, status, collected_at, version, request_id,
                         key_id, doc)
        SELECT clinic_id, seq, test_id, patient_id, test_type, status, collected_at, version, request_id, NULL, doc
        FROM records_v7 ORDER BY clinic_id, seq;
    DROP TABLE records_v7;
    CREATE UNIQUE INDEX records_by_test_id ON records (test_id);
    CREATE INDEX records_by_patient ON records (clinic_id, patient_id, seq);
    CREATE INDEX records_by_request ON records (request_id);
    ALTER TABLE record_versions ADD COLUMN key_id TEXT;
    CREATE TRIGGER records_one_version_at_a_time BEFORE UPDATE ON records
    WHEN NEW.version IS NOT OLD.version + 1 OR NEW.seq IS NOT OLD.seq OR NEW.test_id IS NOT OLD.test_id
      OR NEW.clinic_id IS NOT OLD.clinic_id OR NEW.patient_id IS NOT OLD.patient_id BEGIN
        SELECT RAISE(ABORT, 'a record changes only by a new version that keeps its identity');
    END;
    CREATE TRIGGER records_keep_superseded AFTER UPDATE ON records
    WHEN NOT EXISTS (SELECT 1 FROM record_versions WHERE test_id = OLD.test_id AND version = OLD.version) BEGIN
        INSERT INTO record_versions (test_id, version, action, request_id, at, doc, key_id)
        VALUES (OLD.test_id, OLD.version,
                CASE WHEN OLD.version = 1 THEN 'create' WHEN OLD.status = 'entered-in-error' THEN 'void' ELSE 'correct' END,
                OLD.request_id, json_extract(OLD.doc, '$.updated_at'), OLD.doc, OLD.key_id);
    END;
    CREATE TRIGGER records_never_deleted BEFORE DELETE ON records BEGIN
        SELECT RAISE(ABORT, 'records are never deleted; void them');
    END;
    DROP TABLE clinic_counts;
    CREATE TABLE clinic_counts (
        clinic_id TEXT NOT NULL,
        test_type TEXT NOT NULL,
        status    TEXT NOT NULL,
        records   INTEGER NOT NULL,
        PRIMARY KEY (clinic_id, test_type, status)
    ) WITHOUT ROWID;
    INSERT INTO clinic_counts SELECT clinic_id, test_type, status, count(*) FROM records GROUP BY 1, 2, 3;
    CREATE TABLE clinic_marks (
        clinic_id   TEXT PRIMARY KEY,
        counted_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO clinic_marks SELECT clinic_id, max(seq) FROM records GROUP BY 1;
    CREATE TABLE clinic_times (
        clinic_id    TEXT NOT NULL,
        collected_at TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        PRIMARY KEY (clinic_id, collected_at, seq)
    ) WITHOUT ROWID;
    INSERT INTO clinic_times SELECT clinic_id, collected_at, seq FROM records ORDER BY 1, 2, 3;
"""
# Schema 9: where each import source stands (`python -m records_service import`), saved in the
# transaction of each page it stores: its current (or last) run's position and counts, and the
# watermark of its last complete run. One row per source: the dashboard lists them.
MIGRATIONS[9] = """
    CREATE TABLE import_progress (
        source        TEXT PRIMARY KEY,     -- the source file's `name`
        request_id    TEXT NOT NULL,        -- the current (or last) run's: every record it writes carries it
        started_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,        -- when its last page was committed
        complete      INTEGER NOT NULL,     -- 1 once the run committed its last page
        next          TEXT,                 -- JSON: where the first page not committed is; NULL when complete
        since         TEXT NOT NULL,        -- the run's {since}
        pages         INTEGER NOT NULL,     -- pages committed by the run
        fetched       INTEGER NOT NULL,
        created       INTEGER NOT NULL,
        updated       INTEGER NOT NULL,
        unchanged     INTEGER NOT NULL,
        failed        INTEGER NOT NULL,
        failures      TEXT NOT NULL,        -- JSON: the run's first 100 failures
        watermark     TEXT,                 -- JSON: the largest watermark value of the last complete run
        run_watermark TEXT                  -- JSON: the largest seen by this run so far
    );
"""
SCHEMA_VERSION = max(MIGRATIONS)


def schema_statements() -> list[str]:
    """The statements of schema.sql, which creates a new database at SCHEMA_VERSION."""
    return statements(resources.files(__package__).joinpath("schema.sql").read_text())


def migrate(conn: sqlite3.Connection, upto: int = SCHEMA_VERSION) -> int:
    """Bring the database to `upto` (tests build older schemas with it); returns the version.

    A new database at the current version is made from schema.sql, not by replaying history.
    """
    if conn.execute("PRAGMA user_version").fetchone()[0] >= upto:
        return upto
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current == 0 and upto == SCHEMA_VERSION:
            for statement in schema_statements():
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            log.info("schema created", extra={"schema_version": SCHEMA_VERSION})
        else:
            for version in sorted(v for v in MIGRATIONS if current < v <= upto):
                for statement in statements(MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
                log.info("schema migrated", extra={"schema_version": version})
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return max(current, upto)


def statements(script: str) -> list[str]:
    """Split a script into statements so they run inside our transaction.

    `executescript()` would COMMIT first. Pieces are joined until SQLite calls them complete,
    so a trigger body (`BEGIN ...; ...; END`) or a semicolon inside a string stays whole.
    """
    result, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if _sql_of(pending):
                result.append(pending.strip())
            pending = ""
    if _sql_of(pending):
        raise ValueError(f"incomplete statement in migration: {pending.strip()[:60]}")
    return result


def _sql_of(text: str) -> str:
    """`text` without comment lines and blanks: empty when it holds no statement."""
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("--")).strip(" \t\n;")
