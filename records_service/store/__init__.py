"""Storage behind one engine-neutral interface (`base.Store`): SQLite by default, PostgreSQL when
RECORDS_DATABASE_URL names one. Nothing outside this package speaks SQL or imports a driver;
its failures reach the rest of the service as the domain errors of `errors`."""

from __future__ import annotations

from .base import NewRow, Store, Stored, prepare, stored_doc
from .errors import (AlreadyVoided, DuplicateRecord, StoreBusy, StoreCorrupt, StoreError, StoreFull,
                     StoreReadOnly, StoreUnavailable, VersionMismatch)


def open_store(settings, *, writers: int | None = None) -> Store:
    """The store the settings name, not yet connected (connections are opened in the process and
    thread that use them). `writers` bounds how many threads of this process may wait to write."""
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.db_path, synchronous=settings.synchronous, busy_timeout_ms=settings.busy_timeout_ms,
                       writers=writers)


__all__ = ["AlreadyVoided", "DuplicateRecord", "NewRow", "Store", "StoreBusy", "StoreCorrupt", "StoreError",
           "StoreFull", "StoreReadOnly", "StoreUnavailable", "Stored", "VersionMismatch", "open_store", "prepare",
           "stored_doc"]
