-- PostgreSQL schema 1 exactly as it shipped (records_service/store/postgres/schema.sql at version 1),
-- frozen for tests/test_migrations.py: a database of schema 1 must migrate to exactly schema.sql.

-- Every record's current version. `seq` rises within a clinic in commit order: a new record
-- takes its clinic's advisory lock, then the larger of the clock in microseconds and the
-- clinic's last seq + 1 (the same rule as SQLite, so a copied database keeps its order and
-- cursors). The document is the record exactly as the API returns it, byte for byte.
CREATE TABLE records (
    clinic_id    TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    test_id      TEXT NOT NULL,
    patient_id   TEXT NOT NULL,
    test_type    TEXT NOT NULL,
    status       TEXT NOT NULL,
    collected_at TEXT NOT NULL COLLATE "C",   -- fixed-width UTC, so text order is time order
    version      INTEGER NOT NULL,
    request_id   TEXT NOT NULL,               -- of the request that wrote this version
    key_id       TEXT,                        -- the API key it wrote with (NULL: access control off, seed)
    doc          TEXT NOT NULL,
    PRIMARY KEY (clinic_id, seq)
);
CREATE UNIQUE INDEX records_by_test_id ON records (test_id);
CREATE INDEX records_by_patient ON records (clinic_id, patient_id, seq);
CREATE INDEX records_by_request ON records (request_id);
-- A clinic's first and last collected_at for /tests/_stats: two probes of this index.
CREATE INDEX records_by_collected ON records (clinic_id, collected_at);

-- Every superseded version, append-only; the current one is the records row.
CREATE TABLE record_versions (
    test_id    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    action     TEXT NOT NULL CHECK (action IN ('create', 'correct', 'void')),
    request_id TEXT NOT NULL,
    at         TEXT NOT NULL,                 -- the updated_at of this version
    doc        TEXT NOT NULL,
    key_id     TEXT,
    PRIMARY KEY (test_id, version)
);
CREATE INDEX record_versions_by_request ON record_versions (request_id);

-- History is kept by the database itself, whatever code writes: a record changes only by its
-- next version (the superseded one is copied to record_versions), and nothing is ever deleted.
CREATE FUNCTION records_one_version_at_a_time() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version IS DISTINCT FROM OLD.version + 1 OR NEW.seq IS DISTINCT FROM OLD.seq
       OR NEW.test_id IS DISTINCT FROM OLD.test_id OR NEW.clinic_id IS DISTINCT FROM OLD.clinic_id
       OR NEW.patient_id IS DISTINCT FROM OLD.patient_id THEN
        RAISE EXCEPTION 'a record changes only by a new version that keeps its identity' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    INSERT INTO record_versions (test_id, version, action, request_id, at, doc, key_id)
    VALUES (OLD.test_id, OLD.version,
            CASE WHEN OLD.version = 1 THEN 'create' WHEN OLD.status = 'entered-in-error' THEN 'void' ELSE 'correct' END,
            OLD.request_id, OLD.doc::json ->> 'updated_at', OLD.doc, OLD.key_id);
    RETURN NEW;
END $$;
CREATE TRIGGER records_keep_superseded BEFORE UPDATE ON records
    FOR EACH ROW EXECUTE FUNCTION records_one_version_at_a_time();

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER records_never_deleted BEFORE DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION refuse_change('records are never deleted; void them');
CREATE TRIGGER records_never_truncated BEFORE TRUNCATE ON records
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change('records are never deleted; void them');
CREATE TRIGGER record_versions_never_updated BEFORE UPDATE OR DELETE ON record_versions
    FOR EACH ROW EXECUTE FUNCTION refuse_change('record versions are append-only');
CREATE TRIGGER record_versions_never_truncated BEFORE TRUNCATE ON record_versions
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change('record versions are append-only');

-- Counters, exact, written in the transaction that writes the records (under the clinic's lock,
-- so they never contend across clinics): by test type and status, and by UTC hour of ingest
-- (created_at's first 13 characters: 2025-06-01T12).
CREATE TABLE clinic_counts (
    clinic_id TEXT NOT NULL,
    test_type TEXT NOT NULL,
    status    TEXT NOT NULL,
    records   BIGINT NOT NULL,
    PRIMARY KEY (clinic_id, test_type, status)
);
CREATE TABLE clinic_hours (
    clinic_id TEXT NOT NULL,
    hour      TEXT NOT NULL COLLATE "C",
    records   BIGINT NOT NULL,
    PRIMARY KEY (clinic_id, hour)
);
CREATE INDEX clinic_hours_by_hour ON clinic_hours (hour);

-- The key that signs paging cursors, made once so every worker, host and restart agrees on it.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
INSERT INTO meta (key, value) VALUES ('cursor_secret', sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')));

CREATE TABLE api_keys (
    key_id        TEXT PRIMARY KEY,
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
