"""Storage behind one engine-neutral interface (`base.Store`): SQLite by default, PostgreSQL when
RECORDS_DATABASE_URL names one. Nothing outside this package speaks SQL or imports a driver;
its failures reach the rest of the service as the domain errors of `errors`."""

from __future__ import annotations

import os

from .base import NewRow, Store, Stored, prepare, stored_doc
from .errors import (AlreadyVoided, DuplicateRecord, StoreBusy, StoreCorrupt, StoreError, StoreFull,
                     StoreReadOnly, StoreUnavailable, VersionMismatch)


def open_store(settings, *, writers: int | None = None) -> Store:
    """The store the settings name, not yet connected (connections are opened in the process and
    thread that use them). `writers` bounds how many threads of this process may wait to write."""
    if settings.database_url:
        from .postgres import PostgresStore  # psycopg is imported here, never on a SQLite install

        return PostgresStore(settings.database_url, busy_timeout_ms=settings.busy_timeout_ms, writers=writers)
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.db_path, synchronous=settings.synchronous, busy_timeout_ms=settings.busy_timeout_ms,
                       writers=writers)


def copy_to_postgresql(settings, url: str) -> dict[str, int]:
    """Copy the SQLite database of `settings` (records, history, keys, the cursor key) into the
    empty PostgreSQL database at `url`, as of one commit; its counters are counted there.
    Returns the rows copied per table. The SQLite file is migrated to the current schema first."""
    from .postgres import PostgresStore
    from .postgres.maintenance import COPIED_TABLES
    from .sqlite import SQLiteStore
    from .sqlite.maintenance import tables_of

    if not os.path.isfile(settings.db_path):
        raise StoreUnavailable(f"no SQLite database at {os.path.abspath(settings.db_path)}")
    source = SQLiteStore(settings.db_path, busy_timeout_ms=settings.busy_timeout_ms)
    try:
        source.migrate()
    finally:
        source.close()
    target = PostgresStore(url, busy_timeout_ms=settings.busy_timeout_ms)
    try:
        with tables_of(settings.db_path, COPIED_TABLES, busy_timeout_ms=settings.busy_timeout_ms) as (tables, secret):
            return target.load(tables, secret)
    finally:
        target.close()


__all__ = ["AlreadyVoided", "DuplicateRecord", "NewRow", "Store", "StoreBusy", "StoreCorrupt", "StoreError",
           "StoreFull", "StoreReadOnly", "StoreUnavailable", "Stored", "VersionMismatch", "copy_to_postgresql",
           "open_store", "prepare", "stored_doc"]
