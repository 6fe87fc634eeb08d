-- The current schema (version 9), whole: a new database is created from this file, and
-- migrations.py upgrades older ones to exactly this (tests/test_migrations.py proves it).

-- Every record's current version, clustered by clinic in ingest order: a page of a clinic's
-- records is a few neighbouring leaves, and the document is stored once, in the row. `seq`
-- rises within a clinic (the store gives each new record the larger of the clock in
-- microseconds and its clinic's last seq + 1), so it orders lists, pages and one request's writes.
CREATE TABLE records (
    clinic_id    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    test_id      TEXT NOT NULL,
    patient_id   TEXT NOT NULL,
    test_type    TEXT NOT NULL,
    status       TEXT NOT NULL,
    collected_at TEXT NOT NULL,          -- fixed-width UTC, so text order is time order
    version      INTEGER NOT NULL,
    request_id   TEXT NOT NULL,          -- of the request that wrote this version
    key_id       TEXT,                   -- the API key it wrote with (NULL: access control off, seed)
    doc          TEXT NOT NULL,          -- the record exactly as the API returns it
    PRIMARY KEY (clinic_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX records_by_test_id ON records (test_id);
CREATE INDEX records_by_patient ON records (clinic_id, patient_id, seq);
CREATE INDEX records_by_request ON records (request_id);

-- Every superseded version, append-only; the current one is the records row.
CREATE TABLE record_versions (
    test_id    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    action     TEXT NOT NULL CHECK (action IN ('create', 'correct', 'void')),
    request_id TEXT NOT NULL,
    at         TEXT NOT NULL,           -- the updated_at of this version
    doc        TEXT NOT NULL,           -- the record as the API returned it at this version
    key_id     TEXT,
    PRIMARY KEY (test_id, version)
);
CREATE INDEX record_versions_by_request ON record_versions (request_id);

CREATE TRIGGER records_one_version_at_a_time BEFORE UPDATE ON records
WHEN NEW.version IS NOT OLD.version + 1 OR NEW.seq IS NOT OLD.seq OR NEW.test_id IS NOT OLD.test_id
  OR NEW.clinic_id IS NOT OLD.clinic_id OR NEW.patient_id IS NOT OLD.patient_id BEGIN
    SELECT RAISE(ABORT, 'a record changes only by a new version that keeps its identity');
END;
-- Copies of versions still current made before schema 6 stay where they are: skip those.
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
CREATE TRIGGER record_versions_never_updated BEFORE UPDATE ON record_versions BEGIN
    SELECT RAISE(ABORT, 'record versions are append-only');
END;
CREATE TRIGGER record_versions_never_deleted BEFORE DELETE ON record_versions BEGIN
    SELECT RAISE(ABORT, 'record versions are append-only');
END;

-- Counters, kept exact without a write per record (store/sqlite/counters.py): each clinic's
-- records up to `counted_seq` are counted here; the few after it (its tail) are counted when
-- read, and folded in now and then, outside any request's transaction.
CREATE TABLE clinic_marks (
    clinic_id   TEXT PRIMARY KEY,
    counted_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE clinic_counts (
    clinic_id TEXT NOT NULL,
    test_type TEXT NOT NULL,
    status    TEXT NOT NULL,
    records   INTEGER NOT NULL,
    PRIMARY KEY (clinic_id, test_type, status)
) WITHOUT ROWID;
-- The counted records' collected_at, so a clinic's first and last stay exact when a correction
-- moves the earliest one, without scanning the clinic.
CREATE TABLE clinic_times (
    clinic_id    TEXT NOT NULL,
    collected_at TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (clinic_id, collected_at, seq)
) WITHOUT ROWID;
-- Records ingested per UTC hour of created_at (its first 13 characters: 2025-06-01T12).
CREATE TABLE hourly_ingest (
    hour    TEXT PRIMARY KEY,
    total   INTEGER NOT NULL
) WITHOUT ROWID;

-- The key that signs paging cursors, made once so every worker and restart agrees on it.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
INSERT INTO meta (key, value) VALUES ('cursor_secret', randomblob(32));

CREATE TABLE api_keys (
    key_id        TEXT PRIMARY KEY,     -- public: listings and logs name a key by it
    name          TEXT NOT NULL,
    roles         TEXT NOT NULL,        -- JSON array of ingest, read, admin
    clinics       TEXT,                 -- JSON array of clinic ids, NULL for every clinic
    secret_sha256 TEXT NOT NULL,        -- hex SHA-256 of the secret, never the secret
    created_at    TEXT NOT NULL,
    revoked_at    TEXT                  -- NULL while the key is valid
);

-- Where each import source stands: its current (or last) run's position and counts, saved with
-- each page it stores, and the watermark of its last complete run (store/imports.py).
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
