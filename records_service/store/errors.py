"""What can go wrong in storage, in words the rest of the service understands: no HTTP, no driver.

Each engine turns its driver's exceptions into these in one place (its `connection` module);
the HTTP layer turns these into problems in one table (`records_service.errors`).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the storage failures the service answers with 503 (nothing was written)."""

    default = "the database failed"

    def __str__(self) -> str:
        return super().__str__() or self.default


class StoreBusy(StoreError):
    """Other writers held the database past the busy bound."""

    default = "the database stayed locked by other writers past the busy bound"


class StoreUnavailable(StoreError):
    """The database cannot be opened or used at all (missing directory, server down, dropped connection)."""

    default = "the database cannot be opened or used"


class StoreFull(StoreUnavailable):
    """The disk (or the database's quota) is full: nothing more can be written until space is freed."""

    default = "the disk holding the database is full"


class StoreReadOnly(StoreUnavailable):
    """The database can be read but not written (a read-only file, file system or server)."""

    default = "the database is read-only"


class StoreCorrupt(StoreUnavailable):
    """The database file is damaged or is not a database: an operator must restore it."""

    default = "the database file is damaged or is not a database"


class DuplicateRecord(Exception):
    """A record with this test_id exists; `stored` is the stored record."""

    def __init__(self, stored: dict) -> None:
        super().__init__(stored["test_id"])
        self.stored = stored


class VersionMismatch(Exception):
    """If-Match did not name the record's current version (`current`); nothing was written."""

    def __init__(self, current: int) -> None:
        super().__init__(current)
        self.current = current


class AlreadyVoided(Exception):
    """The record is already entered-in-error; voiding it again would change nothing."""
