"""PostgreSQL schema versions: the current schema is schema.sql; MIGRATIONS upgrade older databases.

The version is kept in the table `schema_migrations` (one row per version applied). Migrating
takes an advisory lock first, so of several processes, or several hosts, starting at once
exactly one migrates and the others find it done when they get the lock.
A new database is created from schema.sql; an older one gets every missing migration, in
order, in the same one transaction. Never edit a migration that has shipped: add one, and
change schema.sql to match.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg

log = logging.getLogger("records_service.store")

# The advisory lock's key for "migrating the schema" (any constant; this one spells "records").
MIGRATION_LOCK = 0x7265636F726473

# Version N's script moves the schema from N-1 to N. Version 1 is schema.sql as first shipped.
MIGRATIONS: dict[int, str] = {
    # Each clinic's last seq in a table of its own, kept by a trigger (inserts read it instead of
    # max(seq) per row). Records are locked against inserts while it is filled, so none is missed.
    2: """
CREATE TABLE clinic_seq (
    clinic_id TEXT PRIMARY KEY,
    last_seq  BIGINT NOT NULL
);
CREATE FUNCTION records_advance_clinic_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO clinic_seq AS s (clinic_id, last_seq)
    SELECT clinic_id, max(seq) FROM inserted GROUP BY clinic_id ORDER BY clinic_id
    ON CONFLICT (clinic_id) DO UPDATE SET last_seq = greatest(s.last_seq, excluded.last_seq);
    RETURN NULL;
END $$;
LOCK TABLE records IN SHARE MODE;
INSERT INTO clinic_seq (clinic_id, last_seq) SELECT clinic_id, max(seq) FROM records GROUP BY clinic_id;
CREATE TRIGGER records_advance_clinic_seq AFTER INSERT ON records REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION records_advance_clinic_seq();
""",
}
SCHEMA_VERSION = max(MIGRATIONS, default=1)


def schema_script() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text()


def current_version(conn: psycopg.Connection) -> int:
    """The schema version of the database (0: no schema yet)."""
    if conn.execute("SELECT to_regclass('schema_migrations') IS NULL").fetchone()[0]:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(conn: psycopg.Connection) -> int:
    """Bring the database to SCHEMA_VERSION on an autocommit connection; returns the version.

    Raises psycopg errors (the caller translates them). The migration runs without a statement
    bound (a big table may take a while) but waits for the lock no longer than any other lock.
    """
    if current_version(conn) >= SCHEMA_VERSION:
        return SCHEMA_VERSION
    # The lock is the session's, taken before the migration's transaction begins: a transaction
    # that began before the lock was granted could still see the schema as it was (its catalog
    # cache is refreshed at BEGIN), and create tables the winner has just made.
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        return _migrate_locked(conn)
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def _migrate_locked(conn: psycopg.Connection) -> int:
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = 0")
        current = current_version(conn)  # again, inside the lock: another process may have done it
        if current == 0:
            conn.execute(schema_script())
            conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                         " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (SCHEMA_VERSION,))
            log.info("schema created", extra={"schema_version": SCHEMA_VERSION})
        for version in sorted(v for v in MIGRATIONS if current and current < v):
            conn.execute(MIGRATIONS[version])
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            log.info("schema migrated", extra={"schema_version": version})
    return SCHEMA_VERSION
